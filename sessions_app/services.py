"""Every state change of sessions, members, users and messages; the run queue is in
``runs`` and permission requests in ``permissions``. Views and consumers call these;
nothing else writes these tables or publishes their events. Events are published inside
the transaction and leave the process only after it commits."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from events_app import fanout, groups
from events_app.services import arrange_exit_flush, broadcast, publish
from project import sql
from project.errors import (
    BadRequest,
    Conflict,
    NotFound,
    NotLatest,
    NotQueued,
    PayloadTooLarge,
    PermissionDenied,
    QueueFull,
    SessionBusy,
    ValidationFailed,
)

# The run queue (sessions_app.runs) and permission requests (sessions_app.permissions)
# have modules of their own; the agents' runner and pool still call them as services.X.
from sessions_app.keys import create_api_key as create_api_key
from sessions_app.keys import list_api_keys as list_api_keys
from sessions_app.keys import revoke_api_key as revoke_api_key
from sessions_app.models import Membership, Message, Part, PermissionRequest, ReplyRun, Role, Session
from sessions_app.permissions import expire_permission as expire_permission
from sessions_app.permissions import permission_state as permission_state
from sessions_app.permissions import request_permission as request_permission
from sessions_app.runs import TextWrite as TextWrite
from sessions_app.runs import claim_runs as claim_runs
from sessions_app.runs import finish_reply as finish_reply
from sessions_app.runs import interrupt_runs as interrupt_runs
from sessions_app.runs import lock_session, new_reply, queue_reply, queued_count
from sessions_app.runs import reap_expired_runs as reap_expired_runs
from sessions_app.runs import renew_leases as renew_leases
from sessions_app.runs import reply_context as reply_context
from sessions_app.runs import reply_counts as reply_counts
from sessions_app.runs import set_session_status as set_session_status
from sessions_app.runs import set_tool_state as set_tool_state
from sessions_app.runs import start_tool_part as start_tool_part
from sessions_app.runs import write_parts as write_parts
from sessions_app.serializers import (
    member_data,
    message_data,
    permission_data,
    session_data,
    user_data,
)

# ---------------------------------------------------------------- sessions


def create_session(owner: User, *, title: str, agent: str) -> Session:
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


def create_user(username: str, password: str) -> User:
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
            return User.objects.create_user(username=username, password=password)
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


@dataclass(frozen=True)
class Posted:
    """What posting a message did: the message, and either its reply (answered now) or
    its place in the queue (1 = next)."""

    message: Message
    reply: Message | None = None
    position: int | None = None
    # The message as its ``message.created`` event shows it: the answer shows the same.
    data: dict[str, Any] | None = None


TITLE_CHARS = 60


def title_from(text: str) -> str:
    """A session's automatic title: the first message's words, on one line, at most
    ``TITLE_CHARS`` characters (cut at a word when one ends near the limit)."""
    words = " ".join(text.split())
    if len(words) <= TITLE_CHARS:
        return words
    cut = words[: TITLE_CHARS - 1]
    space = cut.rfind(" ")
    if space >= TITLE_CHARS // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


def post_message(
    session_id: str, author: User, parts: list[dict[str, str]], if_busy: str = "queue"
) -> Posted:
    """Store the user's message. An idle session marks itself busy and queues the agent's
    reply; while a reply runs (or messages wait), ``if_busy`` says what happens: ``queue``
    the message behind the others, ``reject`` it, or ``interrupt`` the reply and answer
    this message next."""
    texts = [p["text"] for p in parts]
    if sum(len(t) for t in texts) > settings.TANDEM_MAX_MESSAGE_CHARS:
        raise PayloadTooLarge(
            f"A message may hold at most {settings.TANDEM_MAX_MESSAGE_CHARS} characters."
        )
    with transaction.atomic():
        # The session's row lock orders this post against the others and against the
        # reply ending (which takes the next queued message), across processes.
        locked = lock_session(session_id)
        if locked is None:
            raise NotFound("No such session.")
        # A statement of its own, after the lock: it sees every post and every end of a
        # reply that committed while this one waited for the lock (runs.lock_session).
        queued = queued_count(locked.pk)
        now = timezone.now()
        if not locked.is_busy and not queued:
            events: list[tuple[str, dict[str, Any]]] = []
            if not locked.title and not Message.objects.filter(session=locked).exists():
                locked.title = title_from(texts[0])
                locked.save(update_fields=["title", "updated_at"])
                events.append(("session.updated", {"session": session_data(locked)}))
            # The message and its reply in one INSERT; the post's events and the reply's
            # start in one batch (one seq statement).
            reply = new_reply(locked.pk, after=now)
            message, created = _store_message(
                locked, author, texts, Message.Status.COMPLETED, now, now, also=reply
            )
            queue_reply(locked.pk, after=now, agent=locked.agent, first=[*events, created], reply=reply)
            return Posted(message, reply=reply, data=created[1]["message"])
        if if_busy == "reject":
            raise SessionBusy()
        if queued >= settings.TANDEM_MAX_QUEUED:
            raise QueueFull(
                f"At most {settings.TANDEM_MAX_QUEUED} messages may wait in a session.",
                details={"max_queued": settings.TANDEM_MAX_QUEUED},
            )
        turn, position = now, queued + 1
        interrupted: list[str] = []
        if if_busy == "interrupt":
            waiting = Message.objects.filter(session=locked, status=Message.Status.QUEUED)
            first = waiting.order_by("turn_at", "id").values_list("turn_at", flat=True).first()
            if first is not None and first <= now:
                turn = first - timedelta(microseconds=1)
            position = 1
            # Flagged under the session's lock, so it is the reply running now that is
            # aborted, never the one this message's turn starts.
            interrupted = list(ReplyRun.objects.filter(session=locked).values_list("pk", flat=True))
            ReplyRun.objects.filter(pk__in=interrupted).update(abort_requested=True, abort_by=author)
        message, created = _store_message(locked, author, texts, Message.Status.QUEUED, now, turn)
        publish(locked.id, *created)
        data = created[1]["message"]
    if interrupted:
        # After the commit: the reply's end takes the next queued message, this one.
        _stop_flagged(session_id, only=interrupted)
    return Posted(message, position=position, data=data)


def _store_message(
    session: Session, author: User, texts: list[str], status: str, now: Any, turn: Any,
    also: Message | None = None,
) -> tuple[Message, tuple[str, dict[str, Any]]]:
    """The user's message and its parts, and its ``message.created`` for the caller to
    publish (alone, or in one batch with the reply it starts). ``also``: a message saved
    in the same ``INSERT`` (the reply)."""
    message = Message(
        session=session, role=Message.MessageRole.USER, author=author, status=status,
        created_at=now, turn_at=turn, completed_at=None if status == Message.Status.QUEUED else now,
    )
    sql.insert([message] if also is None else [message, also])
    stored = [Part(message=message, index=i, type=Part.PartType.TEXT, text=t) for i, t in enumerate(texts)]
    sql.insert(stored)
    return message, ("message.created", {"message": message_data(message, stored)})


def withdraw_message(session: Session, user: User | None, role: str, message_id: str) -> None:
    """Take a queued message out of the queue: its author or an owner (``user`` None: the
    site's admin, acting as an owner)."""
    with transaction.atomic():
        lock_session(session.pk)
        message = Message.objects.filter(session=session, pk=message_id).first()
        if message is None:
            raise NotFound("No such message in this session.")
        if role != Role.OWNER and (user is None or message.author_id != user.pk):
            raise PermissionDenied("Only its author or an owner can withdraw a message.")
        if message.status != Message.Status.QUEUED:
            raise NotQueued()
        message.delete()
        publish(session.id, "message.removed", {"message_id": message_id})


def retry_reply(session: Session, message_id: str) -> Message:
    """A new reply to the message the session's latest reply answered; the old reply
    stays, marked ``superseded_by`` the new one."""
    with transaction.atomic():
        locked = lock_session(session.pk)
        if locked is None:
            raise NotFound("No such session.")
        old = Message.objects.filter(session=locked, pk=message_id).first()
        if old is None:
            raise NotFound("No such message in this session.")
        if old.role != Message.MessageRole.ASSISTANT:
            raise BadRequest(
                "Only a reply can be retried; this is a user's message.",
                details={"message_id": ["Not an assistant message."]},
            )
        if locked.is_busy or Message.objects.filter(session=locked, status=Message.Status.QUEUED).exists():
            raise SessionBusy("A reply is running or messages are waiting in this session.")
        latest = (
            Message.objects.filter(session=locked, role=Message.MessageRole.ASSISTANT)
            .order_by("-turn_at", "-id")
            .values_list("pk", flat=True)
            .first()
        )
        if latest != old.pk:
            raise NotLatest()
        reply = queue_reply(locked.pk, after=timezone.now())
        Message.objects.filter(pk=old.pk).update(superseded_by=reply)
        publish(
            locked.id, "message.updated",
            {"message_id": old.pk, "status": old.status, "superseded_by": reply.pk},
        )
    return reply


def messages_before(session: Session, before: str | None, limit: int) -> tuple[list[Message], bool]:
    """A backward page of the conversation: the ``limit`` messages whose turns come just
    before message ``before`` (None: the end, and then the queue follows them), oldest
    first, and whether earlier ones exist. Clients open on the latest page and read back
    on demand, instead of reading the whole history forward."""
    listed = Message.objects.filter(session=session).select_related("author").prefetch_related("parts")
    ended = listed.exclude(status=Message.Status.QUEUED)
    if before is not None:
        anchor = ended.filter(pk=before).values_list("turn_at", "id").first()
        if anchor is None:
            raise ValidationFailed(
                "`before` is not a message of this session that has taken its turn.",
                details={"before": ["No such message in this session (a queued one has no place yet)."]},
            )
        turn_at, anchor_id = anchor
        ended = ended.filter(Q(turn_at__lt=turn_at) | Q(turn_at=turn_at, id__lt=anchor_id))
    rows = list(ended.order_by("-turn_at", "-id")[: limit + 1])
    page = rows[:limit][::-1]
    if before is None:
        page += listed.filter(status=Message.Status.QUEUED).order_by("turn_at", "id")
    return page, len(rows) > limit


def abort(session: Session, user: User | None = None) -> bool:
    """Stop the session's reply, wherever it runs. The flag on the run row is what a
    claim returns and a lease renewal reads, so an abort is not lost to a race with the
    claim or to a lost message."""
    with transaction.atomic():
        flagged = ReplyRun.objects.filter(session_id=session.pk).update(
            abort_requested=True, abort_by=user
        )
    if not flagged:
        return False
    _stop_flagged(session.pk)
    return True


def _stop_flagged(session_id: str, only: list[str] | None = None) -> None:
    """Make the flagged runs (of ``only``, when given) stop now rather than at their
    runner's next lease renewal."""
    runs = ReplyRun.objects.filter(session_id=session_id, abort_requested=True)
    if only is not None:
        runs = runs.filter(pk__in=only)
    # A reply no runner holds yet (no worker is up, say) is ended here, now.
    claimed_here = f"abort:{session_id}"
    if runs.filter(runner="").update(runner=claimed_here):
        run = ReplyRun.objects.filter(session_id=session_id, runner=claimed_here).first()
        if run is not None:
            finish_reply(session_id, run.message_id, runner=claimed_here, status=Message.Status.CANCELLED)
        return
    # The pool holding it, in whichever process, listens on its own group. If the message
    # is lost (Redis away) or lands before the pool has read its claim, the pool's lease
    # renewal finds the flag all the same.
    for message_id, runner in runs.exclude(runner="").values_list("message_id", "runner"):
        fanout.send_control(groups.pool_group(runner), groups.Abort(message_id))


# ---------------------------------------------------------------- fork and export

ENDED = (Message.Status.COMPLETED, Message.Status.CANCELLED, Message.Status.ERROR)


def fork_session(source: Session, owner: User, *, message_id: str | None, title: str | None) -> Session:
    """A new session owned by ``owner``, same agent, holding copies (new ids, same times,
    authors, statuses and parts) of ``source``'s messages up to and including
    ``message_id``, or of every ended message. Its log starts like any session's,
    ``session.created`` (carrying ``forked_from``), then one ``message.created`` per copy,
    each complete with its parts, so a client replaying the log sees the conversation.
    Permission requests are not copied."""
    messages = Message.objects.filter(session=source).select_related("author").prefetch_related("parts")
    if message_id is not None:
        target = Message.objects.filter(session=source, pk=message_id).first()
        if target is None:
            raise NotFound("No such message in this session.")
        if target.status not in ENDED:
            raise Conflict("That message is still streaming; fork from it once it has ended.")
        before = Q(turn_at__lt=target.turn_at) | Q(turn_at=target.turn_at, id__lte=target.id)
        originals = [m for m in messages.filter(before) if m.status in ENDED]
    else:
        originals = [m for m in messages if m.status in ENDED]
    with transaction.atomic():
        session = Session.objects.create(
            owner=owner,
            title=source.title if title is None else title,
            agent=source.agent,
            forked_from_session_id=source.id,
            forked_from_message_id=originals[-1].id if originals else "",
        )
        Membership.objects.create(session=session, user=owner, role=Role.OWNER)
        frame = publish(session.id, "session.created", {"session": session_data(session)})
        # The copies keep their original times; the listing orders by (turn_at, id) and
        # new ids are random, so equal turns are nudged apart to keep the order.
        copies: list[tuple[Message, list[Part]]] = []
        previous = None
        for original in originals:
            turn = original.turn_at
            if previous is not None and turn <= previous:
                turn = previous + timedelta(microseconds=1)
            previous = turn
            copy = Message(
                session=session, role=original.role, author=original.author, status=original.status,
                error=original.error, usage=original.usage, created_at=original.created_at,
                turn_at=turn, completed_at=original.completed_at,
            )
            parts = [
                Part(
                    message=copy, index=p.index, type=p.type, text=p.text, tool=p.tool,
                    call_id=p.call_id, state=p.state,
                )
                for p in original.parts.all()
            ]
            copies.append((copy, parts))
        Message.objects.bulk_create([m for m, _ in copies])
        Part.objects.bulk_create([p for _, parts in copies for p in parts])
        for copy, parts in copies:
            publish(session.id, "message.created", {"message": message_data(copy, parts)})
        _join_on_commit(owner.pk, session.id, frame.seq)
    session.refresh_from_db()
    return session


def export_data(session: Session, role: str) -> dict[str, Any]:
    """The whole session as JSON: the Session (with the caller's role), members, messages
    with their parts, and permission requests, all in their REST shapes."""
    members = Membership.objects.filter(session=session).select_related("user").order_by("created_at")
    messages = Message.objects.filter(session=session).select_related("author").prefetch_related("parts")
    found = PermissionRequest.objects.filter(session=session).select_related("resolved_by")
    return {
        "session": session_data(session, role),
        "members": [member_data(m) for m in members],
        "messages": [message_data(m) for m in messages],
        "permissions": [permission_data(p) for p in found],
    }


def export_markdown(data: dict[str, Any]) -> str:
    """A readable transcript of ``export_data``'s result. Message text is Markdown already
    and is kept as written; the headings around it are ours."""
    session = data["session"]
    lines = [f"# {_one_line(session['title']) or 'Untitled session'}", ""]
    lines.append(f"- Session: `{session['id']}`")
    lines.append(f"- Agent: {session['agent']}")
    lines.append(f"- Created: {session['created_at']}")
    if session.get("forked_from"):
        fork = session["forked_from"]
        lines.append(f"- Forked from: `{fork['session_id']}` at message `{fork['message_id']}`")
    members = ", ".join(f"{m['user']['username']} ({m['role']})" for m in data["members"])
    lines.append(f"- Members: {members}")
    by_message: dict[str, list[dict[str, Any]]] = {}
    for permission in data["permissions"]:
        by_message.setdefault(permission["message_id"], []).append(permission)
    for message in data["messages"]:
        who = (
            message["author"]["username"] if message["role"] == "user" and message["author"]
            else "assistant" if message["role"] == "assistant" else "(deleted user)"
        )
        status = "" if message["status"] == "completed" else f" — {message['status']}"
        lines += ["", "---", "", f"## {who} · {message['created_at']}{status}", ""]
        for part in message["parts"]:
            if part["type"] == "text":
                lines += [part["text"], ""]
            elif part["type"] == "reasoning":
                lines += ["> " + line for line in part["text"].splitlines() or [""]]
                lines.append("")
            else:
                state = part.get("state") or {}
                lines.append(f"**Tool `{part['tool']}`** ({state.get('status', '?')})")
                lines += ["", "```json", _json(state.get("input")), "```", ""]
                if "output" in state:
                    lines += ["Output:", "", "```json", _json(state["output"]), "```", ""]
                if state.get("error"):
                    lines += [f"Error: {_one_line(state['error'])}", ""]
        for permission in by_message.get(message["id"], []):
            lines.append(f"*Permission for `{permission['tool']}`: {permission['status']}*")
            lines.append("")
        if message.get("error"):
            lines += [f"*Error ({message['error'].get('code')}): {_one_line(str(message['error'].get('message', '')))}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _json(value: Any) -> str:
    # Inside a fenced block a line of three backticks would end the fence early.
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode().replace("```", "`\u200b``")
