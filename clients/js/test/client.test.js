// The Node client (dist/node.js: npm eventsource and ws) against a live Tandem server.
// tests/test_js_client.py starts the server, makes the users and a shared session, builds
// dist/ and runs `node --test test/` with:
//   TANDEM_URL, TANDEM_PASSWORD, TANDEM_OWNER (alice), TANDEM_EDITOR (bob), TANDEM_SESSION
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { Tandem, TandemError } from "../dist/node.js";

const BASE = process.env.TANDEM_URL;
const PASSWORD = process.env.TANDEM_PASSWORD;
const SID = process.env.TANDEM_SESSION;
const WAIT = 15000;

let alice;
let bob;
const opened = [];

async function waitFor(predicate, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    const value = predicate();
    if (value) return value;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** A subscription that records what it hands out. */
function follow(client, sessionId, options = {}) {
  const rec = { events: [], statuses: [], resets: [] };
  rec.sub = client.subscribe(sessionId, {
    ...options,
    onEvent: (e) => rec.events.push(e),
    onStatus: (s, info) => rec.statuses.push([s, info]),
    onReset: (info) => rec.resets.push(info),
  });
  rec.persisted = () => rec.events.filter((e) => e.seq !== null);
  rec.seqs = () => rec.persisted().map((e) => e.seq);
  rec.live = () => waitFor(() => rec.sub.status === "live", "live");
  opened.push(rec.sub);
  return rec;
}

async function publish(client, n, tag) {
  const seqs = [];
  for (let i = 0; i < n; i += 1) seqs.push((await client.publish(SID, "task.progress", { i, tag })).seq);
  return seqs;
}

before(async () => {
  assert.ok(BASE && PASSWORD && SID, "TANDEM_URL, TANDEM_PASSWORD and TANDEM_SESSION are required");
  alice = await Tandem.login(BASE, process.env.TANDEM_OWNER, PASSWORD);
  bob = await Tandem.login(BASE, process.env.TANDEM_EDITOR, PASSWORD);
});

after(() => {
  for (const sub of opened) sub.close();
});

test("login gives a client whose REST calls carry the token", async () => {
  assert.ok(alice.token && alice.refreshToken);
  const sessions = await alice.listSessions();
  assert.ok(sessions.some((s) => s.id === SID));
  const created = await alice.createSession({ title: "from node" });
  assert.equal((await alice.getSession(created.id)).title, "from node");
});

test("bad credentials and unknown sessions are TandemErrors with the API's status and code", async () => {
  await assert.rejects(Tandem.login(BASE, "nobody-here", "wrong"), (err) => err instanceof TandemError && err.status === 401);
  await assert.rejects(alice.getSession("00000000-0000-0000-0000-000000000000"),
    (err) => err instanceof TandemError && err.status === 404 && err.code === "not_found");
  await assert.rejects(alice.post(`/api/sessions/${SID}/events/`, { type: "server.fake", properties: {} }),
    (err) => err instanceof TandemError && err.status === 400 && err.code === "validation_error");
});

test("an expired access token is refreshed once and the call repeated", async () => {
  const seen = [];
  const client = new Tandem({ base: BASE, token: "not-a-jwt", refreshToken: alice.refreshToken, onToken: (t) => seen.push(t) });
  const session = await client.getSession(SID);
  assert.equal(session.id, SID);
  assert.equal(seen.length, 1);
  assert.equal(client.token, seen[0]);
  let lost = 0;
  const hopeless = new Tandem({ base: BASE, token: "not-a-jwt", refreshToken: "nor-this", onAuthLost: () => { lost += 1; } });
  await assert.rejects(hopeless.getSession(SID), (err) => err.status === 401);
  assert.equal(lost, 1);
});

for (const transport of ["sse", "ws"]) {
  test(`${transport}: events arrive in order, exactly once, with statuses connecting then live`, async () => {
    const start = (await alice.getSession(SID)).last_seq;
    const rec = follow(alice, SID, { transport, after: start });
    await rec.live();
    assert.deepEqual(rec.statuses.map(([s]) => s).slice(0, 2), ["connecting", "live"]);
    assert.equal(rec.statuses[1][1].transport, transport);
    const published = await publish(bob, 5, transport);
    await waitFor(() => rec.persisted().length >= 5, "five events");
    assert.deepEqual(rec.seqs(), published);
    assert.equal(rec.sub.lastSeq, published.at(-1));

    // Reconnect (as a "Reconnect now" would): resumes with last_event_id, no loss, no duplicate.
    rec.sub.reconnect();
    const more = await publish(bob, 3, `${transport}-after`);
    await waitFor(() => rec.persisted().length >= 8, "events after the reconnect");
    await rec.live();
    assert.deepEqual(rec.seqs(), [...published, ...more]);
    assert.ok(rec.statuses.some(([s, info]) => s === "reconnecting" && info.reason === "requested"));
    const connected = rec.events.filter((e) => e.type === "server.connected");
    assert.equal(connected.length, 2);
    assert.equal(connected[1].properties.resumed, true);

    rec.sub.close();
    assert.equal(rec.sub.status, "closed");
    assert.equal(rec.statuses.at(-1)[1].reason, "closed");
  });
}

test("a later subscription resumes from a position with no gap and no duplicate", async () => {
  const start = (await alice.getSession(SID)).last_seq;
  const missed = await publish(bob, 4, "missed");
  const rec = follow(alice, SID, { transport: "ws", after: start });
  await waitFor(() => rec.persisted().length >= 4, "the missed events");
  assert.deepEqual(rec.seqs(), missed);
});

test("a position beyond the head is reset (stream.reset) and the stream goes on from the head", async () => {
  const head = (await alice.getSession(SID)).last_seq;
  const rec = follow(alice, SID, { transport: "sse", after: head + 50 });
  await waitFor(() => rec.resets.length === 1, "the reset");
  assert.equal(rec.resets[0].reason, "unknown_position");
  assert.equal(rec.resets[0].last_seq, head);
  assert.ok(rec.events.some((e) => e.type === "stream.reset"));
  const next = await publish(bob, 1, "after-reset");
  await waitFor(() => rec.persisted().length >= 1, "the event after the reset");
  assert.deepEqual(rec.seqs(), next);
});

test("WebSocket commands of PROTOCOL §6: ping, publish, presence.update, and their errors", async () => {
  const rec = follow(alice, SID, { transport: "ws" });
  await rec.live();
  const pong = await rec.sub.ping();
  assert.equal(pong.type, "pong");
  const published = await rec.sub.publish("task.progress", { via: "ws" });
  assert.equal(typeof published.seq, "number");
  await waitFor(() => rec.persisted().some((e) => e.seq === published.seq), "the published event");
  await rec.sub.updatePresence({ typing: true });
  const presence = await bob.get(`/api/sessions/${SID}/presence/`);
  assert.ok(presence.some((row) => row.user.username === process.env.TANDEM_OWNER));
  await assert.rejects(rec.sub.publish("server.nope", {}), (err) => err instanceof TandemError && err.code === "validation_error");
  await assert.rejects(rec.sub.send({ type: "no.such.command" }), (err) => err instanceof TandemError && err.code !== "timeout");
  const sse = follow(alice, SID, { transport: "sse" });
  await sse.live();
  await assert.rejects(sse.sub.ping(), (err) => err.code === "not_connected");
});

test("prompt, a permission request answered over WebSocket, and the reply", async () => {
  const session = await alice.createSession({ title: "tools from node", agent: "tools" });
  const rec = follow(alice, session.id, { transport: "ws", after: 0 });
  await rec.live();
  const posted = await rec.sub.prompt("!calc 2*(3+4)");
  assert.ok(posted.message && posted.message.id);
  const asked = await waitFor(() => rec.events.find((e) => e.type === "permission.requested"), "permission.requested");
  const pid = asked.properties.permission?.id ?? asked.properties.id ?? asked.properties.permission_id;
  assert.ok(pid, JSON.stringify(asked.properties));
  const answer = await rec.sub.replyPermission(pid, true);
  assert.equal(answer.status, "approved");
  await assert.rejects(alice.replyPermission(session.id, pid, false), (err) => err.status === 409 && err.code === "already_resolved");
  const done = await waitFor(
    () => rec.events.find((e) => e.type === "message.completed" && e.properties.message_id !== posted.message.id),
    "the reply");
  const full = await alice.get(`/api/sessions/${session.id}/messages/`);
  const reply = (full.results ?? full).find((m) => m.id === done.properties.message_id);
  assert.match(JSON.stringify(reply.parts), /14/);
});

test("the user-level stream (cursor) sees new sessions, and commands need a session_id there", async () => {
  const rec = follow(alice, null, { transport: "ws" });
  await rec.live();
  const created = await alice.createSession({ title: "seen on the user stream" });
  await waitFor(() => rec.events.some((e) => e.type === "session.created" && e.session_id === created.id), "session.created");
  assert.equal(typeof rec.sub.cursor, "string");
  assert.throws(() => rec.sub.publish("task.progress", {}), TypeError);
  const ack = await rec.sub.publish("task.progress", { user: true }, SID);
  assert.equal(typeof ack.seq, "number");
});

test("an API key serves as the token, and revoking it ends its streams", async () => {
  const made = await bob.request("POST", "/api/auth/keys/", { name: "node script" });
  let lost = 0;
  const client = new Tandem({ base: BASE, token: made.key, onAuthLost: () => { lost += 1; } });
  assert.ok((await client.listSessions()).some((s) => s.id === SID));
  const recs = ["sse", "ws"].map((transport) => follow(client, SID, { transport }));
  for (const rec of recs) await rec.live();
  const [seq] = await publish(client, 1, "by key");
  for (const rec of recs) await waitFor(() => rec.seqs().includes(seq), "the event, on both transports");
  await bob.request("DELETE", `/api/auth/keys/${made.id}/`);
  for (const rec of recs) {
    await waitFor(() => rec.sub.status === "closed", "the stream closed once the key was revoked");
    assert.equal(rec.statuses.at(-1)[1].reason, "auth_lost");
  }
  assert.ok(lost >= 1);
  await assert.rejects(client.listSessions(), (err) => err instanceof TandemError && err.status === 401);
});

test("an outsider's subscription is closed, not retried forever", async () => {
  const mine = await bob.createSession({ title: "bob only" });
  for (const transport of ["sse", "ws"]) {
    const rec = follow(alice, mine.id, { transport });
    await waitFor(() => rec.sub.status === "closed", "closed");
    assert.equal(rec.statuses.at(-1)[1].reason, "not_found");
    assert.ok(!rec.statuses.some(([s]) => s === "polling" || s === "live"));
  }
});

test("with no server answering, the status says so and the client probes /healthz instead of backing off", async () => {
  const port = await new Promise((resolve) => {
    const server = net.createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port: p } = server.address();
      server.close(() => resolve(p));
    });
  });
  const client = new Tandem({ base: `http://127.0.0.1:${port}`, token: alice.token });
  const rec = follow(client, SID, { transport: "sse", healthProbeInterval: 100 });
  await waitFor(() => rec.statuses.some(([s, info]) => s === "reconnecting" && info.reason === "server_unreachable"), "server_unreachable");
  await new Promise((resolve) => setTimeout(resolve, 500));
  assert.ok(!rec.statuses.some(([s]) => s === "polling" || s === "live"));
  rec.sub.close();
});

