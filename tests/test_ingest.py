"""External agent services publishing into sessions: the synchronous Python API
(``events_app.publishing``) and the Redis pub/sub bridge (``events_app.ingest`` and
``manage.py ingest_redis``), against the real Redis.

alice owns the shared session, bob edits it (and is the bridge's service user unless a
test says otherwise), carol only views it, charlie is an outsider with a session of his
own. Every test subscribes with a pattern of its own, so runs never hear each other.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from channels.db import database_sync_to_async
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.core.management import CommandError, call_command

from events_app import groups
from events_app.ingest import RedisIngest
from events_app.models import Event
from events_app.publishing import publish_event, publish_json
from project.errors import NotFound, PayloadTooLarge, PermissionDenied, ValidationFailed
from sessions_app.models import Session
from tests.conftest import REDIS_URL, ROOT, _require_redis, free_port, wait_until
from tests.conftest import test_database_url as database_url

PROGRESS = {"type": "task.progress", "properties": {"done": 3, "of": 10}}


def unique_prefix() -> str:
    return f"tandem:test:{uuid.uuid4().hex[:12]}:"


def head(session_id: str) -> int:
    return Session.objects.values_list("last_seq", flat=True).get(pk=session_id)


def stored(session_id: str) -> list[dict[str, Any]]:
    rows = Event.objects.filter(session_id=session_id).order_by("seq")
    return [orjson.loads(envelope) for envelope in rows.values_list("envelope", flat=True)]


ahead = database_sync_to_async(head)
astored = database_sync_to_async(stored)


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await asyncio.sleep(0.01)


async def deliver(client: aioredis.Redis, channel: str, payload: bytes | str, timeout: float = 10.0) -> None:
    """PUBLISH until a subscriber got it: PUBLISH answers how many received the message,
    so this waits for the bridge's (re)subscription without losing or doubling a copy."""
    async with asyncio.timeout(timeout):
        while await client.publish(channel, payload) < 1:  # noqa: ASYNC110 - polls Redis, no local state to wait on
            await asyncio.sleep(0.02)


def rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if r.name == "events_app.ingest" and r.levelname == "WARNING" and "Rejected" in r.getMessage()
    ]


class Bridges:
    """Starts bridges in the test's loop; stops each at teardown and checks it stopped."""

    def __init__(self) -> None:
        self.running: list[tuple[RedisIngest, asyncio.Task[Any]]] = []

    async def start(self, user: str = "bob", *, redis_url: str = REDIS_URL, wait: bool = True,
                    **options: Any) -> tuple[RedisIngest, str]:
        prefix = unique_prefix()
        bridge = RedisIngest(redis_url, prefix + "*", user, **options)
        task = asyncio.get_running_loop().create_task(bridge.run())
        self.running.append((bridge, task))
        if wait:
            await asyncio.wait_for(bridge.subscribed.wait(), 5)
        return bridge, prefix

    async def stop_all(self) -> None:
        for bridge, task in self.running:
            bridge.stop.set()
            await asyncio.wait_for(task, 5)  # stops promptly, without being cancelled


@pytest.fixture
async def bridges() -> AsyncIterator[Bridges]:
    _require_redis()
    started = Bridges()
    yield started
    await started.stop_all()


@pytest.fixture
async def rds() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
def outsider_session(charlie: Any) -> Any:
    from sessions_app import services

    return services.create_session(charlie, title="Charlie's own", agent="echo")


# ---------------------------------------------------------------- the Redis bridge

@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_a_valid_message_is_published_with_the_next_seq_on_behalf_of_the_service_user(
    bridges: Bridges, rds: aioredis.Redis, shared_session: Any, bob: Any
) -> None:
    sid = shared_session.id
    before = await ahead(sid)
    bridge, prefix = await bridges.start("bob")

    await deliver(rds, prefix + sid, orjson.dumps(PROGRESS))
    await eventually(lambda: bridge.stats.published == 1)

    event = (await astored(sid))[-1]
    assert event["seq"] == before + 1 == await ahead(sid)
    assert event["type"] == "task.progress"
    assert event["properties"] == {"done": 3, "of": 10, "published_by": {"id": bob.pk, "username": "bob"}}
    assert (bridge.stats.received, bridge.stats.rejected, bridge.stats.failed) == (1, 0, 0)


