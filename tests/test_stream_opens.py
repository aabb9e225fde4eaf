"""Stream opens in batches (issue 12, item 1): a burst of opens makes one database call
per step for all of them, not one each, and nothing about authorization is weaker for
it: a user removed or disabled during the burst is refused or loses the stream at once,
an expired credential is refused, one bad open in a batch fails alone, and a database
error in a batch answers every client of it."""
from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError
from rest_framework_simplejwt.tokens import AccessToken

from events_app import streams
from project import limits
from project.auth import issue_ticket
from tests.conftest import token_for
from tests.streamutil import SSEClient, WSClient, bind_runtime, create_shared_session, publish_many, stream_path

pytestmark = pytest.mark.django_db(transaction=True)

BURST = 12


@pytest.fixture(autouse=True)
def _room(settings: Any) -> None:
    settings.TANDEM_MAX_CONNECTIONS_PER_USER = 100  # a burst of one user's streams


def _counting(monkeypatch: Any, name: str, after: Any = None) -> list[int]:
    """Wrap streams.<name> (a batch's database step); returns the batch sizes it saw.
    ``after(items)`` runs in the batch's thread once the real step has answered."""
    real = getattr(streams, name)
    sizes: list[int] = []

    def wrapped(items: list[Any]) -> list[Any]:
        sizes.append(len(items))
        out = real(items)
        if after is not None:
            after(items)
        return out  # type: ignore[no-any-return]

    monkeypatch.setattr(streams, name, wrapped)
    return sizes


async def _open_sse(clients: list[SSEClient]) -> list[int]:
    return list(await asyncio.gather(*(c.open() for c in clients)))


async def _connect_ws(clients: list[WSClient]) -> list[tuple[bool, Any]]:
    return list(await asyncio.gather(*(c.connect() for c in clients)))


async def _refusal(client: WSClient, connected: tuple[bool, Any]) -> int:
    """How a refused WebSocket ended: accepted then closed (what the server does, so a
    browser can read the code), or closed at once."""
    accepted, code = connected
    if accepted:
        frame = await client.raw()
        assert frame["type"] == "websocket.close", frame
        return int(frame.get("code", 1000))
    return int(code)


async def test_a_burst_of_opens_shares_its_database_calls(alice: Any, bob: Any, carol: Any, monkeypatch: Any) -> None:
    bind_runtime()
    lookups = _counting(monkeypatch, "_lookup")
    rechecks = _counting(monkeypatch, "_recheck")
    session = await create_shared_session(alice)
    sse = [SSEClient(stream_path(session.id), params={"token": token_for(u)}) for u in (alice, bob, carol) * BURST]
    ws = [WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(bob)}) for _ in range(BURST)]
    statuses, accepted = await asyncio.gather(_open_sse(sse), _connect_ws(ws))
    assert statuses == [200] * len(sse)
    assert [a for a, _ in accepted] == [True] * len(ws)
    for w in ws:
        assert (await w.receive())["type"] == "server.connected"
    opens = len(sse) + len(ws)
    # Every open was looked up and re-checked once, in far fewer calls than opens.
    assert sum(lookups) == opens and sum(rechecks) == opens
    assert len(lookups) <= opens // 4 and len(rechecks) <= opens // 4, (lookups, rechecks)
    [seq] = await publish_many(session.id, 1)
    for client in sse:
        assert (await client.until_seq(seq))[-1].seq == seq
    for w in ws:
        assert (await w.seen(lambda f: f.get("seq") == seq))["seq"] == seq
    await asyncio.gather(*(c.close() for c in sse), *(w.disconnect() for w in ws))
    assert limits.STATE.get().held == {}


