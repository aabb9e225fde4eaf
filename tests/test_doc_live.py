"""§10 the shared document on real server processes: a stock npm ``y-websocket``
``WebsocketProvider`` (Node, ``ws``) and a ``pycrdt`` peer converge across two processes
sharing Redis; a REST edit through one process reaches an editor on the other; and a
server killed with ``kill -9`` while people type loses nothing anyone else had seen; a
reader that stops reading is closed 4008 once ``TANDEM_STREAM_QUEUE`` frames wait for it."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_server, token_for, wait_until
from tests.docpeer import DocPeer, SocketTransport
from tests.nodeclients import NODE_DIR
from tests.test_sse_real_socket import api_client

pytestmark = [pytest.mark.slow, pytest.mark.redis]

# A y-websocket provider that types WORDS (one every few ms, at the end of the text as
# it sees it) into the shared document and prints the text once it holds every word it
# waits for. Its argv: ws base URL, session id, token, its words, the words to wait for.
NODE_EDITOR = r"""
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';
const [base, sid, token, mine, theirs] = process.argv.slice(-5);
const doc = new Y.Doc();
const text = doc.getText('doc');
const provider = new WebsocketProvider(base + '/ws/sessions', sid + '/doc/', doc,
  { WebSocketPolyfill: WebSocket, params: { token }, disableBc: true });
provider.awareness.setLocalStateField('user', { name: 'node', color: '#00f' });
const want = [...mine.split(' '), ...theirs.split(' ')];
const done = () => { const have = new Set(text.toString().split(/\s+/)); return want.every(w => have.has(w)); };
let closes = [];
const seenPeers = new Set();
provider.awareness.on('change', () => {
  for (const s of provider.awareness.getStates().values()) if (s.user) seenPeers.add(s.user.name);
});
provider.on('connection-close', (event) => closes.push(event ? event.code : null));
await new Promise(resolve => provider.once('sync', resolve));
for (const word of mine.split(' ')) {
  text.insert(text.length, word + ' ');
  await new Promise(r => setTimeout(r, 5));
}
const deadline = Date.now() + 20000;
while (!done() && Date.now() < deadline) await new Promise(r => setTimeout(r, 20));
// Let our last updates leave before we go.
await new Promise(r => setTimeout(r, 200));
console.log(JSON.stringify({ text: text.toString(), done: done(), closes, peers: [...seenPeers] }));
provider.destroy();
process.exit(0);
"""


# A y-websocket provider as a viewer: it syncs, waits for WANT in the text, stays a
# moment (its sync step 2 and any reply have been handled by then) and reports.
NODE_VIEWER = r"""
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';
const [base, sid, token, want] = process.argv.slice(-4);
const doc = new Y.Doc();
const text = doc.getText('doc');
const provider = new WebsocketProvider(base + '/ws/sessions', sid + '/doc/', doc,
  { WebSocketPolyfill: WebSocket, params: { token }, disableBc: true });
