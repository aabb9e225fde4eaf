/**
 * Tandem browser client: REST calls and live event streams that survive disconnects.
 *
 * An ES module with no dependencies and no build step:
 *
 *     import { Tandem, TandemError } from "/static/js/tandem.js";
 *     const tandem = new Tandem({ onAuthLost: () => location.assign(`/accounts/login/?next=${encodeURIComponent(location.pathname)}`) });
 *     const sub = tandem.subscribe(sessionId, { onEvent: (e) => apply(e) });
 *
 * The wire contract is PROTOCOL.md (v1); docs/CLIENT.md explains this module's guarantees.
 */

const UNSAFE_METHODS = new Set(["POST", "PUT", "PATCH", "DELETE"]);

// WebSocket close codes (docs/API.md, "Close codes") after which reconnecting cannot help.
const WS_FATAL = { 4400: "bad_request", 4403: "forbidden", 4404: "not_found" };

const DEFAULTS = {
  pollInterval: 2000, // polling fallback: one GET …/events/ every this many ms
  transportRetryInterval: 30000, // while polling, try the real transport again this often
  maxFailures: 3, // attempts in a row that never reached server.connected before polling
  connectTimeout: 10000, // an attempt without server.connected by then has failed (buffering proxies)
  idleTimeout: 45000, // no frame at all for this long (heartbeats come every 15 s): the link is dead
  commandTimeout: 30000, // a WebSocket command without a reply by then is rejected
  liveResetAfter: 5000, // a connection live this long resets the backoff
  backoffBase: 500, // ms; delay = min(backoffMax, backoffBase * 2^n) * random[0.5, 1]
  backoffMax: 30000,
};

/**
 * An error from the API (the `{"error": {"code", "message", "details"}}` shape), the
 * network, or a WebSocket command.
 */