// A TCP proxy in front of the server that a test can cut (every connection dropped) or
// take down (nothing listening) and bring back on the same port.
async function proxy() {
  const target = new URL(BASE);
  const sockets = new Set();
  const handle = (client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => { client.destroy(); upstream.destroy(); });
    }
    client.pipe(upstream);
    upstream.pipe(client);
  };
  let server = net.createServer(handle);
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = server.address().port;
  const cut = () => { for (const s of sockets) s.destroy(); };
  return {
    url: `http://127.0.0.1:${port}`,
    cut,
    async down() {
      await new Promise((resolve) => { server.close(resolve); cut(); });
    },
    async up() {
      server = net.createServer(handle);
      await new Promise((resolve) => server.listen(port, "127.0.0.1", resolve));
    },
    async stop() {
      cut();
      await new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

for (const transport of ["sse", "ws"]) {
  test(`${transport}: a dropped connection reconnects by itself and resumes with no loss and no duplicate`, async () => {
    const p = await proxy();
    try {
      const client = new Tandem({ base: p.url, token: alice.token, refreshToken: alice.refreshToken });
      const start = (await alice.getSession(SID)).last_seq;
      const rec = follow(client, SID, { transport, after: start, backoffBase: 50 });
      await rec.live();
      const first = await publish(bob, 3, `${transport}-before-cut`);
      await waitFor(() => rec.persisted().length >= 3, "events before the cut");
      p.cut();
      const during = await publish(bob, 3, `${transport}-during-cut`); // while it is away
      await waitFor(() => rec.persisted().length >= 6, "events after the reconnect");
      await rec.live();
      assert.deepEqual(rec.seqs(), [...first, ...during]);
      const reconnecting = rec.statuses.filter(([s]) => s === "reconnecting").map(([, info]) => info);
      assert.ok(reconnecting.length >= 1 && reconnecting.every((info) => info.reason !== "server_unreachable"));
      assert.equal(rec.events.filter((e) => e.type === "server.connected").at(-1).properties.resumed, true);
    } finally {
      await p.stop();
    }
  });
}

test("a server that goes away: server_unreachable, /healthz probes, live again once it answers", async () => {
  const p = await proxy();
  try {
    const client = new Tandem({ base: p.url, token: alice.token, refreshToken: alice.refreshToken });
    const start = (await alice.getSession(SID)).last_seq;
    const rec = follow(client, SID, { transport: "ws", after: start, healthProbeInterval: 100 });
    await rec.live();
    await p.down();
    await waitFor(() => rec.statuses.some(([s, info]) => s === "reconnecting" && info.reason === "server_unreachable"),
      "server_unreachable");
    const missed = await publish(bob, 2, "while-down");
    await new Promise((resolve) => setTimeout(resolve, 4000)); // three failed attempts with the default backoff: polling, before
    assert.ok(!rec.statuses.some(([s]) => s === "polling"));
    await p.up();
    await waitFor(() => rec.persisted().length >= 2, "the events published while down");
    await rec.live();
    assert.deepEqual(rec.seqs(), missed);
    assert.ok(rec.statuses.some(([s, info]) => s === "reconnecting" && info.reason === "server_back"));
  } finally {
    await p.stop();
  }
});