const closes = [];
provider.on('connection-close', (event) => closes.push(event ? event.code : null));
await new Promise(resolve => provider.once('sync', resolve));
console.log(JSON.stringify({ synced: true }));
const deadline = Date.now() + 20000;
while (!text.toString().includes(want) && Date.now() < deadline) await new Promise(r => setTimeout(r, 20));
await new Promise(r => setTimeout(r, 500));
console.log(JSON.stringify({ text: text.toString(), closes, connected: provider.wsconnected }));
provider.destroy();
process.exit(0);
"""


def _words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


async def _peer(server: Any, session_id: str, user: Any) -> DocPeer:
    base = server.url.replace("http://", "ws://")
    p = DocPeer(SocketTransport(base, session_id, {"token": token_for(user)}))
    assert await p.open() is None
    await p.sync(timeout=10)
    return p


def _rest_text(server: Any, user: Any, session_id: str) -> dict[str, Any]:
    with api_client(server, user) as client:
        response = client.get(f"/api/sessions/{session_id}/doc/")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


def test_y_websocket_and_pycrdt_converge_across_two_processes(
    servers: Any, shared_session: Any, alice: Any, bob: Any
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "y-websocket").is_dir():
        pytest.fail("Node and tests/node/node_modules (with y-websocket) are required")
    server_a, server_b = servers(2, redis=True)
    sid = shared_session.id
    node_words, py_words = _words("node", 30), _words("py", 30)
    proc = subprocess.Popen(
        [node, "--input-type=module", "-e", NODE_EDITOR, "--",
         server_b.url.replace("http://", "ws://"), sid, token_for(bob), " ".join(node_words), " ".join(py_words)],
        cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    async def python_editor() -> str:
        p = await _peer(server_a, sid, alice)
        from tests.docpeer import awareness_frame, awareness_update

        await p.send_raw(awareness_frame(awareness_update(p.doc.client_id, 1, '{"user": {"name": "py"}}')))
        for word in py_words:
            await p.edit(len(p.text), word + " ")
            await asyncio.sleep(0.005)
        await p.until(lambda: set(node_words + py_words) <= set(p.value().split()), timeout=20)
        # Node may still be typing its last words: wait until the text stops changing.
        await p.until(lambda: p.value().count(" ") == 60, timeout=20)
        await p.close()
        return p.value()

    py_text = asyncio.run(python_editor())
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["done"] and result["closes"] == [], result
    assert result["text"] == py_text
    assert sorted(py_text.split()) == sorted(node_words + py_words)
    assert "py" in result["peers"]  # awareness crossed the processes too
    # What both editors see is what is stored, through either process.
    assert _rest_text(server_a, alice, sid)["text"] == py_text
    assert _rest_text(server_b, bob, sid)["text"] == py_text


def test_rest_edit_through_one_process_reaches_an_editor_on_the_other(
    servers: Any, shared_session: Any, alice: Any, bob: Any, carol: Any
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "y-websocket").is_dir():
        pytest.fail("Node and tests/node/node_modules (with y-websocket) are required")
    server_a, server_b = servers(2, redis=True)
    sid = shared_session.id
    # Something deleted first: a y-websocket client's sync step 2 carries its whole delete
    # set even when it has nothing new, which a viewer's must be allowed to.
    with api_client(server_b, bob) as client:
        client.patch(f"/api/sessions/{sid}/doc/", json={"edits": [{"at": 0, "insert": "draft"}]})
        client.patch(f"/api/sessions/{sid}/doc/", json={"edits": [{"at": 0, "delete": 5}]})
    # A stock y-websocket viewer (carol) on the first process, besides the pycrdt editor.
    viewer = subprocess.Popen(
        [node, "--input-type=module", "-e", NODE_VIEWER, "--",
         server_a.url.replace("http://", "ws://"), sid, token_for(carol), "# Plan"],
        cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert viewer.stdout is not None
    assert json.loads(viewer.stdout.readline()) == {"synced": True}

    async def run() -> None:
        p = await _peer(server_a, sid, alice)
        with api_client(server_b, bob) as client:
            response = client.patch(f"/api/sessions/{sid}/doc/", json={"edits": [{"at": 0, "insert": "# Plan\n"}]})
            assert response.status_code == 200, response.text
        await p.until(lambda: p.value() == "# Plan\n", timeout=5)
        await p.close()

    asyncio.run(run())
    out, err = viewer.communicate(timeout=30)
    assert viewer.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"text": "# Plan\n", "closes": [], "connected": True}


def test_kill_9_mid_editing_loses_nothing_that_was_relayed(
    servers: Any, shared_session: Any, alice: Any, bob: Any, tmp_path: Path
) -> None:
    server_a, server_b = servers(2, redis=True)
    sid = shared_session.id

    async def run() -> None:
        typist = await _peer(server_a, sid, alice)  # types through the process we kill
        watcher = await _peer(server_b, sid, bob)  # sees what was relayed
        typed = 0
        killed = False
        for i in range(200):
            await typist.edit(len(typist.text), f"w{i} ")
            typed += 1
            if i == 120:
                os.kill(server_a.proc.pid, signal.SIGKILL)
                killed = True
                break
            await asyncio.sleep(0.003)
        assert killed
        server_a.proc.wait(timeout=10)
        # Whatever the watcher saw before the kill (and any that was still on its way
        # through Redis) is stored: read it back through the surviving process.
        await asyncio.sleep(0.5)
        with contextlib_suppress():
            while True:
                await watcher.read_one(timeout=0.3)
        seen = watcher.value()
        stored = _rest_text(server_b, bob, sid)["text"]
        assert seen.startswith("w0 ") and stored.startswith(seen), (seen[-80:], stored[-80:])
        # The typist reconnects (to the restarted process, on the same port) and its
        # sync brings whatever never reached the store; everyone converges on all of it.
        restarted = start_server(
            {"TANDEM_AGENT_MODE": "inline", "REDIS_URL": servers.env()["REDIS_URL"],
             "TANDEM_CHANNEL_PREFIX": servers.env()["TANDEM_CHANNEL_PREFIX"]},
            tmp_path, name="restarted", port=server_a.port,
        )
        try:
            again = DocPeer(SocketTransport(restarted.url.replace("http://", "ws://"), sid, {"token": token_for(alice)}))
            again.doc.apply_update(typist.doc.get_update())  # the typist's local document
            assert await again.open() is None
            await again.sync(timeout=10)
            everything = typist.value()
            assert everything.split() == [f"w{i}" for i in range(typed)]
            await watcher.until(lambda: watcher.value() == everything, timeout=10)
            # Relayed, so stored: no waiting for the store to catch up.
            assert _rest_text(server_b, bob, sid)["text"] == everything
            await again.close()
        finally:
            restarted.stop()
        await watcher.close()

    asyncio.run(run())


class contextlib_suppress:
    """Stop reading at the first timeout: the watcher has read all there was."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, TimeoutError | asyncio.TimeoutError)


