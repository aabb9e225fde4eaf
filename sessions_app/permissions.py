"""Permission requests: a tool that needs permission asks (``request_permission``), or an
outside agent asks the session's people a question (``request_approval``, MCP); a
member answers (``answer_permission``) or it expires. Exactly one resolution wins."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from events_app import fanout, groups
from events_app.services import publish
from project.errors import AlreadyResolved, NotFound, PayloadTooLarge, ValidationFailed
from sessions_app.models import PermissionRequest, ReplyRun, Session, new_id
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


APPROVAL_TOOL = "approval"  # the ``tool`` of an outside agent's question
MAX_QUESTION_CHARS = 2000


def request_approval(
    session: Session, user: User, question: str, details: Any, timeout: float | None
) -> PermissionRequest:
    """An outside agent, acting as ``user`` (an editor or owner), asks the session's people
    ``question``: a permission request with no reply behind it, shown and answered like
    any other. It expires after ``timeout`` seconds, at most ``TANDEM_PERMISSION_TIMEOUT``."""
    if not isinstance(question, str) or not question.strip():
        raise ValidationFailed(details={"question": ["Ask a question: a non-empty string."]})
    if len(question) > MAX_QUESTION_CHARS:
        raise ValidationFailed(details={"question": [f"At most {MAX_QUESTION_CHARS} characters."]})
    if details is not None and not isinstance(details, dict):
        raise ValidationFailed(details={"details": ["Must be a JSON object."]})
    limit = float(settings.TANDEM_PERMISSION_TIMEOUT)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValidationFailed(details={"timeout_seconds": ["Must be a positive number of seconds."]})
    shown: dict[str, Any] = {"question": question, "asked_by": user.get_username()}
    if details:
        shown["details"] = details
    try:
        encoded = orjson.dumps(shown)
    except orjson.JSONEncodeError as exc:
        raise ValidationFailed(details={"details": [f"Cannot be encoded as JSON: {exc}."]}) from None
    if len(encoded) > settings.TANDEM_MAX_EVENT_BYTES:
        raise PayloadTooLarge(f"A question may be at most {settings.TANDEM_MAX_EVENT_BYTES} bytes.")
    with transaction.atomic():
        permission = PermissionRequest.objects.create(
            session=session, message=None, call_id=new_id("ask"), tool=APPROVAL_TOOL, input=shown,
            expires_at=timezone.now() + timedelta(seconds=min(timeout or limit, limit)),
        )
        publish(session.id, "permission.requested", {"permission": permission_data(permission)})
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


def withdraw_approval(permission_id: str) -> None:
    """The outside agent that asked stopped waiting (it disconnected or cancelled): a
    pending question is closed as rejected, so nobody answers into the void."""
    with transaction.atomic():
        won = PermissionRequest.objects.filter(
            pk=permission_id, status=PermissionRequest.Status.PENDING
        ).update(
            status=PermissionRequest.Status.REJECTED, approved=False, resolved_by_timeout=True,
            reason="The agent that asked stopped waiting.", resolved_at=timezone.now(),
        )
        if won:
            _publish_resolution(PermissionRequest.objects.get(pk=permission_id), notify=False)


def permission_state(permission_id: str) -> PermissionRequest:
    return PermissionRequest.objects.get(pk=permission_id)


def list_permissions(session: Session, status: str | None) -> list[PermissionRequest]:
    found = PermissionRequest.objects.filter(session=session).select_related("resolved_by")
    if status:
        found = found.filter(status=status)
    return list(found)


def close_permissions(
    session_id: str, message_id: str, reason: str, *, resolved_by_id: int | None, status: str
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
        permission.resolved_by_id = resolved_by_id
        permission.resolved_by_timeout = resolved_by_id is None
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
    if notify and permission.message_id is not None:
        # The pool running the reply that asked; none when the reply has ended meanwhile.
        runner = ReplyRun.objects.filter(pk=permission.message_id).values_list("runner", flat=True).first()
        if runner:
            group = groups.pool_group(runner)
            answered = groups.PermissionAnswered(permission.message_id, permission.id)
            transaction.on_commit(lambda: fanout.send_control(group, answered))
