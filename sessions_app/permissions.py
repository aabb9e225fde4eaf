"""Permission requests: a tool that needs permission asks (``request_permission``), a
member answers (``answer_permission``) or it expires. Exactly one resolution wins."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from events_app import fanout, groups
from events_app.services import publish
from project.errors import AlreadyResolved, NotFound
from sessions_app.models import PermissionRequest, Session
from sessions_app.serializers import permission_data, resolver_data


def request_permission(
    session_id: str, message_id: str, call_id: str, tool: str, input: Any
) -> PermissionRequest:
    with transaction.atomic():
        permission = PermissionRequest.objects.create(
            session_id=session_id, message_id=message_id, call_id=call_id, tool=tool, input=input,
            expires_at=timezone.now() + timedelta(seconds=settings.TANDEM_PERMISSION_TIMEOUT),
        )
        publish(session_id, "permission.requested", {"permission": permission_data(permission)})
    return permission


def answer_permission(
    session: Session, permission_id: str, user: User, *, approved: bool, reason: str | None
) -> PermissionRequest:
    """First answer wins, across processes: the UPDATE only matches a pending row, and
    the database lets exactly one of two concurrent answers match it."""
    if "\x00" in permission_id:
        raise NotFound("No such permission request.")
    status = PermissionRequest.Status.APPROVED if approved else PermissionRequest.Status.REJECTED
    with transaction.atomic():
        won = PermissionRequest.objects.filter(
            pk=permission_id, session=session, status=PermissionRequest.Status.PENDING
        ).update(
            status=status, approved=approved, reason=reason, resolved_by=user,
            resolved_at=timezone.now(),
        )
        permission = (
            PermissionRequest.objects.select_related("resolved_by")
            .filter(pk=permission_id, session=session)
            .first()
        )
        if permission is None:
            raise NotFound("No such permission request.")
        if not won:
            raise AlreadyResolved(
                f"This permission request is already {permission.status}.",
                details={"permission": permission_data(permission)},
            )
        _publish_resolution(permission)
    return permission


def expire_permission(permission_id: str) -> PermissionRequest:
    """Called by the waiting runner once ``expires_at`` passes; an answer that got in
    first stands."""
    with transaction.atomic():
        PermissionRequest.objects.filter(
            pk=permission_id, status=PermissionRequest.Status.PENDING, expires_at__lte=timezone.now()
        ).update(
            status=PermissionRequest.Status.EXPIRED, approved=False, resolved_by_timeout=True,
            reason="No answer in time.", resolved_at=timezone.now(),
        )
        permission = PermissionRequest.objects.select_related("resolved_by").get(pk=permission_id)
        if permission.status == PermissionRequest.Status.EXPIRED and permission.resolved_by_timeout:
            _publish_resolution(permission, notify=False)
    return permission


def permission_state(permission_id: str) -> PermissionRequest:
    return PermissionRequest.objects.get(pk=permission_id)


def list_permissions(session: Session, status: str | None) -> list[PermissionRequest]:
    found = PermissionRequest.objects.filter(session=session).select_related("resolved_by")
    if status:
        found = found.filter(status=status)
    return list(found)


def close_permissions(
    session_id: str, message_id: str, reason: str, *, resolved_by: Any, status: str
) -> list[tuple[str, dict[str, Any]]]:
    """Resolve the reply's pending requests; returns their ``permission.resolved`` events
    for the caller to publish (in its transaction, with the reply's other last events)."""
    pending = PermissionRequest.objects.filter(
        message_id=message_id, status=PermissionRequest.Status.PENDING
    )
    events = []
    for permission in pending.select_for_update():
        permission.status = status
        permission.approved = False
        permission.reason = reason
        permission.resolved_by = resolved_by
        permission.resolved_by_timeout = resolved_by is None
        permission.resolved_at = timezone.now()
        permission.save()
        events.append(_resolution_event(permission))
    return events


def _resolution_event(permission: PermissionRequest) -> tuple[str, dict[str, Any]]:
    return (
        "permission.resolved",
        {
            "permission_id": permission.id,
            "approved": bool(permission.approved),
            "reason": permission.reason,
            "resolved_by": resolver_data(permission),
        },
    )


def _publish_resolution(permission: PermissionRequest, *, notify: bool = True) -> None:
    publish(permission.session_id, *_resolution_event(permission))
    if notify:
        group = groups.run_group(permission.session_id)
        answered = groups.PermissionAnswered(permission.id)
        transaction.on_commit(lambda: fanout.send_control(group, answered))
