"""Who may see and do what. Outsiders get 404, never 403, so ids leak nothing."""
from __future__ import annotations

from typing import Any

from django.db import connection

from project.errors import NotFound, PermissionDenied
from sessions_app.models import ROLE_RANK, ApiKey, Membership, Role, Session


def _check_id(user: Any, session_id: str) -> None:
    if not user or not user.is_authenticated or len(session_id) > 32:
        raise NotFound()
    # Ids are printable ASCII; anything else (a NUL above all, which PostgreSQL refuses
    # with an error) cannot name a session.
    if not session_id.isascii() or not session_id.isprintable():
        raise NotFound()


def _check_role(role: str, need: str) -> None:
    if ROLE_RANK[role] < ROLE_RANK[need]:
        raise PermissionDenied(f"This needs the {need} role; you are a {role}.")


def session_for(user: Any, session_id: str, need: str = Role.VIEWER) -> tuple[Session, str]:
    """The session and the caller's role, if the caller's role is at least ``need``."""
    _check_id(user, session_id)
    membership = (
        Membership.objects.select_related("session", "session__owner")
        .filter(session_id=session_id, user=user)
        .first()
    )
    if membership is None:
        raise NotFound()
    _check_role(membership.role, need)
    return membership.session, membership.role


def role_in(user: Any, session_id: str, need: str = Role.VIEWER) -> str:
    """``session_for`` without loading the session (one small query): for the services
    that read the session themselves, under its row lock (posting a message)."""
    _check_id(user, session_id)
    # A plain statement: every post pays for it (the ORM's query building cost more than
    # the query).
    table = connection.ops.quote_name(Membership._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT role FROM {table} WHERE session_id = %s AND user_id = %s", [session_id, user.pk])
        found = cursor.fetchone()
    if found is None:
        raise NotFound()
    _check_role(found[0], need)
    return str(found[0])


def check_member(user: Any, session_id: str) -> None:
    """NotFound unless the user is a member: ``session_for`` without loading anything,
    for streams, which open often and only need the answer."""
    if not user or not user.is_authenticated or len(session_id) > 32:
        raise NotFound()
    if not session_id.isascii() or not session_id.isprintable():
        raise NotFound()
    if not Membership.objects.filter(session_id=session_id, user=user).exists():
        raise NotFound()


def member_session_ids(user_id: int) -> list[str]:
    return list(Membership.objects.filter(user_id=user_id).values_list("session_id", flat=True))


IN_LIST_MAX = 500  # ids in one IN (...) of a batched lookup


def live_key_digests(digests: set[str]) -> set[str]:
    """Which of the API key digests asked about still name a key (not revoked)."""
    found: set[str] = set()
    ordered = sorted(digests)
    for i in range(0, len(ordered), IN_LIST_MAX):
        found |= set(ApiKey.objects.filter(digest__in=ordered[i:i + IN_LIST_MAX]).values_list("digest", flat=True))
    return found


def member_pairs(asked: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Which of the (user id, session id) pairs asked about are memberships: one query
    for a whole batch of opening streams."""
    if not asked:
        return set()
    users, sessions = {u for u, _ in asked}, {s for _, s in asked}
    rows = Membership.objects.filter(user_id__in=users)
    if len(sessions) <= IN_LIST_MAX:
        rows = rows.filter(session_id__in=sessions)
    # else every membership of those users (user-level streams of many sessions): a
    # bounded read rather than a statement with too many parameters.
    return set(rows.values_list("user_id", "session_id")) & asked


def sessions_of_users(user_ids: set[int]) -> dict[int, list[str]]:
    """``member_session_ids`` of many users in one query."""
    out: dict[int, list[str]] = {}
    if user_ids:
        for user_id, session_id in Membership.objects.filter(user_id__in=user_ids).values_list(
            "user_id", "session_id"
        ):
            out.setdefault(user_id, []).append(session_id)
    return out


def role_of(user_id: int, session_id: str) -> str | None:
    """The user's role in the session, or None when not a member."""
    if len(session_id) > 32 or not session_id.isascii() or not session_id.isprintable():
        return None
    found: str | None = (
        Membership.objects.filter(session_id=session_id, user_id=user_id).values_list("role", flat=True).first()
    )
    return found
