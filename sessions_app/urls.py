from __future__ import annotations

from django.urls import path

from sessions_app import views

urlpatterns = [
    path("sessions/", views.SessionListView.as_view()),
    path("sessions/<str:session_id>/", views.SessionDetailView.as_view()),
    path("sessions/<str:session_id>/members/", views.MemberListView.as_view()),
    path("sessions/<str:session_id>/members/<str:username>/", views.MemberDetailView.as_view()),
    path("sessions/<str:session_id>/presence/", views.PresenceView.as_view()),
    path("sessions/<str:session_id>/health/", views.HealthView.as_view()),
    path("sessions/<str:session_id>/messages/", views.MessageListView.as_view()),
    path("sessions/<str:session_id>/messages/<str:message_id>/", views.MessageDetailView.as_view()),
    path("sessions/<str:session_id>/messages/<str:message_id>/retry/", views.RetryView.as_view()),
    path("sessions/<str:session_id>/abort/", views.AbortView.as_view()),
    path("sessions/<str:session_id>/doc/", views.DocumentView.as_view()),
    path("sessions/<str:session_id>/fork/", views.ForkView.as_view()),
    path("sessions/<str:session_id>/export/", views.ExportView.as_view()),
    path("search/", views.SearchView.as_view()),
    path("sessions/<str:session_id>/permissions/", views.PermissionListView.as_view()),
    path(
        "sessions/<str:session_id>/permissions/<str:permission_id>/",
        views.PermissionDetailView.as_view(),
    ),
]
