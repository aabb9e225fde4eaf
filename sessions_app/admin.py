"""Admin for sessions, their members and messages: for looking, not for editing.

Every change to these tables must go through ``sessions_app.services`` so that it is
published as an event; an admin form saving a row directly would change state that no
client ever hears about. So the pages are read-only, and the one write they allow —
deleting a session — calls ``services.delete_session``, which ends its streams with
``session.deleted``.
"""
from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.contrib.auth.models import User
from django.db.models import Count, F, IntegerField, OuterRef, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce, Length
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from project.errors import NotQueued
from sessions_app import doc as docs
from sessions_app import services
from sessions_app.models import ApiKey, Document, DocUpdate, Membership, Message, Part, PermissionRequest, Role, Session


def _count_per_session(model: type[Membership] | type[Message]) -> Coalesce:
    """A correlated COUNT per session. Two Count() annotations over two joins would
    multiply each other's rows; subqueries keep each count exact and cheap."""
    rows = (
        model.objects.filter(session=OuterRef("pk"))
        .order_by()
        .values("session")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(rows, output_field=IntegerField()), 0)


class MembershipInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Membership
    fields = ("user", "role", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        return super().get_queryset(request).select_related("user").order_by("created_at")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("idle", "idle"), ("busy", "busy"), ("retry", "retry")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Session]) -> QuerySet[Session]:
        value = self.value()
        return queryset.filter(status__type=value) if value else queryset