# A y-websocket editor that keeps typing through its server's death: the provider
# reconnects by itself (to the same address, where the server is restarted) and its sync
# sends what it typed meanwhile.
NODE_TYPIST = r"""
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';
const [base, sid, token, count] = process.argv.slice(-4);
const doc = new Y.Doc();
const text = doc.getText('doc');
const provider = new WebsocketProvider(base + '/ws/sessions', sid + '/doc/', doc,
  { WebSocketPolyfill: WebSocket, params: { token }, disableBc: true, maxBackoffTime: 500 });
let closes = 0, syncs = 0;
provider.on('connection-close', () => { closes += 1; });
provider.on('sync', (synced) => { if (synced) syncs += 1; });
await new Promise(resolve => provider.once('sync', resolve));
for (let i = 0; i < Number(count); i++) {
  text.insert(text.length, `k${i} `);
  await new Promise(r => setTimeout(r, 15));
}
const deadline = Date.now() + 30000;
while (!(provider.wsconnected && provider.synced) && Date.now() < deadline) await new Promise(r => setTimeout(r, 20));
await new Promise(r => setTimeout(r, 500));
console.log(JSON.stringify({ text: text.toString(), closes, syncs }));
provider.destroy();
process.exit(0);
"""


def test_a_stock_provider_typing_through_a_kill_9_reconnects_and_converges(
    servers: Any, shared_session: Any, alice: Any, bob: Any, tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "y-websocket").is_dir():
        pytest.fail("Node and tests/node/node_modules (with y-websocket) are required")
    server_a, server_b = servers(2, redis=True)
    sid = shared_session.id
    count = 150
    typist = subprocess.Popen(
        [node, "--input-type=module", "-e", NODE_TYPIST, "--",
         server_a.url.replace("http://", "ws://"), sid, token_for(alice), str(count)],
        cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    restarted: list[Any] = []

    async def run() -> str:
        watcher = await _peer(server_b, sid, bob)
        await watcher.until(lambda: len(watcher.value().split()) >= 20, timeout=20)
        os.kill(server_a.proc.pid, signal.SIGKILL)
        server_a.proc.wait(timeout=10)
        seen_at_kill = watcher.value()
        restarted.append(start_server(
            {"TANDEM_AGENT_MODE": "inline", **servers.env()}, tmp_path, name="restarted", port=server_a.port,
        ))
        # Nothing the watcher saw is missing from the store, and everything typed arrives.
        assert _rest_text(server_b, bob, sid)["text"].startswith(seen_at_kill)
        want = " ".join(f"k{i}" for i in range(count)) + " "
        await watcher.until(lambda: watcher.value() == want, timeout=40)
        await watcher.close()
        return watcher.value()

    try:
        seen = asyncio.run(run())
        out, err = typist.communicate(timeout=60)
    finally:
        for server in restarted:
            server.stop()
    assert typist.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["closes"] >= 1 and result["syncs"] >= 2, result  # it did lose and regain the server
    assert result["text"] == seen == _rest_text(server_b, bob, sid)["text"]


def _close_code(sock: socket.socket, timeout: float) -> int | None:
    """Read a WebSocket's server frames (never masked) until its close frame; its code."""
    sock.settimeout(timeout)
    buf = b""
    headers_done = False
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        buf += chunk
        if not headers_done:
            if b"\r\n\r\n" not in buf:
                continue
            head, buf = buf.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 101"), head[:100]
            headers_done = True
        while len(buf) >= 2:
            opcode, length, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, pos = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, pos = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < pos + length:
                break
            if opcode == 8:
                return int.from_bytes(buf[pos : pos + 2], "big")
            buf = buf[pos + length :]


def test_a_stalled_doc_reader_is_closed_4008_and_the_others_keep_editing(
    servers: Any, shared_session: Any, alice: Any, bob: Any
) -> None:
    # uvicorn: a write to a full socket waits, so the frames a reader that stopped reading
    # is owed pile up in its queue, where the server counts them (tests/test_slow_readers.py).
    (server,) = servers(1, ASGI_SERVER="uvicorn", TANDEM_STREAM_QUEUE="20")
    sid = shared_session.id
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it reads nothing
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(
        f"GET /ws/sessions/{sid}/doc/?token={token_for(bob)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n".encode()
    )
    with api_client(server, alice) as client:
        def slow_disconnects() -> float:
            found = re.search(r"^tandem_slow_client_disconnects_total (\S+)$", client.get("/metrics").text, re.MULTILINE)
            return float(found.group(1)) if found else 0.0

        text = ""
        for i in range(200):  # each change a ~100 KB update for the stalled reader
            new = f"{i:03d}" + "x" * 99_000
            response = client.patch(f"/api/sessions/{sid}/doc/", json={"edits": [{"at": 0, "delete": len(text), "insert": new}]})
            assert response.status_code == 200, response.text
            text = new
            if i % 10 == 9 and slow_disconnects() >= 1:
                break
        assert wait_until(lambda: slow_disconnects() >= 1, timeout=20)
        assert _close_code(stalled, timeout=20) == 4008
        stalled.close()
        # The document and everyone else carry on: an editor that opens now syncs the text.
        response = client.patch(f"/api/sessions/{sid}/doc/", json={"edits": [{"at": 0, "delete": len(text), "insert": "after"}]})
        assert response.status_code == 200

    async def editor_sees_it() -> str:
        p = await _peer(server, sid, bob)
        try:
            return p.value()
        finally:
            await p.close()

    assert asyncio.run(editor_sees_it()) == "after"