BIG = "x" * 70_000
BAD_MESSAGES = [
    # (id, payload, which session's channel, the rejection's error code)
    ("bad-json", b'{"type": "task.progress", "properties": {', "shared", "bad_request"),
    ("not-utf8", b"\xff\xfe{}", "shared", "bad_request"),
    ("not-an-object", b'["task.progress", {}]', "shared", "bad_request"),
    ("nan", b'{"type": "task.progress", "properties": {"x": NaN}}', "shared", "bad_request"),
    ("missing-type", b'{"properties": {}}', "shared", "validation_error"),
    ("missing-properties", b'{"type": "task.progress"}', "shared", "validation_error"),
    ("extra-field", b'{"type": "task.progress", "properties": {}, "seq": 9}', "shared", "validation_error"),
    ("type-not-a-string", b'{"type": 42, "properties": {}}', "shared", "validation_error"),
    ("properties-not-an-object", b'{"type": "task.progress", "properties": [1]}', "shared", "validation_error"),
    ("reserved-type", b'{"type": "message.created", "properties": {}}', "shared", "validation_error"),
    ("bad-type-pattern", b'{"type": "Task Progress", "properties": {}}', "shared", "validation_error"),
    ("forged-publisher", b'{"type": "task.progress", "properties": {"published_by": "alice"}}',
     "shared", "validation_error"),
    ("oversized", orjson.dumps({"type": "task.progress", "properties": {"blob": BIG}}), "shared",
     "payload_too_large"),
    ("unknown-session", orjson.dumps(PROGRESS), "unknown", "not_found"),
    ("not-a-member", orjson.dumps(PROGRESS), "outsider", "not_found"),
]


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("payload", "target", "code"), [c[1:] for c in BAD_MESSAGES],
                         ids=[c[0] for c in BAD_MESSAGES])