async def test_a_non_member_in_a_batch_fails_alone(alice: Any, bob: Any, carol: Any, charlie: Any, monkeypatch: Any) -> None:
    bind_runtime()
    lookups = _counting(monkeypatch, "_lookup")
    session = await create_shared_session(alice)
    members = [SSEClient(stream_path(session.id), params={"token": token_for(u)}) for u in (alice, bob, carol) * 4]
    outsiders = [
        SSEClient(stream_path(session.id), params={"token": token_for(charlie)}),
        SSEClient(stream_path("no-such-session"), params={"token": token_for(alice)}),
        SSEClient(stream_path("bad\x01id"), params={"token": token_for(alice)}),
    ]
    ws_outsider = WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(charlie)})
    statuses, [connected] = await asyncio.gather(
        _open_sse([*members[:6], *outsiders, *members[6:]]), _connect_ws([ws_outsider])
    )
    assert statuses[:6] + statuses[9:] == [200] * len(members)
    assert statuses[6:9] == [404, 404, 404]
    assert await _refusal(ws_outsider, connected) == 4404
    for client in outsiders:
        assert (await client.json())["error"]["code"] == "not_found"
    assert max(lookups) > 1  # refused within a shared batch, not alone
    [seq] = await publish_many(session.id, 1)
    for client in members:
        assert (await client.until_seq(seq))[-1].seq == seq
    await asyncio.gather(*(c.close() for c in members))


async def test_a_member_removed_during_a_burst_is_refused_or_cut_off(
    alice: Any, bob: Any, carol: Any, monkeypatch: Any
) -> None:
    """bob is removed in the very batch that admitted his opens (after the membership
    was read, before his streams listen): none of them may stay open."""
    bind_runtime()
    session = await create_shared_session(alice)

    def remove_bob(items: list[Any]) -> None:
        from sessions_app import services

        if any(item.claim.user_id == bob.pk for item in items) and not removed:
            removed.append(True)
            services.remove_member(session, username="bob")

    removed: list[bool] = []
    # Before any open: the batchers take the step they find when the first open makes them.
    _counting(monkeypatch, "_lookup", after=remove_bob)
    watcher = SSEClient(stream_path(session.id), params={"token": token_for(alice)})
    await watcher.connected()  # the hub already holds the session's group
    bobs = [SSEClient(stream_path(session.id), params={"token": token_for(bob)}) for _ in range(BURST)]
    bob_ws = [WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(bob)}) for _ in range(BURST)]
    carols = [SSEClient(stream_path(session.id), params={"token": token_for(carol)}) for _ in range(4)]
    statuses, accepted = await asyncio.gather(_open_sse([*bobs, *carols]), _connect_ws(bob_ws))
    assert removed
    [seq] = await publish_many(session.id, 1)
    for client, status in zip(bobs, statuses, strict=False):
        if status == 200:  # admitted: must end (member_removed) without the later event
            seen = await client.ends()
            assert all(f.seq is None or f.seq < seq for f in seen), [f.type for f in seen]
        else:
            assert status == 404
    for w, (ok, code) in zip(bob_ws, accepted, strict=True):
        # Refused (4404), or admitted and cut off (4403) before the later event.
        assert (await w.closed() if ok else code) in (4403, 4404)
    assert statuses[len(bobs):] == [200] * len(carols)
    for client in carols:
        assert (await client.until_seq(seq))[-1].seq == seq
    await asyncio.gather(*(c.close() for c in [*carols, watcher]))


async def test_members_removed_after_a_burst_lose_the_stream_at_once(alice: Any, bob: Any, carol: Any) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    bobs = [SSEClient(stream_path(session.id), params={"token": token_for(bob)}) for _ in range(BURST)]
    bob_ws = [WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(bob)}) for _ in range(BURST)]
    statuses, accepted = await asyncio.gather(_open_sse(bobs), _connect_ws(bob_ws))
    assert statuses == [200] * BURST and all(ok for ok, _ in accepted)
    for w in bob_ws:
        assert (await w.receive())["type"] == "server.connected"

    def remove() -> None:
        from sessions_app import services

        services.remove_member(session, username="bob")

    await database_sync_to_async(remove)()
    for client in bobs:
        await client.ends()
    for w in bob_ws:
        assert await w.closed() == 4403


