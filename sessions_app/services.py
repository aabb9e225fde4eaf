"""Every state change of sessions, members and messages. Views and consumers call these;
nothing else writes these tables or publishes their events. Events are published inside
the transaction and leave the process only after it commits."""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.auth.password_validation import validate_password
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from events_app import fanout, groups, runtime
from events_app.services import arrange_exit_flush, broadcast, publish
from events_app.types import iso
from project.errors import (
    AlreadyResolved,
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    SessionBusy,
    ValidationFailed,
)
from sessions_app.models import (
    Membership,
    Message,
    Part,
    PermissionRequest,
    ReplyRun,
    Role,
    Session,
)
from sessions_app.serializers import (
    message_data,
    part_data,
    permission_data,
    resolver_data,
    session_data,
    user_data,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- sessions


def create_session(owner: AbstractBaseUser, *, title: str, agent: str) -> Session:
    with transaction.atomic():
        session = Session.objects.create(owner=owner, title=title, agent=agent)
        Membership.objects.create(session=session, user=owner, role=Role.OWNER)
        frame = publish(session.id, "session.created", {"session": session_data(session)})
        _join_on_commit(owner.pk, session.id, frame.seq)
    session.refresh_from_db()
    return session


def update_session(session: Session, *, title: str) -> Session:
    with transaction.atomic():
        session.title = title
        session.save(update_fields=["title", "updated_at"])
        publish(session.id, "session.updated", {"session": session_data(session)})
    session.refresh_from_db()
    return session


def delete_session(session: Session) -> None:
    session_id = session.id
    with transaction.atomic():
        Session.objects.filter(pk=session_id).delete()
        broadcast(session_id, "session.deleted", {"session_id": session_id})


# ---------------------------------------------------------------- members


def add_member(session: Session, *, username: str, role: str) -> Membership:
    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None:
        raise ValidationFailed(details={"username": ["No such user."]})
    with transaction.atomic():
        if Membership.objects.filter(session=session, user=user).exists():
            raise Conflict(f"{username} is already a member of this session.")
        membership = Membership.objects.create(session=session, user=user, role=role)
        frame = publish(session.id, "member.added", {"user": user_data(user), "role": role})
        _join_on_commit(user.pk, session.id, frame.seq)
    return membership


def remove_member(session: Session, *, username: str) -> None:
    if "\x00" in username:  # no user has one, and PostgreSQL refuses it in a query
        raise NotFound(f"{username!r} is not a member of this session.")
    with transaction.atomic():
        membership = (
            Membership.objects.select_related("user")
            .filter(session=session, user__username=username)
            .first()
        )
        if membership is None:
            raise NotFound(f"{username} is not a member of this session.")
        if membership.role == Role.OWNER:
            raise BadRequest("The owner cannot be removed; delete the session instead.")
        membership.delete()
        publish(
            session.id, "member.removed", {"user": user_data(membership.user), "role": membership.role}
        )
        group = groups.session_group(session.id)
        revoke = groups.Revoke(user_id=membership.user_id, session_id=session.id)
        transaction.on_commit(lambda: fanout.send_control(group, revoke))


# ---------------------------------------------------------------- users

MAX_PASSWORD_CHARS = 4096  # hashing is slow on purpose: bound what it is given


def create_user(username: str, password: str) -> AbstractBaseUser:
    """The one way a user signs up, from the API and from the sign-up page: a name in
    Django's rules (at most 150 letters, digits and ``@.+-_``, nothing trimmed, so it can
    be used in a ``members/{username}/`` URL) that no user has in any letter case, and a
    password Django's validators accept. Otherwise ValidationFailed, with the messages
    by field (``username``, ``password``)."""
    user_model = get_user_model()
    problems: dict[str, list[str]] = {}
    names: list[str] = []
    if not username:
        names.append("This field may not be blank.")
    elif len(username) > 150:
        names.append("Ensure this field has no more than 150 characters.")
    else:
        try:
            UnicodeUsernameValidator()(username)
        except DjangoValidationError as exc:
            names.extend(exc.messages)
    if not names and user_model.objects.filter(username__iexact=username).exists():
        names.append("This username is taken.")
    if names:
        problems["username"] = names
    if len(password) > MAX_PASSWORD_CHARS:
        problems["password"] = [f"Ensure this field has no more than {MAX_PASSWORD_CHARS} characters."]
    else:
        try:
            validate_password(password, user_model(username=username))
        except DjangoValidationError as exc:
            problems["password"] = list(exc.messages)
    if problems:
        raise ValidationFailed(details=problems)
    try:
        with transaction.atomic():
            return user_model.objects.create_user(username=username, password=password)  # type: ignore[attr-defined,no-any-return]
    except IntegrityError:  # the same name, signed up at the same moment
        raise ValidationFailed(details={"username": ["This username is taken."]}) from None



def end_streams_of_user(user_id: int, *, deleting: bool = False) -> None:
    """The user was deactivated or is being deleted: after commit, every open stream of
    theirs ends on every process, whatever admitted it (cookie, ticket, token). The same
    control message as a member's removal, on every group their streams listen on: the
    user's own group (user-level streams) and each of their sessions' (session streams).
    Deleting them also deletes the sessions they own, so those sessions' other members
    are told ``session.deleted``, as ``delete_session`` does. Call it before a delete:
    afterwards the memberships are gone."""
    memberships = Membership.objects.filter(user_id=user_id).values_list("session_id", "role")
    targets = [groups.user_group(user_id)]
    for session_id, role in memberships:
        targets.append(groups.session_group(session_id))
        if deleting and role == Role.OWNER:
            broadcast(session_id, "session.deleted", {"session_id": session_id})

    def send() -> None:
        for group in targets:
            fanout.send_control(group, groups.UserDisabled(user_id))

    transaction.on_commit(send)
    # From a management command or script the process may exit right after the commit.
    arrange_exit_flush()


def _join_on_commit(user_id: int, session_id: str, seq: int | None) -> None:
    """Tell the user's user-level streams to follow a session they just joined, from the
    event that says so."""
    after = (seq or 1) - 1
    transaction.on_commit(
        lambda: fanout.send_control(
            groups.user_group(user_id), groups.Join(session_id=session_id, after=after)
        )
    )


# ---------------------------------------------------------------- messages


def post_message(session: Session, author: AbstractBaseUser, parts: list[dict[str, str]]) -> tuple[Message, Message]:
    """Store the user's message, mark the session busy and queue the agent's reply."""
    texts = [p["text"] for p in parts]
    if sum(len(t) for t in texts) > settings.TANDEM_MAX_MESSAGE_CHARS:
        raise PayloadTooLarge(
            f"A message may hold at most {settings.TANDEM_MAX_MESSAGE_CHARS} characters."
        )
    with transaction.atomic():
        # Lock the session row so two posts cannot both see it idle.
        locked = Session.objects.select_for_update().get(pk=session.pk)
        if locked.is_busy:
            raise SessionBusy()
        now = timezone.now()
        message = Message.objects.create(
            session=locked, role=Message.MessageRole.USER, author=author,
            status=Message.Status.COMPLETED, created_at=now, completed_at=now,
        )
        stored = Part.objects.bulk_create(
            Part(message=message, index=i, type=Part.PartType.TEXT, text=t) for i, t in enumerate(texts)
        )
        reply = Message.objects.create(
            session=locked, role=Message.MessageRole.ASSISTANT, status=Message.Status.STREAMING
        )
        ReplyRun.objects.create(message=reply, session=locked, agent=locked.agent)
        publish(locked.id, "message.created", {"message": message_data(message, stored)})
        _set_status(locked.pk, {"type": "busy"})
        publish(locked.id, "message.created", {"message": message_data(reply, [])})
        transaction.on_commit(_dispatch_runs)
    return message, reply


def _dispatch_runs() -> None:
    """A reply was queued: wake whoever runs replies. Called after the commit."""
    if settings.TANDEM_AGENT_MODE == "inline":
        if _wake_local_pool is None:
            log.error("A reply was queued but no agents pool is registered in this process")
            return
        runtime.call_soon(_wake_local_pool)
    else:
        fanout.send_control(groups.WORKERS_GROUP, groups.Wake())


# The agents layer sits above this module: in inline mode it registers how to wake this
# process's pool (sessions_app.apps), so queuing a reply does not import it.
_wake_local_pool: Callable[[], None] | None = None


def register_local_pool(wake: Callable[[], None]) -> None:
    global _wake_local_pool
    _wake_local_pool = wake


def abort(session: Session, user: AbstractBaseUser | None = None) -> bool:
    """Stop the session's reply, wherever it runs. The flag on the run row is what the
    runner checks when it starts listening, so an abort is not lost to a race with it."""
    with transaction.atomic():
        flagged = ReplyRun.objects.filter(session_id=session.pk).update(
            abort_requested=True, abort_by=user
        )
    if not flagged:
        return False
    # A reply no runner holds yet (no worker is up, say) is ended here, now.
    claimed_here = f"abort:{session.pk}"
    if ReplyRun.objects.filter(session_id=session.pk, runner="").update(runner=claimed_here):
        run = ReplyRun.objects.filter(session_id=session.pk, runner=claimed_here).first()
        if run is not None:
            finish_reply(
                session.pk, run.message_id, runner=claimed_here, status=Message.Status.CANCELLED
            )
        return True
    # The runner holding it, in whichever process, listens on the session's run group.
    fanout.send_control(groups.run_group(session.pk), groups.Abort(session.pk))
    return True


def set_session_status(session_id: str, status: dict[str, Any]) -> None:
    with transaction.atomic():
        _set_status(session_id, status)


def _set_status(session_id: str, status: dict[str, Any]) -> None:
    Session.objects.filter(pk=session_id).update(status=status)
    publish(session_id, "session.status", {"status": status})


# ---------------------------------------------------------------- runs (the runner)


def claim_runs(runner: str, limit: int) -> list[ReplyRun]:
    """Take up to ``limit`` queued replies for ``runner``. The conditional UPDATE is the
    claim: of several runners racing for a row, exactly one changes it."""
    now = timezone.now()
    lease = now + timedelta(seconds=settings.TANDEM_RUN_LEASE_SECONDS)
    claimed = []
    for run in ReplyRun.objects.filter(runner="").order_by("created_at")[:limit]:
        if ReplyRun.objects.filter(pk=run.pk, runner="").update(
            runner=runner, lease_until=lease, started_at=now
        ):
            run.runner, run.lease_until, run.started_at = runner, lease, now
            claimed.append(run)
    return claimed


def reply_counts() -> dict[str, int]:
    """Replies waiting for a runner and replies being run, across every process."""
    queued = ReplyRun.objects.filter(runner="").count()
    return {"queued": queued, "running": ReplyRun.objects.count() - queued}


def renew_leases(runner: str, message_ids: list[str]) -> tuple[set[str], set[str]]:
    """Extend the leases of the runs ``runner`` holds. Returns (runs it no longer holds,
    runs asked to abort) so the runner can stop both."""
    if not message_ids:
        return set(), set()
    lease = timezone.now() + timedelta(seconds=settings.TANDEM_RUN_LEASE_SECONDS)
    ReplyRun.objects.filter(pk__in=message_ids, runner=runner).update(lease_until=lease)
    held = dict(
        ReplyRun.objects.filter(pk__in=message_ids, runner=runner).values_list("pk", "abort_requested")
    )
    lost = set(message_ids) - set(held)
    return lost, {pk for pk, wanted in held.items() if wanted}


def abort_requested(message_id: str) -> bool:
    return ReplyRun.objects.filter(pk=message_id, abort_requested=True).exists()


def reap_expired_runs() -> int:
    """End every reply whose runner stopped renewing its lease (the process died):
    ``error`` with code ``interrupted``, the session idle. Returns how many."""
    now = timezone.now()
    expired = ReplyRun.objects.filter(lease_until__lt=now).exclude(runner="")
    return sum(_interrupt(run, lease_expired_before=now) for run in expired)


def interrupt_runs(runner: str, message_ids: list[str]) -> int:
    """A runner shutting down ends the replies it could not finish."""
    held = ReplyRun.objects.filter(pk__in=message_ids, runner=runner)
    return sum(_interrupt(run) for run in held)


def _interrupt(run: ReplyRun, lease_expired_before: Any = None) -> bool:
    # The text persisted so far (at most one coalescing interval behind) is what stays.
    text_parts = list(
        Part.objects.filter(message_id=run.message_id)
        .exclude(type=Part.PartType.TOOL)
        .values_list("id", "text")
    )
    return finish_reply(
        run.session_id, run.message_id, runner=run.runner, status=Message.Status.ERROR,
        error={"code": "interrupted", "message": "The process running this reply stopped."},
        text_parts=text_parts, lease_expired_before=lease_expired_before,
    )


def reply_context(session_id: str, message_id: str) -> dict[str, Any]:
    """What an agent sees: the session's messages before the reply."""
    history = []
    messages = (
        Message.objects.filter(session_id=session_id)
        .exclude(pk=message_id)
        .prefetch_related("parts")
    )
    for message in messages:
        text = "\n\n".join(p.text for p in message.parts.all() if p.type == Part.PartType.TEXT)
        history.append({"role": message.role, "text": text})
    return {"history": history}


def start_part(message_id: str, session_id: str, index: int, part_type: str) -> Part:
    with transaction.atomic():
        part = Part.objects.create(message_id=message_id, index=index, type=part_type, text="")
        publish(session_id, "message.part.updated", {"message_id": message_id, "part": part_data(part)})
    return part


def append_text(part_id: str, part_type: str, message_id: str, session_id: str, text: str, delta: str) -> None:
    """Persist the part's text so far and send only the delta (linear, not quadratic)."""
    with transaction.atomic():
        Part.objects.filter(pk=part_id).update(text=text)
        publish(
            session_id,
            "message.part.updated",
            {"message_id": message_id, "part": {"id": part_id, "type": part_type}, "delta": delta},
        )


def start_tool_part(
    message_id: str, session_id: str, index: int, tool: str, call_id: str, input: Any
) -> Part:
    with transaction.atomic():
        part = Part.objects.create(
            message_id=message_id, index=index, type=Part.PartType.TOOL, tool=tool,
            call_id=call_id, state={"status": "pending", "input": input},
        )
        _publish_tool_state(session_id, message_id, part)
    return part


def set_tool_state(part_id: str, session_id: str, message_id: str, state: dict[str, Any]) -> None:
    with transaction.atomic():
        part = Part.objects.get(pk=part_id)
        part.state = {"input": (part.state or {}).get("input"), **state}
        part.save(update_fields=["state"])
        _publish_tool_state(session_id, message_id, part)


def _publish_tool_state(session_id: str, message_id: str, part: Part) -> None:
    publish(session_id, "message.part.updated", {"message_id": message_id, "part": part_data(part)})
    state = part.state or {}
    props: dict[str, Any] = {
        "message_id": message_id, "call_id": part.call_id, "tool": part.tool,
        "status": state.get("status"),
    }
    for key in ("input", "output", "error"):
        if key in state:
            props[key] = state[key]
    publish(session_id, "tool.status", props)


def finish_reply(
    session_id: str,
    message_id: str,
    *,
    runner: str,
    status: str,
    error: dict[str, str] | None = None,
    text_parts: list[tuple[str, str]] = (),  # type: ignore[assignment]
    usage: dict[str, int] | None = None,
    lease_expired_before: Any = None,
) -> bool:
    """End a reply: each open part's complete state, open tools and pending permissions
    closed, then message.completed, then the session idle. Only the runner holding the
    run may end it, once; returns False when it no longer does."""
    with transaction.atomic():
        held = ReplyRun.objects.filter(pk=message_id, runner=runner)
        if lease_expired_before is not None:
            held = held.filter(lease_until__lt=lease_expired_before)
        run = held.select_related("abort_by").first()
        if run is None:
            return False
        run.delete()
        for part_id, text in text_parts:
            Part.objects.filter(pk=part_id).update(text=text)
            part = Part.objects.get(pk=part_id)
            publish(session_id, "message.part.updated", {"message_id": message_id, "part": part_data(part)})
        why = {
            Message.Status.CANCELLED: "The reply was aborted.",
            Message.Status.ERROR: (error or {}).get("message", "The reply failed."),
        }.get(status, "The reply ended.")
        open_tools = Part.objects.filter(
            message_id=message_id, type=Part.PartType.TOOL, state__status__in=["pending", "running"]
        )
        for part in open_tools:
            part.state = {"input": (part.state or {}).get("input"), "status": "error", "error": why}
            part.save(update_fields=["state"])
            _publish_tool_state(session_id, message_id, part)
        by_timeout = status != Message.Status.CANCELLED or run.abort_by is None
        _close_permissions(
            session_id, message_id, why,
            resolved_by=None if by_timeout else run.abort_by,
            status=PermissionRequest.Status.EXPIRED if by_timeout else PermissionRequest.Status.REJECTED,
        )
        fields: dict[str, Any] = {"status": status, "error": error, "completed_at": timezone.now()}
        if usage:
            fields["usage"] = usage
        Message.objects.filter(pk=message_id).update(**fields)
        props: dict[str, Any] = {"message_id": message_id, "status": status}
        if error:
            props["error"] = error
        publish(session_id, "message.completed", props)
        _set_status(session_id, {"type": "idle"})
    return True


def current_run(session_id: str) -> dict[str, Any] | None:
    """The session's reply in progress: ``queued`` until a runner claims it (then
    ``started_at`` is set), ``running`` after."""
    run = ReplyRun.objects.filter(session_id=session_id).order_by("-created_at").first()
    if run is None:
        return None
    return {
        "message_id": run.message_id,
        "state": "running" if run.runner else "queued",
        "queued_at": iso(run.created_at),
        "started_at": iso(run.started_at) if run.runner and run.started_at else None,
    }


# ---------------------------------------------------------------- permissions


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
    session: Session, permission_id: str, user: AbstractBaseUser, *, approved: bool, reason: str | None
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


def _close_permissions(
    session_id: str, message_id: str, reason: str, *, resolved_by: Any, status: str
) -> None:
    pending = PermissionRequest.objects.filter(
        message_id=message_id, status=PermissionRequest.Status.PENDING
    )
    for permission in pending.select_for_update():
        permission.status = status
        permission.approved = False
        permission.reason = reason
        permission.resolved_by = resolved_by
        permission.resolved_by_timeout = resolved_by is None
        permission.resolved_at = timezone.now()
        permission.save()
        _publish_resolution(permission, notify=False)


def _publish_resolution(permission: PermissionRequest, *, notify: bool = True) -> None:
    publish(
        permission.session_id,
        "permission.resolved",
        {
            "permission_id": permission.id,
            "approved": bool(permission.approved),
            "reason": permission.reason,
            "resolved_by": resolver_data(permission),
        },
    )
    if notify:
        group = groups.run_group(permission.session_id)
        answered = groups.PermissionAnswered(permission.id)
        transaction.on_commit(lambda: fanout.send_control(group, answered))
