from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.views import LoginView, PasswordChangeView
from django.urls import URLPattern, URLResolver, include, path, re_path
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

from events_app.views import EventListView
from project.errors import api_not_found
from project.limits import AuthThrottle, sign_in_throttled
from project.openapi import SchemaView, SwaggerView
from sessions_app import pages
from sessions_app.views import ApiKeyDetailView, ApiKeyListView, RegisterView, TicketView

api: list[URLPattern | URLResolver] = [
    path("auth/token/", TokenObtainPairView.as_view(throttle_classes=[AuthThrottle])),
    path("auth/token/refresh/", TokenRefreshView.as_view(throttle_classes=[AuthThrottle])),
    path("auth/register/", RegisterView.as_view()),
    path("auth/ticket/", TicketView.as_view()),
    path("auth/keys/", ApiKeyListView.as_view()),
    path("auth/keys/<str:key_id>/", ApiKeyDetailView.as_view()),
    path("sessions/<str:session_id>/events/", EventListView.as_view()),
    path("", include("sessions_app.urls")),
    # The OpenAPI description and its browsable pages (public; local assets only).
    path("schema/", SchemaView.as_view(), name="api-schema"),
    path("docs/", SwaggerView.as_view(), name="api-docs"),
    re_path(r"^.*$", api_not_found),
]

urlpatterns = [
    # Every form that takes a password is throttled like /api/auth/ (project/limits.py).
    path("admin/login/", sign_in_throttled("password")(admin.site.login)),
    path("admin/", admin.site.urls),
    path("accounts/login/", sign_in_throttled("password")(LoginView.as_view()), name="login"),
    path("accounts/signup/", sign_in_throttled("register")(pages.signup_page), name="signup"),
    path("accounts/logout/", pages.LogoutPage.as_view(), name="logout"),
    path(
        "accounts/password_change/",
        sign_in_throttled("password")(PasswordChangeView.as_view()),
        name="password_change",
    ),
    # It sends mail: throttled per address like the login page, against mail floods.
    path(
        "accounts/password_reset/",
        sign_in_throttled("password")(pages.PasswordResetPage.as_view()),
        name="password_reset",
    ),
    path("accounts/keys/", pages.api_keys_page, name="api_keys"),
    path("accounts/keys/<str:key_id>/revoke/", pages.revoke_api_key_page, name="revoke_api_key"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/", include(api)),
    # /healthz, /readyz and /metrics are answered by project.probes, for any Host.
    path("s/<str:session_id>/", pages.session_page, name="session"),
    path("", pages.sessions_page, name="sessions"),
]

handler404 = "project.middleware.not_found_page"