@pytest.mark.parametrize("change", ["deactivate", "delete"])
async def test_a_user_disabled_during_a_burst_is_refused(
    alice: Any, bob: Any, carol: Any, change: str, monkeypatch: Any
) -> None:
    """bob is disabled after his opens were looked up, before they listen: every one of
    them is refused (or, admitted, ends), while carol's in the same burst carry on."""
    bind_runtime()
    session = await create_shared_session(alice)

    def disable_bob(items: list[Any]) -> None:
        if any(item.claim.user_id == bob.pk for item in items) and not disabled:
            disabled.append(True)
            if change == "delete":
                bob.delete()
            else:
                bob.is_active = False
                bob.save()

    disabled: list[bool] = []
    _counting(monkeypatch, "_lookup", after=disable_bob)
    ticket = await database_sync_to_async(issue_ticket)(bob.pk)
    bobs = [SSEClient(stream_path(session.id), params={"ticket": ticket}) for _ in range(BURST)]
    bobs += [SSEClient(stream_path(None), params={"token": token_for(bob)}) for _ in range(4)]
    bob_ws = [WSClient("/ws/stream/", params={"token": token_for(bob)}) for _ in range(4)]
    carols = [SSEClient(stream_path(session.id), params={"token": token_for(carol)}) for _ in range(4)]
    statuses, accepted = await asyncio.gather(_open_sse([*bobs, *carols]), _connect_ws(bob_ws))
    assert disabled
    for client, status in zip(bobs, statuses, strict=False):
        if status == 200:
            await client.ends()
        else:
            assert status == 401
            assert (await client.json())["error"]["code"] == "authentication_failed"
    for w, (ok, code) in zip(bob_ws, accepted, strict=True):
        assert (await w.closed() if ok else code) == 4401
    assert statuses[len(bobs):] == [200] * len(carols)
    [seq] = await publish_many(session.id, 1)
    for client in carols:
        assert (await client.until_seq(seq))[-1].seq == seq
    await asyncio.gather(*(c.close() for c in carols))


@pytest.mark.parametrize("change", ["deactivate", "delete"])
async def test_a_disabled_user_is_refused_at_open_in_a_burst(alice: Any, bob: Any, carol: Any, change: str) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    bob_token, ticket = token_for(bob), await database_sync_to_async(issue_ticket)(bob.pk)

    def disable() -> None:
        if change == "delete":
            bob.delete()
        else:
            bob.is_active = False
            bob.save()

    await database_sync_to_async(disable)()
    bobs = [SSEClient(stream_path(session.id), params={"ticket": ticket}) for _ in range(4)]
    bobs += [SSEClient(stream_path(None), params={"token": bob_token}) for _ in range(4)]
    carols = [SSEClient(stream_path(session.id), params={"token": token_for(carol)}) for _ in range(4)]
    bob_ws = [WSClient(f"/ws/sessions/{session.id}/", params={"token": bob_token}) for _ in range(4)]
    statuses, accepted = await asyncio.gather(_open_sse([*bobs, *carols]), _connect_ws(bob_ws))
    assert statuses == [401] * len(bobs) + [200] * len(carols)
    assert [await _refusal(w, c) for w, c in zip(bob_ws, accepted, strict=True)] == [4401] * len(bob_ws)
    await asyncio.gather(*(c.close() for c in carols))