class PendingPermissionInline(admin.TabularInline):  # type: ignore[type-arg]
    model = PermissionRequest
    verbose_name_plural = "pending permission requests"
    fields = ("id", "tool", "input", "message", "created_at", "expires_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[PermissionRequest]:
        return super().get_queryset(request).filter(status=PermissionRequest.Status.PENDING)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


_SHOWN = 50  # messages and events on a session's page; the full lists are linked


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "id", "title", "owner", "agent", "status_type", "member_count", "message_count",
        "doc_version", "last_seq", "last_activity_at",
    )
    list_display_links = ("id", "title")
    list_filter = (StatusFilter, "agent", "owner")
    actions = ("abort_replies", "prune_events")
    # "=forked_from_session_id": a session's id finds it and its forks.
    search_fields = ("title", "=id", "owner__username", "=forked_from_session_id")
    list_select_related = ("owner",)
    ordering = ("-last_activity_at",)
    fields = (
        "id", "title", "agent", "owner", "status", "last_seq", "forked_from",
        "created_at", "updated_at", "last_activity_at", "shared_document", "recent_messages", "recent_events",
    )
    readonly_fields = fields
    inlines = (MembershipInline, PendingPermissionInline)

    @admin.display(description="forked from")
    def forked_from(self, obj: Session) -> str:
        if not obj.forked_from_session_id:
            return "-"
        message = obj.forked_from_message_id or "(no messages)"
        if not Session.objects.filter(pk=obj.forked_from_session_id).exists():
            return format_html("{} (deleted), at message {}", obj.forked_from_session_id, message)
        return format_html(
            "<a href='{}'>{}</a>, at message {}",
            reverse("admin:sessions_app_session_change", args=[quote(obj.forked_from_session_id)]),
            obj.forked_from_session_id, message,
        )

    @admin.display(description="shared document")
    def shared_document(self, obj: Session) -> str:
        text, chars = docs.doc_text_and_size(obj)
        row = Document.objects.filter(pk=obj.pk).first()
        stored = DocUpdate.objects.filter(session=obj).aggregate(n=Count("pk"), size=Sum(Length("data")))
        base = len(row.base) if row is not None else 0
        return format_html(
            "<p>{} characters, version {}; stored: a base of {} bytes and {} update(s) of {} bytes "
            "not yet compacted</p><pre style='white-space: pre-wrap; max-height: 40em; overflow: auto'>{}</pre>",
            chars, row.version if row is not None else 0, base, stored["n"], stored["size"] or 0,
            text or "(empty)",
        )

    @admin.display(description=f"messages (latest {_SHOWN})")
    def recent_messages(self, obj: Session) -> str:
        messages = list(
            Message.objects.filter(session=obj).select_related("author")
            .prefetch_related("parts").order_by("-created_at")[:_SHOWN]
        )[::-1]
        rows = format_html_join(
            "",
            "<tr><td><a href='{}'>{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    reverse("admin:sessions_app_message_change", args=[quote(m.pk)]),
                    m.pk, m.role, m.status,
                    format_html_join(
                        "", "<div><b>{}</b> {}</div>",
                        ((p.type, _part_summary(p)) for p in m.parts.all()),
                    ),
                )
                for m in messages
            ),
        )
        link = reverse("admin:sessions_app_message_changelist") + f"?q={obj.pk}"
        return format_html(
            "<table><tr><th>id</th><th>role</th><th>status</th><th>parts</th></tr>{}</table>"
            "<p><a href='{}'>All messages</a></p>", rows, link,
        )

    @admin.display(description=f"events (latest {_SHOWN})")
    def recent_events(self, obj: Session) -> str:
        from events_app.models import Event

        events = Event.objects.filter(session=obj).order_by("-seq")[:_SHOWN]
        rows = format_html_join(
            "", "<tr><td><a href='{}'>{}</a></td><td>{}</td><td>{}</td></tr>",
            (
                (reverse("admin:events_app_event_change", args=[e.pk]), e.seq, e.type, e.created_at)
                for e in events
            ),
        )
        link = reverse("admin:events_app_event_changelist") + f"?q={obj.pk}"
        return format_html(
            "<table><tr><th>seq</th><th>type</th><th>time</th></tr>{}</table>"
            "<p><a href='{}'>The whole log</a></p>", rows, link,
        )

    @admin.action(description="Abort the running reply")
    def abort_replies(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        user = request.user if isinstance(request.user, User) else None
        aborted = sum(services.abort(session, user) for session in queryset)
        self.message_user(request, f"Asked {aborted} running repl(ies) to stop.")

    @admin.action(description="Prune events past retention now")
    def prune_events(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        from events_app.services import prune_session

        pruned = sum(prune_session(session.pk) for session in queryset)
        self.message_user(request, f"Pruned {pruned} event(s).")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Session]:
        sessions: QuerySet[Session] = (
            super()
            .get_queryset(request)
            .annotate(
                member_count=_count_per_session(Membership),
                message_count=_count_per_session(Message),
                # The version, not the size: the text's length needs the document decoded,
                # one per row; the session's page shows it.
                doc_version=F("document__version"),
            )
        )
        return sessions

    @admin.display(description="status", ordering="status__type")
    def status_type(self, obj: Session) -> str:
        return str((obj.status or {}).get("type", "idle"))

    @admin.display(description="doc version", ordering="document__version")
    def doc_version(self, obj: Session) -> int:
        return int(getattr(obj, "doc_version", None) or 0)

    @admin.display(description="members", ordering="member_count")
    def member_count(self, obj: Session) -> int:
        return int(getattr(obj, "member_count", 0))

    @admin.display(description="messages", ordering="message_count")
    def message_count(self, obj: Session) -> int:
        return int(getattr(obj, "message_count", 0))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        # The cascade takes the session's members, messages and events with it. Those
        # admins refuse deletion of single rows, which would otherwise block this page.
        deleted, counts, _perms_needed, protected = super().get_deleted_objects(objs, request)
        return deleted, counts, set(), protected

    def delete_model(self, request: HttpRequest, obj: Session) -> None:
        services.delete_session(obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        for session in queryset:
            services.delete_session(session)


def _part_summary(part: Part) -> str:
    if part.type == Part.PartType.TOOL:
        state = part.state or {}
        return f"{part.tool} [{state.get('status', '?')}]"
    return part.text if len(part.text) <= 200 else part.text[:200] + "…"


class PartInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Part
    fields = ("index", "id", "type", "text", "tool", "call_id", "state")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("index",)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "session", "role", "author", "status", "created_at", "completed_at")
    list_filter = ("role", "status")
    search_fields = ("=id", "=session__id", "author__username")
    list_select_related = ("session", "author")
    ordering = ("-created_at",)
    show_full_result_count = False
    fields = (
        "id", "session", "role", "author", "status", "error", "usage",
        "created_at", "completed_at", "turn_at", "superseded_by",
    )
    readonly_fields = fields
    inlines = (PartInline,)
    actions = ("withdraw_queued",)

    @admin.action(description="Withdraw the selected queued messages")
    def withdraw_queued(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        # As an owner would, through the service, so that every client hears message.removed.
        queued = queryset.filter(status=Message.Status.QUEUED).select_related("session")
        user = request.user if isinstance(request.user, User) else None
        withdrawn = 0
        for message in queued:
            try:
                services.withdraw_message(message.session, user, Role.OWNER, message.pk)
            except NotQueued:  # its turn came meanwhile
                continue
            withdrawn += 1
        self.message_user(request, f"Withdrew {withdrawn} queued message(s).")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A message's events stay in the log; deleting the row would contradict them.
        return False


@admin.register(PermissionRequest)
class PermissionRequestAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Read-only: answers go through the API so that the first one wins and is published."""

    list_display = ("id", "session", "tool", "status", "created_at", "expires_at", "resolved_by")
    list_filter = ("status", "tool")
    search_fields = ("=id", "=session__id", "=message__id")
    list_select_related = ("session", "resolved_by")
    readonly_fields = (
        "id", "session", "message", "call_id", "tool", "input", "status", "approved", "reason",
        "resolved_by", "resolved_by_timeout", "created_at", "expires_at", "resolved_at",
    )
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Who holds which keys, and when each was last used. Deleting one revokes it as its
    user would (``services.revoke_api_key``): the streams it opened end too."""

    list_display = ("name", "user", "prefix", "created_at", "last_used_at")
    list_filter = ("user",)
    search_fields = ("name", "=prefix", "user__username")
    list_select_related = ("user",)
    ordering = ("-created_at",)
    fields = ("id", "name", "user", "prefix", "created_at", "last_used_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a key is shown once, to the user who makes it

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def delete_model(self, request: HttpRequest, obj: ApiKey) -> None:
        services.revoke_api_key(obj.user, obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset.select_related("user"):
            services.revoke_api_key(key.user, key.pk)