export class TandemError extends Error {
  /**
   * @param {string} message for humans
   * @param {{status?: number, code?: string, details?: object}} [fields]
   *   status: the HTTP status, or 0 for network failures and WebSocket replies;
   *   code: the API's error code (`not_found`, `validation_error`, …) or one of this
   *   module's own: `network_error`, `bad_response`, `not_connected`, `timeout`;
   *   details: the error's `details` object (field → messages for `validation_error`).
   */
  constructor(message, { status = 0, code = "error", details = {} } = {}) {
    super(message);
    this.name = "TandemError";
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

function readCookie(name) {
  if (typeof document === "undefined") return null;
  for (const part of document.cookie.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return null;
}

function isOnline() {
  return typeof navigator === "undefined" || navigator.onLine !== false;
}

function report(err) {
  if (typeof reportError === "function") reportError(err); // shows up like an uncaught error
  else console.error(err);
}

// A callback that throws must not break the stream: report it and carry on.
function safeCall(fn, ...args) {
  if (typeof fn !== "function") return undefined;
  try {
    return fn(...args);
  } catch (err) {
    report(err);
    return undefined;
  }
}

/** The client: REST with the page's Django session cookie, and subscriptions. */
export class Tandem {
  /**
   * @param {object} [options]
   * @param {string} [options.base] prefix for every path ("" = this origin). Cookie
   *   auth only works on the page's own origin.
   * @param {(() => void)|null} [options.onAuthLost] called when the server says the
   *   user is no longer logged in (a 401, or a WebSocket closed with 4401). Called once
   *   per loss: again only after a request has succeeded in between.
   */
  constructor({ base = "", onAuthLost = null } = {}) {
    this.base = String(base).replace(/\/+$/, "");
    this.onAuthLost = onAuthLost;
    this._authLost = false;
  }

  /**
   * One JSON request. Unsafe methods carry the `csrftoken` cookie as `X-CSRFToken`.
   * @param {string} method GET, POST, PATCH, DELETE, …
   * @param {string} path e.g. "/api/sessions/" (prefixed with `base`), or an absolute
   *   http(s) URL such as a list's `next` link (used as is)
   * @param {*} [body] sent as JSON when not undefined
   * @returns {Promise<*>} the parsed JSON, or null for 204
   * @throws {TandemError} on any non-2xx (built from the error shape) or network failure
   */
  async request(method, path, body = undefined) {
    method = String(method).toUpperCase();
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (UNSAFE_METHODS.has(method)) {
      const token = readCookie("csrftoken");
      if (token) headers["X-CSRFToken"] = token;
    }
    let response;
    let text;
    try {
      // Absolute URLs (a list's `next` link) are used as they are.
      const url = /^https?:\/\//.test(path) ? path : this.base + path;
      response = await fetch(url, init);
      text = await response.text();
    } catch (err) {
      throw new TandemError(`Network error: ${err && err.message ? err.message : err}`, {
        status: 0, code: "network_error",
      });
    }
    if (response.status === 401) this._notifyAuthLost();
    else if (response.ok) this._authLost = false;
    let data = null;
    let parsed = false;
    if (text) {
      try {
        data = JSON.parse(text);
        parsed = true;
      } catch {
        parsed = false;
      }
    }
    if (!response.ok) {
      const error = parsed && data && typeof data.error === "object" && data.error ? data.error : {};
      throw new TandemError(error.message || `HTTP ${response.status}`, {
        status: response.status,
        code: error.code || `http_${response.status}`,
        details: error.details || {},
      });
    }
    if (response.status === 204 || !text) return null;
    if (!parsed) {
      throw new TandemError("The server's answer is not JSON.", { status: response.status, code: "bad_response" });
    }
    return data;
  }

  /** GET path → parsed JSON. */
  get(path) { return this.request("GET", path); }
  /** POST path with a JSON body → parsed JSON. */
  post(path, body) { return this.request("POST", path, body); }
  /** PATCH path with a JSON body → parsed JSON. */
  patch(path, body) { return this.request("PATCH", path, body); }
  /** DELETE path → null (204) or parsed JSON. */
  del(path) { return this.request("DELETE", path); }

  /**
   * Every item of a paginated list (`{"results", "next"}`), following `next` links.
   * @param {string} path
   * @returns {Promise<object[]>}
   */
  async getAll(path) {
    const items = [];
    for (let next = path; next; ) {
      const page = await this.get(next);
      items.push(...(page.results || []));
      next = page.next;
    }
    return items;
  }

  /**
   * Fork a session: a new session of yours holding its messages up to and including
   * `messageId` (default: every ended one).
   * @param {string} sessionId
   * @param {{messageId?: string, title?: string}} [options]
   * @returns {Promise<object>} the new Session (with `forked_from`)
   */
  fork(sessionId, { messageId, title } = {}) {
    const body = {};
    if (messageId !== undefined) body.message_id = messageId;
    if (title !== undefined) body.title = title;
    return this.post(`/api/sessions/${encodeURIComponent(sessionId)}/fork/`, body);
  }

  /**
   * Where a session's export downloads from (cookie auth: a plain link works).
   * @param {string} sessionId
   * @param {"markdown"|"json"} [format]
   * @returns {string}
   */
  exportUrl(sessionId, format = "markdown") {
    return `${this.base}/api/sessions/${encodeURIComponent(sessionId)}/export/?format=${encodeURIComponent(format)}`;
  }

  /**
   * One page of search hits across your sessions, best first.
   * @param {string} q 1–200 characters
   * @param {{limit?: number, next?: string}} [options] `next`: the previous page's link
   * @returns {Promise<{results: object[], next: string|null}>}
   */
  search(q, { limit = 20, next = null } = {}) {
    if (next) return this.get(next);
    return this.get(`/api/search/?q=${encodeURIComponent(q)}&limit=${limit}`);
  }

  /**
   * A short-lived stream ticket (60 s, reusable until it expires).
   * @returns {Promise<string>}
   */
  async ticket() {
    const data = await this.post("/api/auth/ticket/");
    return data.ticket;
  }

  /** Whether `base` is the page's own origin, where the session cookie goes along. */
  sameOrigin() {
    if (typeof location === "undefined") return false;
    return this.base === "" || new URL(this.base, location.href).origin === location.origin;
  }

  /**
   * Follow a session's events, or (sessionId null) the user-level stream of every
   * session the user belongs to. Connects at once; reconnects and resumes by itself.
   *
   * @param {string|null} sessionId
   * @param {object} [options]
   * @param {number|string|null} [options.after] resume position: a seq for a session
   *   stream (0 = from the start), a cursor string for the user-level stream; null =
   *   live events only.
   * @param {string[]|string|null} [options.types] type patterns (`message.*`,
   *   `task.progress`); server.* and stream.* always pass. A filtered session stream
   *   has gaps in its seqs by design, so gap detection is off for it.
   * @param {"sse"|"ws"} [options.transport] "sse" (default) or "ws" (needed for send()).
   * @param {(envelope: object) => void} [options.onEvent] every envelope in order:
   *   persisted ones exactly once, in seq order per session; also the ephemeral ones
   *   (server.connected, server.heartbeat, stream.reset, presence.*, session.deleted,
   *   auth.expired). Never WebSocket command replies.
   * @param {(status: string, info: object) => void} [options.onStatus] "connecting",
   *   "live", "reconnecting", "polling", "offline" or "closed" (final).
   * @param {(info: {reason: string, last_seq: number, session_id: string|null}) => (void|Promise)} [options.onReset]
   *   the events after our position are gone (history_expired) or the position is
   *   unknown (unknown_position): refetch state over REST. Events after last_seq follow;
   *   if it returns a promise, none is delivered until that promise settles.
   * @param {number} [options.pollInterval] ms between polls in the fallback (2000).
   * @param {number} [options.transportRetryInterval] ms between attempts to leave polling (30000).
   * @param {number} [options.maxFailures] failed connects in a row before polling (3).
   * @param {number} [options.connectTimeout] ms to wait for server.connected (10000).
   * @param {number} [options.idleTimeout] ms of silence that means a dead link (45000).
   * @param {number} [options.commandTimeout] ms to wait for a command's reply (30000).
   * @returns {Subscription}
   */
  subscribe(sessionId, options = {}) {
    const sub = new Subscription(this, sessionId, options);
    sub._start();
    return sub;
  }

  _notifyAuthLost() {
    if (this._authLost) return;
    this._authLost = true;
    safeCall(this.onAuthLost);
  }
}

/**
 * One live subscription, made by `Tandem.subscribe`. All state changes go through one
 * queue (`_inbox`), handled one envelope at a time, so a gap can be filled over REST
 * before anything after it is delivered.
 */
class Subscription {
  constructor(client, sessionId, options) {
    const {
      after = null, types = null, transport = "sse",
      onEvent = null, onStatus = null, onReset = null, ...tuning
    } = options || {};
    this._client = client;
    this._sessionId = sessionId == null ? null : String(sessionId);
    this._types = types == null ? null : (Array.isArray(types) ? types : String(types).split(",")).filter(Boolean);
    if (this._types && this._types.length === 0) this._types = null;
    if (transport !== "sse" && transport !== "ws") throw new TypeError(`Unknown transport: ${transport}`);
    this._transport = transport;
    this._opts = { ...DEFAULTS, ...tuning };
    this._onEvent = onEvent;
    this._onStatus = onStatus;
    this._onReset = onReset;

    // Positions. A session stream has one seq; the user-level stream has the server's
    // cursor (opaque, used to resume) and, for de-duplication, the last seq per session.
    this._lastSeq = null;
    this._cursor = null;
    this._seqs = new Map();
    if (after != null) {
      if (this._sessionId !== null) {
        const seq = Number(after);
        if (!Number.isInteger(seq) || seq < 0) throw new TypeError("after must be a non-negative integer seq");
        this._lastSeq = seq;
      } else {
        this._cursor = String(after);
      }
    }

    this._status = null;
    this._final = false; // closed for good
    this._conn = null; // the current transport attempt or connection
    this._attempt = 0; // backoff exponent
    this._failures = 0; // attempts in a row that never got server.connected
    this._retryTimer = null;
    this._polling = null; // {closed, timer} while the polling fallback runs
    this._inbox = [];
    this._pumping = false;
    this._pending = new Map(); // WebSocket command id → {resolve, reject, timer}
    this._commandSeq = 0;

    this._handleOffline = () => this._goOffline();
    this._handleOnline = () => this._backOnline();
  }

  // ------------------------------------------------------------------ public

  /** The current status: connecting, live, reconnecting, polling, offline or closed. */
  get status() { return this._status; }
  /** Session streams: the seq of the last persisted event delivered (or the position
   * the stream started from); null before the first connect of a live-only stream. */
  get lastSeq() { return this._lastSeq; }
  /** User-level stream: the cursor that resumes after the last event delivered. */
  get cursor() { return this._cursor; }
  /** The session id, or null for the user-level stream. */
  get sessionId() { return this._sessionId; }
  /** "sse" or "ws". */
  get transport() { return this._transport; }

  /** Stop for good: closes the connection and any polling; status becomes "closed". */
  close() {
    this._terminate("closed");
  }

  /**
   * Drop the current connection (or polling) and connect again at once, resuming from
   * the last position. For a "Retry now" button; does nothing once closed.
   */
  reconnect() {
    if (this._final) return;
    this._attempt = 0;
    this._failures = 0;
    this._stopPolling();
    this._closeConn(this._conn);
    this._setStatus("reconnecting", { attempt: 0, delay: 0, reason: "requested" });
    this._connect();
  }

  /**
   * Send a WebSocket command (`{type: "ping"}`, `{type: "publish", event: {…}}`,
   * `{type: "prompt", parts: […]}`, …; on the user-level stream add `session_id`).
   * An `id` is assigned here.
   * @param {object} command
   * @returns {Promise<*>} the ack's `result`, or the `pong` frame for a ping
   * @throws {TandemError} on an `error` reply (its code/details), `not_connected` when
   *   the WebSocket is not live (or closes before the reply), `timeout` without a reply
   */
  send(command) {
    const conn = this._conn;
    if (this._transport !== "ws" || !conn || conn.closed || !conn.connected || !conn.ws
        || conn.ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new TandemError("The WebSocket is not connected.", { code: "not_connected" }));
    }
    const id = `c${++this._commandSeq}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new TandemError("No reply to the command.", { code: "timeout" }));
      }, this._opts.commandTimeout);
      this._pending.set(id, { resolve, reject, timer });
      try {
        conn.ws.send(JSON.stringify({ ...command, id }));
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new TandemError(`Could not send: ${err.message}`, { code: "not_connected" }));
      }
    });
  }

  // ------------------------------------------------------------------ lifecycle

  _start() {
    if (typeof window !== "undefined") {
      window.addEventListener("offline", this._handleOffline);
      window.addEventListener("online", this._handleOnline);
    }
    if (!isOnline()) {
      this._goOffline();
      return;
    }
    this._connect();
  }

  _setStatus(status, info = {}) {
    // Repeated "reconnecting" is reported too: each attempt has a new delay.
    if (this._status === status && status !== "reconnecting") return;
    this._status = status;
    safeCall(this._onStatus, status, info);
  }

  _terminate(reason, info = {}) {
    if (this._final) return;
    this._final = true;
    clearTimeout(this._retryTimer);
    this._stopPolling();
    this._closeConn(this._conn);
    this._inbox.length = 0;
    if (typeof window !== "undefined") {
      window.removeEventListener("offline", this._handleOffline);
      window.removeEventListener("online", this._handleOnline);
    }
    this._status = null; // make sure "closed" is reported even if it was the status
    this._setStatus("closed", { reason, ...info });
  }

  _goOffline() {
    if (this._final) return;
    clearTimeout(this._retryTimer);
    this._stopPolling();
    this._closeConn(this._conn);
    this._setStatus("offline", {});
  }

  _backOnline() {
    if (this._final || this._status !== "offline") return;
    // The failures were the network's, not the server's: start afresh, at once.
    this._attempt = 0;
    this._failures = 0;
    this._setStatus("reconnecting", { attempt: 0, delay: 0, reason: "online" });
    this._connect();
  }

  /** Open one attempt of the chosen transport, with a fresh ticket. */
  async _connect() {
    if (this._final) return;
    clearTimeout(this._retryTimer);
    this._closeConn(this._conn);
    if (!isOnline()) {
      this._goOffline();
      return;
    }
    let transport = this._transport;
    if (transport === "sse" && typeof EventSource === "undefined") {
      if (this._sessionId !== null) {
        this._startPolling("no_eventsource"); // nothing to try again later either
        return;
      }
      transport = "ws"; // the user-level stream has no polling endpoint
    }
    if (this._status === null) {
      this._setStatus("connecting", { transport });
      if (this._final) return; // closed from inside onStatus
    }
    const conn = { kind: transport, closed: false, connected: false, timers: {} };
    this._conn = conn;

    // On the page's own origin EventSource sends the session cookie by itself: no ticket
    // (a credential in the URL, valid for a minute) and one request less per attempt.
    const byCookie = transport === "sse" && this._client.sameOrigin();
    let ticket = null;
    if (!byCookie) {
      try {
        ticket = await this._client.ticket();
      } catch (err) {
        if (conn.closed || this._final) return;
        if (err.status === 401) {
          this._terminate("auth_lost", { error: err });
          return;
        }
        this._failed(conn, "ticket", err);
        return;
      }
      if (conn.closed || this._final) return;
    }

    const params = new URLSearchParams(ticket ? { ticket } : {});
    const position = this._sessionId !== null ? this._lastSeq : this._cursor;
    if (position != null) params.set("last_event_id", String(position));
    if (this._types) params.set("types", this._types.join(","));
    const sid = this._sessionId !== null ? encodeURIComponent(this._sessionId) : null;

    // A proxy that buffers the stream lets the request "succeed" but sends nothing.
    conn.timers.connect = setTimeout(() => this._failed(conn, "connect_timeout"), this._opts.connectTimeout);
    this._touch(conn);
    if (transport === "sse") this._openSSE(conn, sid, params);
    else this._openWS(conn, sid, params);
  }

  _openSSE(conn, sid, params) {
    const path = sid !== null ? `/api/sessions/${sid}/stream/` : "/api/stream/";
    const source = new EventSource(`${this._client.base}${path}?${params}`);
    conn.close = () => source.close();
    source.onmessage = (message) => {
      let envelope;
      try {
        envelope = JSON.parse(message.data);
      } catch {
        return;
      }
      this._receive(conn, envelope);
    };
    // EventSource would reconnect by itself with a stale ticket and without our
    // backoff: close it and decide here.
    source.onerror = () => this._failed(conn, "error");
  }

  _openWS(conn, sid, params) {
    const path = sid !== null ? `/ws/sessions/${sid}/` : "/ws/stream/";
    const url = new URL(`${this._client.base}${path}?${params}`, location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    let socket;
    try {
      socket = new WebSocket(url.href);
    } catch (err) {
      this._failed(conn, "error", err);
      return;
    }
    conn.ws = socket;
    conn.close = () => {
      try {
        socket.close(1000);
      } catch {
        /* already closing */
      }
    };
    socket.onmessage = (message) => {
      if (typeof message.data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (frame && !("seq" in frame) && (frame.type === "ack" || frame.type === "error" || frame.type === "pong")) {
        this._touch(conn);
        this._reply(frame);
        return;
      }
      this._receive(conn, frame);
    };
    socket.onclose = (event) => this._wsClosed(conn, event.code);
  }

  _wsClosed(conn, code) {
    if (conn.closed || this._final) return;
    if (code === 4401) {
      this._client._notifyAuthLost();
      this._terminate("auth_lost", { code });
      return;
    }
    if (WS_FATAL[code]) {
      this._terminate(WS_FATAL[code], { code });
      return;
    }
    this._failed(conn, "ws_closed", { code });
  }

  _reply(frame) {
    const pending = this._pending.get(String(frame.id));
    if (!pending) return; // e.g. an error about a frame we did not send with an id
    this._pending.delete(String(frame.id));
    clearTimeout(pending.timer);
    if (frame.type === "error") {
      const error = frame.error || {};
      pending.reject(new TandemError(error.message || "The command failed.", {
        status: 0, code: error.code || "error", details: error.details || {},
      }));
    } else if (frame.type === "pong") {
      pending.resolve(frame);
    } else {
      pending.resolve(frame.result);
    }
  }

  _rejectPending(code) {
    for (const [id, pending] of this._pending) {
      clearTimeout(pending.timer);
      pending.reject(new TandemError("The connection closed before the reply.", { code }));
      this._pending.delete(id);
    }
  }

  /** Stop listening to `conn` (idempotent). Its queued envelopes will be skipped. */
  _closeConn(conn) {
    if (!conn || conn.closed) return;
    conn.closed = true;
    for (const timer of Object.values(conn.timers)) clearTimeout(timer);
    if (conn.close) conn.close();
    if (this._conn === conn) this._conn = null;
    if (conn.kind === "ws") this._rejectPending("not_connected");
  }

  /** Any frame proves the link works; silence longer than idleTimeout means it does not. */
  _touch(conn) {
    clearTimeout(conn.timers.idle);
    conn.timers.idle = setTimeout(() => this._failed(conn, "idle_timeout"), this._opts.idleTimeout);
  }

  /**
   * The attempt or connection `conn` ended without us asking. Decide what next:
   * back off and reconnect, fall back to polling, or give up for good.
   */
  async _failed(conn, reason, detail = undefined) {
    if (!conn || conn.closed || this._final) return;
    const wasConnected = conn.connected;
    this._closeConn(conn);
    if (!isOnline()) {
      this._goOffline();
      return;
    }
    if (!wasConnected) this._failures += 1;

    // EventSource cannot read the HTTP status of a refusal. Ask REST whether the
    // session is still ours, so a removed member stops instead of retrying forever.
    // The user-level stream asks for a ticket instead, which only says whether the user
    // is still signed in (its SSE attempts send the cookie, not a ticket).
    if (!wasConnected && conn.kind === "sse" && reason === "error") {
      try {
        if (this._sessionId !== null) await this._client.get(`/api/sessions/${encodeURIComponent(this._sessionId)}/`);
        else await this._client.ticket();
      } catch (err) {
        if (this._final) return;
        if (err.status === 401) return this._terminate("auth_lost", { error: err });
        if (err.status === 403 || err.status === 404) return this._terminate("not_found", { error: err });
      }
      // Closed, offline or superseded (reconnect()) meanwhile: nothing left to decide.
      if (this._final || this._conn !== null || this._status === "offline") return;
    }

    if (this._polling) {
      this._scheduleTransportRetry();
      return;
    }
    if (!wasConnected && this._failures >= this._opts.maxFailures && this._sessionId !== null) {
      this._startPolling("connect_failed");
      return;
    }
    this._scheduleReconnect(reason === "auth_expired" ? 0 : undefined, reason, detail);
  }

  _scheduleReconnect(delay, reason, detail) {
    if (delay === undefined) {
      const ceiling = Math.min(this._opts.backoffMax, this._opts.backoffBase * 2 ** this._attempt);
      delay = ceiling * (0.5 + Math.random() * 0.5); // jitter: clients that lost the same server spread out
      this._attempt = Math.min(this._attempt + 1, 20);
    }
    const info = { attempt: this._attempt, delay: Math.round(delay), reason };
    if (reason === "ws_closed" && detail) info.code = detail.code; // the WebSocket close code
    this._setStatus("reconnecting", info);
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._connect(), delay);
  }

  // ------------------------------------------------------------------ polling

  _startPolling(reason) {
    if (this._final || this._polling) return;
    const poll = { closed: false, timer: null };
    this._polling = poll;
    this._setStatus("polling", { reason, interval: this._opts.pollInterval });
    if (poll.closed || this._final) return; // onStatus may close() or reconnect()
    this._pollOnce(poll);
    if (reason !== "no_eventsource") this._scheduleTransportRetry();
  }

  _stopPolling() {
    if (!this._polling) return;
    this._polling.closed = true;
    clearTimeout(this._polling.timer);
    this._polling = null;
    clearTimeout(this._retryTimer);
  }

  _scheduleTransportRetry() {
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._connect(), this._opts.transportRetryInterval);
  }

  async _pollOnce(poll) {
    if (poll.closed || this._final) return;
    const sid = encodeURIComponent(this._sessionId);
    try {
      if (this._lastSeq === null) {
        // Live-only and never connected: start from the head, as the stream would.
        const session = await this._client.get(`/api/sessions/${sid}/`);
        if (poll.closed) return;
        if (this._lastSeq === null) this._lastSeq = session.last_seq;
      }
      let after = this._lastSeq;
      const types = this._types ? `&types=${encodeURIComponent(this._types.join(","))}` : "";
      for (;;) {
        const page = await this._client.get(`/api/sessions/${sid}/events/?after=${after}&limit=1000${types}`);
        if (poll.closed) return;
        if (page.reset) {
          this._enqueue(poll, this._syntheticReset(this._sessionId, after, page.last_seq));
          break;
        }
        for (const envelope of page.events) this._enqueue(poll, envelope);
        if (page.events.length < 1000) break;
        after = page.events[page.events.length - 1].seq;
      }
    } catch (err) {
      if (poll.closed || this._final) return;
      if (err.status === 401) return this._terminate("auth_lost", { error: err });
      if (err.status === 403 || err.status === 404) return this._terminate("not_found", { error: err });
      // A network error or a 5xx: keep polling.
    }
    if (poll.closed || this._final) return;
    poll.timer = setTimeout(() => this._pollOnce(poll), this._opts.pollInterval);
  }

  _syntheticReset(sessionId, after, lastSeq) {
    // The events endpoint says `reset: true` without a reason; the stream would have said this.
    return {
      seq: null, session_id: sessionId, type: "stream.reset", time: new Date().toISOString(),
      properties: { reason: after > lastSeq ? "unknown_position" : "history_expired", last_seq: lastSeq },
    };
  }

  // ------------------------------------------------------------------ delivery

  _receive(conn, envelope) {
    if (conn.closed || this._final || !envelope || typeof envelope !== "object") return;
    this._touch(conn);
    this._enqueue(conn, envelope);
  }

  _enqueue(source, envelope) {
    this._inbox.push({ source, envelope });
    this._pump();
  }

  async _pump() {
    if (this._pumping) return;
    this._pumping = true;
    try {
      while (this._inbox.length && !this._final) {
        const { source, envelope } = this._inbox.shift();
        // What a dropped connection had queued is skipped: our position did not move
        // past it, so whatever connects next resumes from there and sends it again.
        if (source.closed) continue;
        try {
          await this._handle(source, envelope);
        } catch (err) {
          if (this._final) break;
          if (err && err.status === 401) {
            this._terminate("auth_lost", { error: err });
          } else if (err && (err.status === 403 || err.status === 404) && this._sessionId !== null) {
            this._terminate("not_found", { error: err });
          } else if (source === this._conn) {
            // Could not fill a gap (network): reconnect; the resume fills it instead.
            this._failed(source, "gap_fill_failed", err);
          }
        }
      }
    } finally {
      this._pumping = false;
    }
  }

  async _handle(source, envelope) {
    const type = envelope.type;
    if (type === "server.connected") {
      this._connected(source, envelope);
      this._emit(envelope);
      return;
    }
    if (type === "stream.reset") {
      await this._reset(envelope);
      return;
    }
    if (envelope.seq === null || envelope.seq === undefined) {
      this._emit(envelope);
      if (type === "session.deleted") this._sessionDeleted(envelope);
      else if (type === "auth.expired" && source === this._conn) this._failed(source, "auth_expired");
      return;
    }
    const sid = this._sessionId !== null ? this._sessionId : envelope.session_id;
    if (this._isDuplicate(sid, envelope.seq)) return;
    const last = this._position(sid);
    if (last !== null && envelope.seq > last + 1 && this._types === null) {
      await this._fillGap(sid, envelope.seq - 1);
      if (this._final || source.closed || this._isDuplicate(sid, envelope.seq)) return;
    }
    this._accept(sid, envelope);
  }

  _connected(conn, envelope) {
    if (conn !== this._conn) return; // polling items never carry server.connected
    clearTimeout(conn.timers.connect);
    conn.connected = true;
    this._failures = 0;
    conn.timers.live = setTimeout(() => { this._attempt = 0; }, this._opts.liveResetAfter);
    const props = envelope.properties || {};
    if (this._sessionId !== null) {
      if (this._lastSeq === null && typeof props.last_seq === "number") this._lastSeq = props.last_seq;
    } else if (props.cursor) {
      this._cursor = props.cursor; // where the server will go on from (resets included)
    }
    this._stopPolling();
    this._setStatus("live", { transport: conn.kind, resumed: !!props.resumed, connection_id: props.connection_id });
  }

  async _reset(envelope) {
    const props = envelope.properties || {};
    const sessionId = this._sessionId !== null ? this._sessionId : envelope.session_id || null;
    const lastSeq = typeof props.last_seq === "number" ? props.last_seq : 0;
    if (this._sessionId !== null) this._lastSeq = lastSeq;
    else if (sessionId) this._seqs.set(sessionId, lastSeq);
    const info = { reason: props.reason, last_seq: lastSeq, session_id: sessionId };
    const result = safeCall(this._onReset, info);
    // A page that returns its refetch promise gets nothing newer until its state is back.
    if (result && typeof result.then === "function") {
      try {
        await result;
      } catch (err) {
        report(err);
      }
    }
    this._emit(envelope);
  }

  _sessionDeleted(envelope) {
    const deleted = (envelope.properties && envelope.properties.session_id) || envelope.session_id;
    if (this._sessionId !== null) {
      if (deleted === this._sessionId) this._terminate("session_deleted");
    } else if (deleted) {
      this._seqs.delete(deleted);
    }
  }

  _position(sid) {
    if (this._sessionId !== null) return this._lastSeq;
    return this._seqs.has(sid) ? this._seqs.get(sid) : null;
  }

  _isDuplicate(sid, seq) {
    const last = this._position(sid);
    return last !== null && seq <= last;
  }

  _accept(sid, envelope) {
    if (this._sessionId !== null) this._lastSeq = envelope.seq;
    else this._seqs.set(sid, envelope.seq);
    if (envelope.cursor) this._cursor = envelope.cursor;
    this._emit(envelope);
  }

  /** Deliver the missing seqs (position, upto] from the events endpoint, in order. */
  async _fillGap(sid, upto) {
    const path = `/api/sessions/${encodeURIComponent(sid)}/events/`;
    while (!this._final) {
      const after = this._position(sid);
      if (after === null || after >= upto) return;
      let page;
      try {
        page = await this._client.get(`${path}?after=${after}&limit=1000`);
      } catch (err) {
        // On the user-level stream a session we lost access to is not worth a reconnect.
        if (this._sessionId === null && (err.status === 403 || err.status === 404)) return;
        throw err;
      }
      if (page.reset) {
        await this._reset(this._syntheticReset(sid, after, page.last_seq));
        return;
      }
      for (const envelope of page.events) {
        if (!this._isDuplicate(sid, envelope.seq)) this._accept(sid, envelope);
      }
      // Nothing (more) to fill with: deliver what we have rather than loop.
      if (this._position(sid) === after) return;
    }
  }

  _emit(envelope) {
    safeCall(this._onEvent, envelope);
  }
}

export { Subscription };

/**
 * A search hit's snippet as DOM nodes: text nodes, and a `<mark>` around each
 * highlighted range. The snippet is user text: it is only ever set as text, never
 * parsed as HTML, so markup in a message stays inert.
 * @param {string} snippet plain text
 * @param {Array<[number, number]>} highlights `[start, end)` in Unicode code points
 * @returns {DocumentFragment}
 */
export function markSnippet(snippet, highlights = []) {
  const chars = Array.from(String(snippet)); // code points, as the server counts
  const fragment = document.createDocumentFragment();
  let at = 0;
  const ranges = [...highlights]
    .filter((r) => Array.isArray(r) && Number.isInteger(r[0]) && Number.isInteger(r[1]))
    .sort((a, b) => a[0] - b[0]);
  for (const [start, end] of ranges) {
    if (start < at || end <= start || end > chars.length) continue;
    if (start > at) fragment.append(document.createTextNode(chars.slice(at, start).join("")));
    const mark = document.createElement("mark");
    mark.textContent = chars.slice(start, end).join("");
    fragment.append(mark);
    at = end;
  }
  if (at < chars.length) fragment.append(document.createTextNode(chars.slice(at).join("")));
  return fragment;
}