async def test_expired_credentials_are_refused(alice: Any, bob: Any, carol: Any, settings: Any) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    ticket = await database_sync_to_async(issue_ticket)(alice.pk)
    old = AccessToken.for_user(alice)
    old.set_exp(lifetime=timedelta(seconds=-1))
    live = SSEClient(stream_path(session.id), params={"token": token_for(alice)})
    settings.TANDEM_TICKET_SECONDS = -1  # every ticket is older than that
    stale = [
        SSEClient(stream_path(session.id), params={"ticket": ticket}),
        SSEClient(stream_path(session.id), params={"token": str(old)}),
        SSEClient(stream_path(None), headers={"Authorization": f"Bearer {old}"}),
    ]
    ws = [
        WSClient(f"/ws/sessions/{session.id}/", params={"ticket": ticket}),
        WSClient("/ws/stream/", params={"token": str(old)}),
    ]
    statuses, accepted = await asyncio.gather(_open_sse([live, *stale]), _connect_ws(ws))
    assert statuses == [200, 401, 401, 401]
    assert [await _refusal(w, c) for w, c in zip(ws, accepted, strict=True)] == [4401] * len(ws)
    await live.close()


@pytest.mark.parametrize("step", ["_lookup", "_recheck"])
async def test_a_database_error_answers_every_open_of_the_batch(
    alice: Any, bob: Any, carol: Any, step: str, monkeypatch: Any
) -> None:
    bind_runtime()
    session = await create_shared_session(alice)

    def broken(items: list[Any]) -> list[Any]:
        raise OperationalError("database is down")

    monkeypatch.setattr(streams, step, broken)
    sse = [SSEClient(stream_path(session.id), params={"token": token_for(u)}) for u in (alice, bob) * 4]
    ws = [WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(bob)}) for _ in range(4)]
    statuses, accepted = await asyncio.wait_for(asyncio.gather(_open_sse(sse), _connect_ws(ws)), 10)
    assert statuses == [500] * len(sse)
    for client in sse:
        assert (await client.json())["error"]["code"] == "internal_error"
    assert [await _refusal(w, c) for w, c in zip(ws, accepted, strict=True)] == [1011] * len(ws)
    assert limits.STATE.get().held == {}  # no slot kept by a failed open


async def test_the_per_user_limit_holds_within_a_batch(alice: Any, bob: Any, carol: Any, settings: Any) -> None:
    bind_runtime()
    settings.TANDEM_MAX_CONNECTIONS_PER_USER = 5
    session = await create_shared_session(alice)
    bobs = [SSEClient(stream_path(session.id), params={"token": token_for(bob)}) for _ in range(8)]
    alices = [SSEClient(stream_path(session.id), params={"token": token_for(alice)}) for _ in range(3)]
    statuses = await _open_sse([*bobs, *alices])
    assert sorted(statuses[:8]) == [200] * 5 + [429] * 3
    assert statuses[8:] == [200] * 3
    await asyncio.gather(*(c.close() for c, s in zip([*bobs, *alices], statuses, strict=True) if s == 200))
    assert limits.STATE.get().held == {}


async def test_a_resume_ahead_of_the_hub_but_not_of_the_log_is_no_reset(alice: Any, bob: Any, carol: Any) -> None:
    """The position is the hub's head, which may trail the stored one while events are on
    their way to this process: a client that already has those events resumes, with no
    stream.reset, and gets what follows exactly once."""
    from events_app import fanout, groups

    bind_runtime()
    session = await create_shared_session(alice)
    watcher = SSEClient(stream_path(session.id), params={"token": token_for(alice)})
    await watcher.connected()
    seqs = await publish_many(session.id, 3)
    await watcher.until_seq(seqs[-1])
    # As if the last two were still on their way through the channel layer.
    fanout.get_hub().heads[groups.session_group(session.id)] = seqs[0]
    client = SSEClient(stream_path(session.id), params={"token": token_for(bob), "last_event_id": str(seqs[-1])})
    hello = await client.connected()
    assert hello.data is not None
    props = hello.data["properties"]
    assert props["resumed"] is True and props["last_seq"] == seqs[-1]
    [after] = await publish_many(session.id, 1)
    seen = await client.until_seq(after)
    assert all(f.type != "stream.reset" for f in seen)
    assert [f.seq for f in seen if f.seq is not None] == [after]
    await asyncio.gather(client.close(), watcher.close())
