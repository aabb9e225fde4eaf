"""API keys: long-lived credentials a user makes for programs (an MCP client's
configuration, a script), sent as ``Authorization: Bearer tdm_…``. A key is 32 random
bytes; only its SHA-256 is stored (a key that random needs no slow hash: it cannot be
guessed, only stolen, and the digest is useless to whoever steals the table). It is shown
once, when it is made, and revoked by deleting it."""
from __future__ import annotations

import secrets
from datetime import timedelta

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from events_app import fanout, groups
from project.auth import API_KEY_PREFIX, key_digest
from project.errors import Conflict, NotFound
from sessions_app.access import member_session_ids
from sessions_app.models import ApiKey, new_id

# Keys one user may hold at once: enough for every machine and tool, and a bound on
# what a stolen session could mint.
MAX_KEYS_PER_USER = 50
# How exactly a key's last use is kept: a script sending a request a second writes its
# row once a minute, not every second.
LAST_USED_PRECISION = timedelta(minutes=1)


def create_api_key(user: User, name: str) -> tuple[ApiKey, str]:
    """A new key for ``user``: the stored row, and the key itself (never stored)."""
    raw = API_KEY_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        # The user's row locked: two requests at once cannot both take the last place.
        list(User.objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True))
        if ApiKey.objects.filter(user=user).count() >= MAX_KEYS_PER_USER:
            raise Conflict(f"At most {MAX_KEYS_PER_USER} API keys per user: delete one first.")
        key = ApiKey.objects.create(
            id=new_id("key"), user=user, name=name, prefix=raw[: len(API_KEY_PREFIX) + 6], digest=key_digest(raw)
        )
    return key, raw


def list_api_keys(user: User) -> list[ApiKey]:
    return list(ApiKey.objects.filter(user=user))


def revoke_api_key(user: User, key_id: str) -> None:
    """Delete one of ``user``'s keys; another user's key is as unknown as no key. After
    the commit, every stream the key opened ends, on every process: through the user's
    own group (user-level streams) and each of their sessions' (session streams and
    document sockets), the groups ``end_streams_of_user`` tells. A stream opening at that
    moment is refused by its recheck (``events_app.streams``), which finds the key gone."""
    with transaction.atomic():
        digest = ApiKey.objects.filter(user=user, pk=key_id).values_list("digest", flat=True).first()
        if digest is None:
            raise NotFound("No such API key.")
        ApiKey.objects.filter(pk=key_id).delete()
        targets = [groups.user_group(user.pk)]
        targets += [groups.session_group(session_id) for session_id in member_session_ids(user.pk)]
        revoked = groups.KeyRevoked(user.pk, digest)

        def send() -> None:
            for group in targets:
                fanout.send_control(group, revoked)

        transaction.on_commit(send)


def key_owner(raw: str) -> User | None:
    """The active user whose key ``raw`` is, or None (``project.auth.user_for_key``)."""
    key = ApiKey.objects.select_related("user").filter(digest=key_digest(raw)).first()
    if key is None or not key.user.is_active:
        return None
    now = timezone.now()
    if key.last_used_at is None or key.last_used_at <= now - LAST_USED_PRECISION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    return key.user