async def test_a_bad_message_is_counted_logged_and_the_bridge_keeps_going(
    bridges: Bridges, rds: aioredis.Redis, shared_session: Any, outsider_session: Any,
    caplog: pytest.LogCaptureFixture, payload: bytes, target: str, code: str,
) -> None:
    sid = shared_session.id
    target_id = {"shared": sid, "unknown": "ses_doesnotexist0000", "outsider": outsider_session.id}[target]
    before, outsider_before = await ahead(sid), await ahead(outsider_session.id)
    bridge, prefix = await bridges.start("bob")

    await deliver(rds, prefix + target_id, payload)
    await eventually(lambda: bridge.stats.rejected == 1)
    await deliver(rds, prefix + sid, orjson.dumps(PROGRESS))
    await eventually(lambda: bridge.stats.published == 1)

    assert (bridge.stats.received, bridge.stats.failed) == (2, 0)
    assert bridge.stats.reasons == {code: 1}
    [logged] = rejections(caplog)
    assert prefix + target_id in logged and code in logged
    assert len(logged) < 1000  # a preview of the payload, never all of it
    assert [e["seq"] for e in await astored(sid) if e["seq"] > before] == [before + 1]
    assert (await astored(sid))[-1]["type"] == "task.progress"
    assert await ahead(outsider_session.id) == outsider_before


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_bad_json_is_counted_and_the_bridge_keeps_going(
    bridges: Bridges, rds: aioredis.Redis, shared_session: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Many bad messages in a row, then good ones: every one is accounted for, in order."""
    sid = shared_session.id
    before = await ahead(sid)
    bridge, prefix = await bridges.start("bob")
    for i in range(20):
        await deliver(rds, prefix + sid, b"{not json" if i % 2 else orjson.dumps({"type": "task.progress", "properties": {"i": i}}))
    await eventually(lambda: bridge.stats.handled == 20)

    assert (bridge.stats.published, bridge.stats.rejected) == (10, 10)
    assert len(rejections(caplog)) == 10
    events = [e for e in await astored(sid) if e["seq"] > before]
    assert [e["properties"]["i"] for e in events] == list(range(0, 20, 2))
    assert [e["seq"] for e in events] == list(range(before + 1, before + 11))


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_a_service_user_who_only_views_the_session_is_refused(
    bridges: Bridges, rds: aioredis.Redis, shared_session: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sid = shared_session.id
    before = await ahead(sid)
    bridge, prefix = await bridges.start("carol")

    await deliver(rds, prefix + sid, orjson.dumps(PROGRESS))
    await eventually(lambda: bridge.stats.rejected == 1)

    assert bridge.stats.reasons == {"permission_denied": 1}
    assert "permission_denied" in rejections(caplog)[0]
    assert await ahead(sid) == before


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_the_bridge_subscribes_again_after_redis_drops_its_connection(
    bridges: Bridges, rds: aioredis.Redis, shared_session: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sid = shared_session.id
    name = f"tandem-ingest-test-{uuid.uuid4().hex[:8]}"
    bridge, prefix = await bridges.start("bob", client_name=name)
    await deliver(rds, prefix + sid, orjson.dumps({"type": "task.progress", "properties": {"n": 1}}))
    await eventually(lambda: bridge.stats.published == 1)

    # Kill only this bridge's connection (the Redis server is shared with other runs).
    [client] = [c for c in await rds.client_list() if c.get("name") == name]
    assert await rds.client_kill_filter(_id=client["id"]) == 1
    await eventually(lambda: bridge.stats.connections == 2, timeout=10)
    await deliver(rds, prefix + sid, orjson.dumps({"type": "task.progress", "properties": {"n": 2}}))
    await eventually(lambda: bridge.stats.published == 2)

    assert [e["properties"]["n"] for e in (await astored(sid))[-2:]] == [1, 2]
    assert any("lost or refused" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert (bridge.stats.rejected, bridge.stats.failed) == (0, 0)


@pytest.mark.redis
async def test_the_bridge_backs_off_doubling_to_its_cap_while_redis_is_unreachable_until_stopped(
    bridges: Bridges, caplog: pytest.LogCaptureFixture
) -> None:
    def retry_delays() -> list[str]:
        return [r.getMessage().rsplit("retrying in ", 1)[1] for r in caplog.records
                if r.name == "events_app.ingest" and "retrying in" in r.getMessage()]

    bridge, _ = await bridges.start(
        "bob", redis_url=f"redis://127.0.0.1:{free_port()}/0", wait=False,
        backoff_initial=0.01, backoff_max=0.04,
    )
    await eventually(lambda: len(retry_delays()) >= 5)
    assert retry_delays()[:5] == ["0.01 s", "0.02 s", "0.04 s", "0.04 s", "0.04 s"]
    assert bridge.stats.connections == 0

    bridge.stop.set()
    task = bridges.running[-1][1]
    await asyncio.wait_for(task, 2)
    assert task.result() is bridge.stats


# ---------------------------------------------------------------- manage.py ingest_redis


def command_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TANDEM_INGEST_USER")}
    env.update(DATABASE_URL=database_url(), DJANGO_SETTINGS_MODULE="project.settings",
               PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_ingest_redis_command_publishes_until_sigterm_then_exits_0_logging_its_counts(
    shared_session: Any, bob: Any, tmp_path: Path
) -> None:
    _require_redis()
    sid = shared_session.id
    before = head(sid)
    prefix = unique_prefix()
    log_path = tmp_path / "ingest.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "ingest_redis", "--pattern", prefix + "*", "--redis-url", REDIS_URL],
            cwd=ROOT, env=command_env(TANDEM_INGEST_USER="bob"), stdout=out, stderr=subprocess.STDOUT,
        )
    client = redis.Redis.from_url(REDIS_URL)
    try:
        wait_until(lambda: proc.poll() is not None or client.publish(prefix + sid, b"not json") >= 1, timeout=30)
        assert proc.poll() is None, log_path.read_text()
        assert client.publish(prefix + sid, orjson.dumps(PROGRESS)) == 1
        wait_until(lambda: head(sid) == before + 1, timeout=10)
        event = stored(sid)[-1]
        assert event["type"] == "task.progress"
        assert event["properties"]["published_by"] == {"id": bob.pk, "username": "bob"}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log_path.read_text()
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert f"Rejected a message on {prefix}{sid}: bad_request" in log
    assert "ingest_redis stopped: received=2 published=1 rejected=1 failed=0" in log


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"user": "bob"}, "No Redis to subscribe to"),
        ({"redis_url": REDIS_URL}, "No service user"),
        ({"redis_url": REDIS_URL, "user": "nobody"}, "No active user named 'nobody'"),
        ({"redis_url": REDIS_URL, "user": "bob", "pattern": "tandem:*:ingest"}, "fixed prefix followed by '*'"),
    ],
    ids=["no-redis-url", "no-user", "unknown-user", "bad-pattern"],
)
def test_the_ingest_redis_command_refuses_to_start_without_what_it_needs(
    bob: Any, settings: Any, monkeypatch: pytest.MonkeyPatch, options: dict[str, str], message: str
) -> None:
    settings.REDIS_URL = ""
    settings.TANDEM_INGEST_USER = ""
    monkeypatch.delenv("TANDEM_INGEST_USER", raising=False)
    with pytest.raises(CommandError, match=message):
        call_command("ingest_redis", **options)


# ---------------------------------------------------------------- publish_event, the sync API


@pytest.mark.django_db(transaction=True)
def test_publish_event_from_plain_sync_code_stores_the_event_and_returns_its_envelope(
    shared_session: Any, alice: Any, bob: Any
) -> None:
    sid = shared_session.id
    before = head(sid)

    by_name = publish_event(sid, "task.progress", {"done": 1}, as_user="bob")
    by_user = publish_event(sid, "task.done", as_user=alice)

    assert by_name["seq"] == before + 1 and by_user["seq"] == before + 2
    assert by_name["properties"] == {"done": 1, "published_by": {"id": bob.pk, "username": "bob"}}
    assert by_user["properties"] == {"published_by": {"id": alice.pk, "username": "alice"}}
    assert stored(sid)[-2:] == [by_name, by_user]


BAD_EVENTS = [
    ("reserved-type", "message.created", {}),
    ("bad-type-pattern", "Task Progress", {}),
    ("type-not-a-string", 42, {}),
    ("properties-not-an-object", "task.progress", [1, 2]),
    ("forged-publisher", "task.progress", {"published_by": "alice"}),
    ("oversized", "task.progress", {"blob": BIG}),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("type_name", "properties"), [c[1:] for c in BAD_EVENTS], ids=[c[0] for c in BAD_EVENTS])
def test_publish_event_refuses_what_the_rest_endpoint_refuses_with_the_same_error(
    shared_session: Any, bob: Any, api: Any, type_name: Any, properties: Any
) -> None:
    sid = shared_session.id
    before = head(sid)
    rest = api(bob).post(f"/api/sessions/{sid}/events/", {"type": type_name, "properties": properties}, format="json")

    with pytest.raises((ValidationFailed, PayloadTooLarge)) as caught:
        publish_event(sid, type_name, properties, as_user=bob)

    assert rest.status_code == caught.value.status
    assert rest.json()["error"]["code"] == caught.value.code
    assert rest.json()["error"]["details"] == caught.value.details
    assert head(sid) == before


@pytest.mark.django_db(transaction=True)
def test_publish_event_refuses_outsiders_viewers_and_unknown_users_like_rest(
    shared_session: Any, outsider_session: Any, charlie: Any, api: Any
) -> None:
    sid = shared_session.id
    before = head(sid)
    with pytest.raises(NotFound):
        publish_event(sid, "task.progress", {}, as_user="charlie")
    assert api(charlie).post(f"/api/sessions/{sid}/events/", PROGRESS, format="json").status_code == 404
    with pytest.raises(PermissionDenied):
        publish_event(sid, "task.progress", {}, as_user="carol")
    with pytest.raises(NotFound):
        publish_event(sid, "task.progress", {}, as_user="nobody")
    with pytest.raises(NotFound):
        publish_event("ses_doesnotexist0000", "task.progress", {}, as_user="alice")
    charlie.is_active = False
    charlie.save()
    with pytest.raises(NotFound):
        publish_event(outsider_session.id, "task.progress", {}, as_user=charlie)
    assert head(sid) == before


@pytest.mark.django_db(transaction=True)
def test_publish_json_checks_a_raw_body_like_the_rest_endpoint(shared_session: Any, bob: Any) -> None:
    sid = shared_session.id
    envelope = publish_json(sid, '{"type": "task.progress"}', as_user="bob")
    assert envelope["properties"] == {"published_by": {"id": bob.pk, "username": "bob"}}
    with pytest.raises(ValidationFailed):
        publish_json(sid, '{"type": "task.progress"}', as_user="bob", require_properties=True)
    with pytest.raises(PayloadTooLarge):
        publish_json(sid, orjson.dumps({"type": "task.progress", "properties": {"blob": BIG}}), as_user="bob")


SCRIPT = """
import json, sys, django
django.setup()
from events_app.publishing import publish_event
print(json.dumps(publish_event(sys.argv[1], "task.progress", {"step": "compile"}, as_user="bob")))
"""


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_a_script_process_publishes_with_publish_event_and_redis_subscribers_receive_it(
    shared_session: Any, bob: Any
) -> None:
    """A plain script (no event loop of its own) exits right after publishing: the event
    is stored and still reaches the session's channel-layer group on Redis."""
    _require_redis()
    sid = shared_session.id
    before = await ahead(sid)
    prefix = f"tandemingest{uuid.uuid4().hex[:12]}"
    layer = RedisPubSubChannelLayer(hosts=[REDIS_URL], prefix=prefix)
    group = groups.session_group(sid)
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    probe = redis.Redis.from_url(REDIS_URL)
    try:
        await eventually(lambda: dict(probe.pubsub_numsub(f"{prefix}__group__{group}"))
                         .get(f"{prefix}__group__{group}".encode(), 0) >= 1)
        received = asyncio.ensure_future(layer.receive(channel))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SCRIPT, sid, cwd=ROOT,
            env=command_env(REDIS_URL=REDIS_URL, TANDEM_CHANNEL_PREFIX=prefix),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        envelope = orjson.loads(out.splitlines()[-1])
        message = await asyncio.wait_for(received, 10)
    finally:
        probe.close()
        await layer.group_discard(group, channel)
        await layer.flush()

    assert envelope["seq"] == before + 1
    assert envelope["properties"] == {"step": "compile", "published_by": {"id": bob.pk, "username": "bob"}}
    assert (await astored(sid))[-1] == envelope
    assert message["type"] == groups.EVENT and message["q"] == before + 1
    assert orjson.loads(message["e"]) == envelope


FORK_SCRIPT = """
import asyncio, os, sys, django
django.setup()
from project import runtime
from events_app.publishing import publish_event
runtime.main_loop()  # the parent's runtime loop runs in a thread the child will not have
pid = os.fork()
if pid == 0:
    code = 1
    try:
        publish_event(sys.argv[1], "task.forked", {"ok": True}, as_user="bob")
        # Work handed to the runtime loop really runs (the parent's loop would not).
        code = 0 if runtime.submit(asyncio.sleep(0, result=7)).result(timeout=3) == 7 else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.django_db(transaction=True)
def test_a_forked_child_publishes_on_its_own_loop(shared_session: Any) -> None:
    # A Celery prefork worker, say: forked from a parent whose runtime loop was running.
    from events_app.models import Event

    done = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, shared_session.id], cwd=ROOT, env=command_env(),
        capture_output=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert Event.objects.filter(session_id=shared_session.id, type="task.forked").exists()
