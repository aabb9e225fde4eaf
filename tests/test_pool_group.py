"""An agents pool listens on one group of its own (``groups.pool_group`` of its runner
name) for the aborts and permission answers of every reply it runs: a reply costs no
Redis subscription of its own, and an abort that reaches the pool before the pool has
read the claim it just made still stops the reply."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async

from events_app import fanout, groups
from sessions_app import services
from sessions_app.agents.pool import POOL, Pool
from sessions_app.models import Message, ReplyRun
from tests.replies import head, log_after, post
from tests.streamutil import bind_runtime, eventually

pytestmark = pytest.mark.django_db(transaction=True)


def slow_context(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The reply's history takes ``seconds`` to read: the reply stays running meanwhile."""
    real = services.reply_context

    def reply_context(session_id: str, message_id: str) -> dict[str, Any]:
        time.sleep(seconds)
        return real(session_id, message_id)

    monkeypatch.setattr(services, "reply_context", reply_context)


async def reply_status(reply_id: str) -> str:
    return str((await Message.objects.aget(pk=reply_id)).status)


async def start_pool(*, persistent: bool = False) -> Pool:
    bind_runtime()
    pool = POOL.get()
    pool.start(persistent=persistent)
    return pool


async def test_a_running_reply_holds_no_group_of_its_own(
    shared_session: Any, bob: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.TANDEM_AGENT_MODE = "worker"  # this test's pool is the only runner
    slow_context(monkeypatch, 0.5)
    reply_id = (await database_sync_to_async(post)(bob, shared_session.id, "hello")).json()["reply_id"]
    pool = await start_pool()
    await eventually(lambda: reply_id in pool.runs)
    hub = fanout.get_hub()
    own = groups.pool_group(pool.name)
    await eventually(lambda: own in hub.groups)
    assert {g: m for g, m in hub.groups.items() if m} == {own: {pool}}
    await eventually(lambda: not pool.runs, timeout=5)
    assert await reply_status(reply_id) == Message.Status.COMPLETED


async def test_an_abort_reaching_the_pool_before_it_has_read_its_claim_stops_the_reply(
    shared_session: Any, bob: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.TANDEM_AGENT_MODE = "worker"  # this test's pool is the only runner
    slow_context(monkeypatch, 1.0)  # long enough for a poll of pool.runs to see it, on a loaded machine
    sid = shared_session.id
    loop = asyncio.get_running_loop()
    real_claim = services.claim_runs
    reply_ids: list[str] = []
    pool = await start_pool(persistent=True)

    def claim_then_abort(runner: str, limit: int) -> list[ReplyRun]:
        claimed = real_claim(runner, limit)
        if claimed:
            # Someone aborts right after the claim commits: the flag is set, and the
            # pool is told before the claim's answer is back on its loop.
            ReplyRun.objects.filter(pk=reply_ids[0]).update(abort_requested=True)
            loop.call_soon_threadsafe(pool.control, groups.Abort(reply_ids[0]))
        return claimed

    monkeypatch.setattr(services, "claim_runs", claim_then_abort)
    try:
        # Listening, and done with the look it takes once it is: what follows reaches
        # the pool through the abort message alone. (The claim comes with its next poll.)
        await eventually(lambda: groups.pool_group(pool.name) in fanout.get_hub().groups)
        await eventually(lambda: not pool.renew_asked)
        before = await database_sync_to_async(head)(sid)
        reply_ids.append((await database_sync_to_async(post)(bob, sid, "never echoed")).json()["reply_id"])
        await eventually(lambda: reply_ids[0] in pool.runs, timeout=5)
        await eventually(lambda: not pool.runs, timeout=5)
    finally:
        assert pool.serving is not None
        pool.serving.cancel()
        await asyncio.wait([pool.serving])
    assert await reply_status(reply_ids[0]) == Message.Status.CANCELLED
    events = await database_sync_to_async(log_after)(sid, before)
    assert not [e for e in events if e["type"] == "message.part.updated"]


async def test_an_abort_for_a_reply_the_pool_no_longer_runs_is_ignored(shared_session: Any) -> None:
    pool = await start_pool()
    pool.control(groups.PermissionAnswered("msg_gone", "per_gone"))
    assert not pool.renew_asked
    pool.control(groups.Abort("msg_gone"))
    assert pool.renew_asked  # it might be a claim not read yet: the flags tell
    await eventually(lambda: not pool.renew_asked and pool.serving and pool.serving.done(), timeout=5)
    assert not pool.runs


async def test_a_renewal_that_reads_the_row_after_the_reply_finished_leaves_it_completed(
    shared_session: Any, bob: Any, settings: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # CI saw this as a worker's first renewal (the one it makes once subscribed) landing
    # just after an echo reply's finish: the reply was completed, yet logged interrupted.
    settings.TANDEM_AGENT_MODE = "worker"  # this test's pool is the only runner
    caplog.set_level("INFO", logger="tandem.replies")
    loop = asyncio.get_running_loop()
    real_finish = services.finish_reply
    pool = await start_pool(persistent=True)

    renewed_with: list[list[str]] = []

    def finish_then_renew(*args: Any, **kwargs: Any) -> bool:
        ended = real_finish(*args, **kwargs)
        # The pool renews before the finish's answer is back on its loop: its row is gone.
        renewed_with.append(list(pool.runs))
        asyncio.run_coroutine_threadsafe(pool._renew(), loop).result(5)
        return ended

    def ended_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("reply ended")]

    monkeypatch.setattr(services, "finish_reply", finish_then_renew)
    try:
        reply_id = (await database_sync_to_async(post)(bob, shared_session.id, "hello")).json()["reply_id"]
        # An echo reply may be over before a poll of pool.runs would see it: wait for its end.
        await eventually(ended_lines, timeout=5)
        await eventually(lambda: not pool.runs, timeout=5)
    finally:
        assert pool.serving is not None
        pool.serving.cancel()
        await asyncio.wait([pool.serving])
    assert renewed_with == [[reply_id]]  # the renewal asked about the finished reply
    assert await reply_status(reply_id) == Message.Status.COMPLETED
    [ended] = ended_lines()
    assert f"message={reply_id}" in ended and "status=completed" in ended
    assert not [r for r in caplog.records if "was ended elsewhere" in r.getMessage()]
