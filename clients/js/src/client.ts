/**
 * Tandem client: REST calls and live event streams that survive disconnects, for
 * browsers (cookie + CSRF, or a token) and Node ≥ 20 (a token; `eventsource` and `ws`
 * from npm, see node.ts).
 *
 *     import { Tandem, TandemError } from "/static/js/tandem.js";
 *     const tandem = new Tandem({ onAuthLost: () => location.assign("/accounts/login/") });
 *     const sub = tandem.subscribe(sessionId, { onEvent: (e) => apply(e) });
 *
 * The wire contract is PROTOCOL.md (v1.3); docs/CLIENT.md explains the guarantees.
 */
import { TandemError, errorFields } from "./errors.js";
import { TabHub, type SharedSpec } from "./tabs.js";
import type {
  Command, ConnectionStatus, Envelope, EventsPage, IfBusy, Page, Part, ResetInfo, StatusInfo,
} from "./types.js";

const UNSAFE_METHODS = new Set(["POST", "PUT", "PATCH", "DELETE"]);

// WebSocket close codes (docs/API.md, "Close codes") after which reconnecting cannot help.
const WS_FATAL: Record<number, string> = { 4400: "bad_request", 4403: "forbidden", 4404: "not_found" };
const WS_OPEN = 1; // WebSocket.OPEN, the same in browsers and npm ws

export interface Tuning {
  /** Polling fallback: one GET …/events/ every this many ms (2000). */
  pollInterval: number;
  /** While polling, try the real transport again this often (30000). */
  transportRetryInterval: number;
  /** Attempts in a row that reached a live server but never got server.connected, before polling (3). */
  maxFailures: number;
  /** An attempt without server.connected by then has failed: buffering proxies (10000). */
  connectTimeout: number;
  /** No frame at all for this long (heartbeats come every 15 s): the link is dead (45000). */
  idleTimeout: number;
  /** A WebSocket command without a reply by then is rejected (30000). */
  commandTimeout: number;
  /** A connection live this long resets the backoff (5000). */
  liveResetAfter: number;
  /** ms; delay = min(backoffMax, backoffBase * 2^n) * random[0.5, 1]. */
  backoffBase: number;
  backoffMax: number;
  /** While the server does not answer, probe `/healthz` every this many ms × random[0.5, 1] (1000). */
  healthProbeInterval: number;
  /** A probe without an answer by then counts as down (3000). */
  healthProbeTimeout: number;
}

export const DEFAULTS: Tuning = {
  pollInterval: 2000,
  transportRetryInterval: 30000,
  maxFailures: 3,
  connectTimeout: 10000,
  idleTimeout: 45000,
  commandTimeout: 30000,
  liveResetAfter: 5000,
  backoffBase: 500,
  backoffMax: 30000,
  healthProbeInterval: 1000,
  healthProbeTimeout: 3000,
};

/** Anything shaped like the browser's EventSource (npm `eventsource` is). */
export interface EventSourceLike {
  onmessage: ((message: { data: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  close(): void;
}
export type EventSourceConstructor = new (url: string, init?: any) => EventSourceLike;

/** Anything shaped like the browser's WebSocket (npm `ws` is). */
export interface WebSocketLike {
  readyState: number;
  onmessage: ((message: { data: unknown }) => void) | null;
  onclose: ((event: { code: number }) => void) | null;
  onerror?: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number): void;
}
export type WebSocketConstructor = new (url: string, protocols?: any) => WebSocketLike;

export interface TandemOptions {
  /** Prefix for every path ("" = this page's origin). Node needs an absolute URL. */
  base?: string;
  /** Called when the server says the user is no longer signed in (a 401 that a token
   * refresh could not cure, or a WebSocket closed with 4401); once per loss. */
  onAuthLost?: (() => void) | null;
  /** An access JWT, or an API key (`tdm_…`, which is never refreshed): sent as
   * `Authorization: Bearer` on REST calls (Node, services). */
  token?: string | null;
  /** A refresh JWT: a 401 first tries `POST /api/auth/token/refresh/`, then repeats the call. */
  refreshToken?: string | null;
  /** Told every new access token (to store it). */
  onToken?: ((access: string) => void) | null;
  /** fetch to use (default: the global one). */
  fetch?: typeof fetch;
  /** EventSource implementation (default: the global one; node.ts passes npm `eventsource`). */
  EventSource?: EventSourceConstructor | null;
  /** WebSocket implementation (default: the global one; node.ts passes npm `ws`). */
  WebSocket?: WebSocketConstructor | null;
  /**
   * Browsers: share live streams between this origin's tabs (one leader tab holds the
   * connection, elected with Web Locks, and relays over BroadcastChannel). A string
   * names the group (e.g. per user); true uses "tandem". Ignored where the browser
   * lacks BroadcastChannel or navigator.locks.
   */
  shareTabs?: boolean | string;
}

export interface SubscribeOptions extends Partial<Tuning> {
  /** Resume position: a seq (session stream; 0 = from the start) or a cursor
   * (user-level stream); null = live events only. */
  after?: number | string | null;
  /** Type patterns (`message.*`, `task.progress`); server.* and stream.* always pass.
   * A filtered session stream has gaps in its seqs by design: no gap filling then. */
  types?: string[] | string | null;
  /** "sse" (default) or "ws" (needed for commands). */
  transport?: "sse" | "ws";
  /** Every envelope in order: persisted ones exactly once, in seq order per session,
   * and the ephemeral ones. Never WebSocket command replies. */
  onEvent?: ((envelope: Envelope) => void) | null;
  /** connecting, live, reconnecting, polling, offline or closed (final). */
  onStatus?: ((status: ConnectionStatus, info: StatusInfo) => void) | null;
  /** The events after our position are gone (history_expired) or the position is
   * unknown (unknown_position): refetch state over REST. Nothing newer is delivered
   * until a returned promise settles. */
  onReset?: ((info: ResetInfo) => void | Promise<unknown>) | null;
  /** false: this subscription keeps its own connection even when the client shares tabs. */
  share?: boolean;
}

function readCookie(name: string): string | null {
  if (typeof document === "undefined") return null;
  for (const part of document.cookie.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return null;
}

function isOnline(): boolean {
  return typeof navigator === "undefined" || navigator.onLine !== false;
}

function report(err: unknown): void {
  if (typeof reportError === "function") reportError(err); // shows up like an uncaught error
  else console.error(err);
}

// A callback that throws must not break the stream: report it and carry on.
export function safeCall<A extends unknown[], R>(fn: ((...args: A) => R) | null | undefined, ...args: A): R | undefined {
  if (typeof fn !== "function") return undefined;
  try {
    return fn(...args);
  } catch (err) {
    report(err);
    return undefined;
  }
}

function globalCtor<T>(name: string): T | null {
  const value = (globalThis as Record<string, unknown>)[name];
  return typeof value === "function" ? (value as T) : null;
}

/** The client: REST (cookie + CSRF on the page's origin, or a bearer token), and subscriptions. */
export class Tandem {
  readonly base: string;
  onAuthLost: (() => void) | null;
  token: string | null;
  refreshToken: string | null;
  onToken: ((access: string) => void) | null;
  /** @internal */ _authLost = false;
  /** @internal */ readonly _fetch: typeof fetch;
  /** @internal */ readonly _EventSource: EventSourceConstructor | null;
  /** @internal */ readonly _WebSocket: WebSocketConstructor | null;
  /** @internal */ _hub: TabHub | null = null;
  private _refreshing: Promise<boolean> | null = null;

  constructor(options: TandemOptions = {}) {
    const { base = "", onAuthLost = null, token = null, refreshToken = null, onToken = null } = options;
    this.base = String(base).replace(/\/+$/, "");
    this.onAuthLost = onAuthLost;
    this.token = token;
    this.refreshToken = refreshToken;
    this.onToken = onToken;
    const f = options.fetch ?? globalThis.fetch;
    this._fetch = (input, init) => f(input, init); // unbound window.fetch throws "Illegal invocation"
    this._EventSource = options.EventSource !== undefined ? options.EventSource : globalCtor<EventSourceConstructor>("EventSource");
    this._WebSocket = options.WebSocket !== undefined ? options.WebSocket : globalCtor<WebSocketConstructor>("WebSocket");
    if (options.shareTabs && TabHub.supported()) {
      this._hub = new TabHub(this, options.shareTabs === true ? "tandem" : String(options.shareTabs));
    }
  }

  /**
   * Sign in with a username and password (`POST /api/auth/token/`) and return a client
   * holding the access and refresh tokens.
   */
  static async login(base: string, username: string, password: string, options: TandemOptions = {}): Promise<Tandem> {
    const anonymous = new this({ ...options, base, token: null, refreshToken: null });
    const data = await anonymous.post<{ access: string; refresh: string }>("/api/auth/token/", { username, password });
    return new this({ ...options, base, token: data.access, refreshToken: data.refresh });
  }

  /**
   * One JSON request. With a token it carries `Authorization: Bearer`; otherwise the
   * page's cookie, and unsafe methods carry the `csrftoken` cookie as `X-CSRFToken`.
   * @param path e.g. "/api/sessions/" (prefixed with `base`), or an absolute http(s)
   *   URL such as a list's `next` link (used as is)
   * @returns the parsed JSON, or null for 204
   * @throws TandemError on any non-2xx (built from the error shape) or network failure
   */
  async request<T = any>(method: string, path: string, body: unknown = undefined): Promise<T> {
    return this._request<T>(method, path, body, true);
  }

  private async _request<T>(method: string, path: string, body: unknown, mayRefresh: boolean): Promise<T> {
    method = String(method).toUpperCase();
    const headers: Record<string, string> = { Accept: "application/json" };
    const init: RequestInit = { method, headers, cache: "no-store" };
    if (this.token) {
      headers.Authorization = `Bearer ${this.token}`;
      init.credentials = "omit";
    } else {
      init.credentials = "same-origin";
      if (UNSAFE_METHODS.has(method)) {
        const csrf = readCookie("csrftoken");
        if (csrf) headers["X-CSRFToken"] = csrf;
      }
    }
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response: Response;
    let text: string;
    try {
      // Absolute URLs (a list's `next` link) are used as they are.
      const url = /^https?:\/\//.test(path) ? path : this.base + path;
      response = await this._fetch(url, init);
      text = await response.text();
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      throw new TandemError(`Network error: ${message}`, { status: 0, code: "network_error" });
    }
    if (response.status === 401) {
      if (mayRefresh && this.refreshToken && !path.includes("/api/auth/token/") && (await this._refresh())) {
        return this._request<T>(method, path, body, false);
      }
      this._notifyAuthLost();
    } else if (response.ok) {
      this._authLost = false;
    }
    let data: any = null;
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
    if (response.status === 204 || !text) return null as T;
    if (!parsed) {
      throw new TandemError("The server's answer is not JSON.", { status: response.status, code: "bad_response" });
    }
    return data as T;
  }

  /** A new access token from the refresh token; false when the refresh token is no good. */
  private _refresh(): Promise<boolean> {
    if (!this._refreshing) {
      this._refreshing = (async () => {
        try {
          const data = await this._request<{ access: string }>(
            "POST", "/api/auth/token/refresh/", { refresh: this.refreshToken }, false);
          this.token = data.access;
          safeCall(this.onToken, data.access);
          return true;
        } catch {
          return false;
        } finally {
          this._refreshing = null;
        }
      })();
    }
    return this._refreshing;
  }

  /** GET path → parsed JSON. */
  get<T = any>(path: string): Promise<T> { return this.request<T>("GET", path); }
  /** POST path with a JSON body → parsed JSON. */
  post<T = any>(path: string, body?: unknown): Promise<T> { return this.request<T>("POST", path, body); }
  /** PATCH path with a JSON body → parsed JSON. */
  patch<T = any>(path: string, body?: unknown): Promise<T> { return this.request<T>("PATCH", path, body); }
  /** DELETE path → null (204) or parsed JSON. */
  del<T = any>(path: string): Promise<T> { return this.request<T>("DELETE", path); }

  /** Every item of a paginated list (`{"results", "next"}`), following `next` links. */
  async getAll<T = any>(path: string): Promise<T[]> {
    const items: T[] = [];
    for (let next: string | null = path; next; ) {
      const page: Page<T> = await this.get<Page<T>>(next);
      items.push(...(page.results || []));
      next = page.next;
    }
    return items;
  }

  // ------------------------------------------------------------------ REST helpers

  /** Every session you belong to. */
  listSessions(): Promise<any[]> { return this.getAll("/api/sessions/"); }
  /** Create a session (`{title?, agent?}`). */
  createSession(fields: Record<string, unknown> = {}): Promise<any> { return this.post("/api/sessions/", fields); }
  /** One session. */
  getSession(sessionId: string): Promise<any> { return this.get(`/api/sessions/${encodeURIComponent(sessionId)}/`); }
  /** Post a message (`if_busy`: queue, reject or interrupt). */
  postMessage(sessionId: string, parts: Part[] | string, ifBusy?: IfBusy): Promise<any> {
    const body: Record<string, unknown> = { parts: typeof parts === "string" ? [{ type: "text", text: parts }] : parts };
    if (ifBusy) body.if_busy = ifBusy;
    return this.post(`/api/sessions/${encodeURIComponent(sessionId)}/messages/`, body);
  }
  /** Stop the agent's reply. */
  abort(sessionId: string): Promise<any> { return this.post(`/api/sessions/${encodeURIComponent(sessionId)}/abort/`, {}); }
  /** The persisted events after `after` (one page). */
  events(sessionId: string, after = 0, limit = 100): Promise<EventsPage> {
    return this.get(`/api/sessions/${encodeURIComponent(sessionId)}/events/?after=${after}&limit=${limit}`);
  }
  /** Publish a custom event (`task.progress`, …). */
  publish(sessionId: string, type: string, properties: Record<string, unknown> = {}): Promise<Envelope> {
    return this.post(`/api/sessions/${encodeURIComponent(sessionId)}/events/`, { type, properties });
  }
  /** The pending permission requests of a session. */
  pendingPermissions(sessionId: string): Promise<any[]> {
    return this.get(`/api/sessions/${encodeURIComponent(sessionId)}/permissions/?status=pending`);
  }
  /** Answer a permission request; the first answer wins (`409 already_resolved` after). */
  replyPermission(sessionId: string, permissionId: string, approved: boolean, reason?: string): Promise<any> {
    const body: Record<string, unknown> = { approved };
    if (reason !== undefined) body.reason = reason;
    return this.post(`/api/sessions/${encodeURIComponent(sessionId)}/permissions/${encodeURIComponent(permissionId)}/`, body);
  }

  /**
   * Fork a session: a new session of yours holding its messages up to and including
   * `messageId` (default: every ended one).
   */
  fork(sessionId: string, { messageId, title }: { messageId?: string; title?: string } = {}): Promise<any> {
    const body: Record<string, unknown> = {};
    if (messageId !== undefined) body.message_id = messageId;
    if (title !== undefined) body.title = title;
    return this.post(`/api/sessions/${encodeURIComponent(sessionId)}/fork/`, body);
  }

  /** Where a session's export downloads from (cookie auth: a plain link works). */
  exportUrl(sessionId: string, format: "markdown" | "json" = "markdown"): string {
    return `${this.base}/api/sessions/${encodeURIComponent(sessionId)}/export/?format=${encodeURIComponent(format)}`;
  }

  /** One page of search hits across your sessions, best first. `next`: the previous page's link. */
  search(q: string, { limit = 20, next = null }: { limit?: number; next?: string | null } = {}): Promise<Page<any>> {
    if (next) return this.get(next);
    return this.get(`/api/search/?q=${encodeURIComponent(q)}&limit=${limit}`);
  }

  /** A short-lived stream ticket (60 s, reusable until it expires). */
  async ticket(): Promise<string> {
    const data = await this.post<{ ticket: string }>("/api/auth/ticket/");
    return data.ticket;
  }

  /** Whether `/healthz` answers 2xx within `timeout` ms: a cheap "is the server there". */
  async healthy(timeout: number = DEFAULTS.healthProbeTimeout): Promise<boolean> {
    const controller = typeof AbortController === "function" ? new AbortController() : null;
    const timer = setTimeout(() => controller?.abort(), timeout);
    // A page on another origin cannot read the answer (/healthz sends no CORS headers):
    // there, any answer at all counts, and only a network failure means down.
    const opaque = typeof location !== "undefined" && !this.sameOrigin();
    try {
      const response = await this._fetch(`${this.base}/healthz`, {
        cache: "no-store", credentials: "omit", signal: controller?.signal, mode: opaque ? "no-cors" : "cors",
      });
      await response.text().catch(() => "");
      return opaque || response.ok;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Whether `base` is the page's own origin, where the session cookie goes along. */
  sameOrigin(): boolean {
    if (typeof location === "undefined") return false;
    return this.base === "" || new URL(this.base, location.href).origin === location.origin;
  }

  /**
   * Follow a session's events, or (sessionId null) the user-level stream of every
   * session the user belongs to. Connects at once; reconnects and resumes by itself.
   * With `shareTabs`, tabs of this origin following the same stream share one
   * connection.
   */
  subscribe(sessionId: string | null, options: SubscribeOptions = {}): Subscription {
    const sub = new Subscription(this, sessionId, options);
    sub._start();
    return sub;
  }

  /** @internal */
  _notifyAuthLost(): void {
    if (this._authLost) return;
    this._authLost = true;
    safeCall(this.onAuthLost);
  }
}

interface Conn {
  kind: "sse" | "ws" | "shared";
  closed: boolean;
  connected: boolean;
  timers: Record<string, ReturnType<typeof setTimeout> | undefined>;
  close?: () => void;
  ws?: WebSocketLike;
}

interface PollState {
  closed: boolean;
  timer: ReturnType<typeof setTimeout> | undefined;
}

interface Pending {
  resolve: (value: any) => void;
  reject: (err: TandemError) => void;
  timer: ReturnType<typeof setTimeout>;
}

type Source = Conn | PollState;

// A queued request to fill the seqs up to `upto` (tab sharing: a tab behind its leader's stream).
interface FillRequest { type: "__fill"; seq: null; upto: number; session_id: string | null }

/**
 * One live subscription, made by `Tandem.subscribe`. All state changes go through one
 * queue (`_inbox`), handled one envelope at a time, so a gap can be filled over REST
 * before anything after it is delivered.
 */
export class Subscription {
  private _client: Tandem;
  private _sessionId: string | null;
  private _types: string[] | null;
  private _transport: "sse" | "ws";
  private _opts: Tuning;
  private _onEvent: SubscribeOptions["onEvent"];
  private _onStatus: SubscribeOptions["onStatus"];
  private _onReset: SubscribeOptions["onReset"];
  private _shared: boolean;

  // Positions. A session stream has one seq; the user-level stream has the server's
  // cursor (opaque, used to resume) and, for de-duplication, the last seq per session.
  private _lastSeq: number | null = null;
  private _cursor: string | null = null;
  private _seqs = new Map<string, number>();

  private _status: ConnectionStatus | null = null;
  private _final = false; // closed for good
  private _conn: Conn | null = null; // the current transport attempt or connection
  private _attempt = 0; // backoff exponent
  private _failures = 0; // attempts in a row that reached the server but never got server.connected
  private _retryTimer: ReturnType<typeof setTimeout> | undefined;
  private _polling: PollState | null = null; // while the polling fallback runs
  private _down = false; // the server does not answer: probing /healthz until it does
  private _inbox: Array<{ source: Source; envelope: Envelope | FillRequest }> = [];
  private _pumping = false;
  private _pending = new Map<string, Pending>(); // WebSocket command id → its reply's promise
  private _commandSeq = 0;
  private _handleOffline = (): void => this._goOffline();
  private _handleOnline = (): void => this._backOnline();

  constructor(client: Tandem, sessionId: string | null, options: SubscribeOptions = {}) {
    const {
      after = null, types = null, transport = "sse",
      onEvent = null, onStatus = null, onReset = null, share = true, ...tuning
    } = options || {};
    this._client = client;
    this._sessionId = sessionId == null ? null : String(sessionId);
    let list = types == null ? null : (Array.isArray(types) ? types : String(types).split(",")).filter(Boolean);
    if (list && list.length === 0) list = null;
    this._types = list;
    if (transport !== "sse" && transport !== "ws") throw new TypeError(`Unknown transport: ${String(transport)}`);
    this._transport = transport;
    this._opts = { ...DEFAULTS, ...tuning };
    this._onEvent = onEvent;
    this._onStatus = onStatus;
    this._onReset = onReset;
    this._shared = share !== false && client._hub !== null;
    if (after != null) {
      if (this._sessionId !== null) {
        const seq = Number(after);
        if (!Number.isInteger(seq) || seq < 0) throw new TypeError("after must be a non-negative integer seq");
        this._lastSeq = seq;
      } else {
        this._cursor = String(after);
      }
    }
  }

  // ------------------------------------------------------------------ public

  /** The current status: connecting, live, reconnecting, polling, offline or closed. */
  get status(): ConnectionStatus | null { return this._status; }
  /** Session streams: the seq of the last persisted event delivered (or the position
   * the stream started from); null before the first connect of a live-only stream. */
  get lastSeq(): number | null { return this._lastSeq; }
  /** User-level stream: the cursor that resumes after the last event delivered. */
  get cursor(): string | null { return this._cursor; }
  /** The session id, or null for the user-level stream. */
  get sessionId(): string | null { return this._sessionId; }
  /** "sse" or "ws". */
  get transport(): "sse" | "ws" { return this._transport; }
  /** Whether the events come through another tab's connection (tab sharing). */
  get shared(): boolean { return this._shared; }
  /** Whether the status is one where events flow (live or polling). */
  get connected(): boolean { return this._status === "live" || this._status === "polling"; }

  /** Stop for good: closes the connection and any polling; status becomes "closed". */
  close(): void {
    this._terminate("closed");
  }

  /**
   * Drop the current connection (or polling, or waiting for the server) and connect
   * again at once, resuming from the last position. For a "Reconnect now" button; does
   * nothing once closed.
   */
  reconnect(): void {
    if (this._final) return;
    if (this._shared) {
      this._client._hub?.reconnect(this);
      return;
    }
    this._attempt = 0;
    this._failures = 0;
    this._down = false;
    this._stopPolling();
    this._closeConn(this._conn);
    this._setStatus("reconnecting", { attempt: 0, delay: 0, reason: "requested" });
    void this._connect();
  }

  /**
   * Send a WebSocket command (PROTOCOL §6: `{type: "ping"}`, `{type: "publish", event}`,
   * `{type: "prompt", parts}`, …; on the user-level stream add `session_id`). An `id`
   * is assigned here.
   * @returns the ack's `result`, or the `pong` frame for a ping
   * @throws TandemError on an `error` reply (its code/details), `not_connected` when
   *   the WebSocket is not live (or closes before the reply), `timeout` without a reply
   */
  send<T = any>(command: Command): Promise<T> {
    if (this._shared) {
      if (this._transport !== "ws" || this._status !== "live" || this._final) {
        return Promise.reject(new TandemError("The WebSocket is not connected.", { code: "not_connected" }));
      }
      return this._client._hub!.command(this, command, this._opts.commandTimeout) as Promise<T>;
    }
    const conn = this._conn;
    if (this._transport !== "ws" || !conn || conn.closed || !conn.connected || !conn.ws
        || conn.ws.readyState !== WS_OPEN) {
      return Promise.reject(new TandemError("The WebSocket is not connected.", { code: "not_connected" }));
    }
    const id = `c${++this._commandSeq}`;
    const socket = conn.ws;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new TandemError("No reply to the command.", { code: "timeout" }));
      }, this._opts.commandTimeout);
      this._pending.set(id, { resolve, reject, timer });
      try {
        socket.send(JSON.stringify({ ...command, id }));
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new TandemError(`Could not send: ${errorFields(err).message}`, { code: "not_connected" }));
      }
    });
  }

  /** `ping` → the `pong` frame. */
  ping(): Promise<{ type: "pong"; id: string }> { return this.send({ type: "ping" }); }
  /** `prompt`: as `POST …/messages/`; resolves with that response's body. */
  prompt(parts: Part[] | string, ifBusy?: IfBusy, sessionId?: string): Promise<any> {
    const command: Command = { type: "prompt", parts: typeof parts === "string" ? [{ type: "text", text: parts }] : parts };
    if (ifBusy) command.if_busy = ifBusy;
    return this.send(this._scoped(command, sessionId));
  }
  /** `abort`: as `POST …/abort/`. */
  abort(sessionId?: string): Promise<any> { return this.send(this._scoped({ type: "abort" }, sessionId)); }
  /** `permission.reply`: as `POST …/permissions/{pid}/`; the first answer wins. */
  replyPermission(permissionId: string, approved: boolean, reason?: string, sessionId?: string): Promise<any> {
    const command: Command = { type: "permission.reply", permission_id: permissionId, approved };
    if (reason !== undefined) command.reason = reason;
    return this.send(this._scoped(command, sessionId));
  }
  /** `publish`: as `POST …/events/`. */
  publish(type: string, properties: Record<string, unknown> = {}, sessionId?: string): Promise<any> {
    return this.send(this._scoped({ type: "publish", event: { type, properties } }, sessionId));
  }
  /** `presence.update`: broadcast `presence.updated` with `state` (≤ 4 KiB JSON). */
  updatePresence(state: Record<string, unknown>, sessionId?: string): Promise<any> {
    return this.send(this._scoped({ type: "presence.update", state }, sessionId));
  }

  private _scoped(command: Command, sessionId?: string): Command {
    if (this._sessionId === null) {
      if (!sessionId) throw new TypeError("The user-level stream needs a session_id for this command.");
      command.session_id = sessionId;
    }
    return command;
  }

  // ------------------------------------------------------------------ lifecycle

  /** @internal */
  _start(): void {
    if (typeof window !== "undefined" && typeof window.addEventListener === "function") {
      window.addEventListener("offline", this._handleOffline);
      window.addEventListener("online", this._handleOnline);
    }
    if (!isOnline()) {
      this._goOffline();
      return;
    }
    void this._connect();
  }

  // A method, not an inline comparison: TypeScript would keep a narrowing across awaits.
  private _isOffline(): boolean {
    return this._status === "offline";
  }

  private _setStatus(status: ConnectionStatus, info: StatusInfo = {}): void {
    // Repeated "reconnecting" is reported too: each attempt has a new delay.
    if (this._status === status && status !== "reconnecting") return;
    this._status = status;
    safeCall(this._onStatus, status, info);
  }

  /** @internal Stop for good with `reason`. */
  _terminate(reason: string, info: StatusInfo = {}): void {
    if (this._final) return;
    this._final = true;
    clearTimeout(this._retryTimer);
    this._stopPolling();
    this._closeConn(this._conn);
    this._inbox.length = 0;
    if (this._shared) this._client._hub?.detach(this);
    if (typeof window !== "undefined" && typeof window.removeEventListener === "function") {
      window.removeEventListener("offline", this._handleOffline);
      window.removeEventListener("online", this._handleOnline);
    }
    this._status = null; // make sure "closed" is reported even if it was the status
    this._setStatus("closed", { reason, ...info });
  }

  private _goOffline(): void {
    if (this._final) return;
    clearTimeout(this._retryTimer);
    this._stopPolling();
    this._down = false;
    if (this._shared) this._client._hub?.detach(this);
    this._closeConn(this._conn);
    this._setStatus("offline", {});
  }

  private _backOnline(): void {
    if (this._final || this._status !== "offline") return;
    // The failures were the network's, not the server's: start afresh, at once.
    this._attempt = 0;
    this._failures = 0;
    this._setStatus("reconnecting", { attempt: 0, delay: 0, reason: "online" });
    void this._connect();
  }

  /** Open one attempt of the chosen transport, with a fresh ticket. */
  private async _connect(): Promise<void> {
    if (this._final) return;
    clearTimeout(this._retryTimer);
    this._closeConn(this._conn);
    if (!isOnline()) {
      this._goOffline();
      return;
    }
    if (this._shared) {
      if (this._status === null) this._setStatus("connecting", { transport: this._transport, shared: true });
      if (this._final) return;
      const conn: Conn = { kind: "shared", closed: false, connected: false, timers: {} };
      this._conn = conn;
      this._client._hub!.attach(this);
      return;
    }
    let transport = this._transport;
    if (transport === "sse" && !this._client._EventSource) {
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
    const conn: Conn = { kind: transport, closed: false, connected: false, timers: {} };
    this._conn = conn;

    // On the page's own origin EventSource sends the session cookie by itself: no ticket
    // (a credential in the URL, valid for a minute) and one request less per attempt.
    const byCookie = transport === "sse" && !this._client.token && this._client.sameOrigin();
    let ticket: string | null = null;
    if (!byCookie) {
      try {
        ticket = await this._client.ticket();
      } catch (err) {
        if (conn.closed || this._final) return;
        if (err instanceof TandemError && err.status === 401) {
          this._terminate("auth_lost", { error: errorFields(err) });
          return;
        }
        void this._failed(conn, "ticket", err);
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
    conn.timers.connect = setTimeout(() => void this._failed(conn, "connect_timeout"), this._opts.connectTimeout);
    this._touch(conn);
    if (transport === "sse") this._openSSE(conn, sid, params);
    else this._openWS(conn, sid, params);
  }

  private _openSSE(conn: Conn, sid: string | null, params: URLSearchParams): void {
    const path = sid !== null ? `/api/sessions/${sid}/stream/` : "/api/stream/";
    const Source = this._client._EventSource!;
    let source: EventSourceLike;
    try {
      source = new Source(`${this._client.base}${path}?${params}`);
    } catch (err) {
      void this._failed(conn, "error", err);
      return;
    }
    conn.close = () => source.close();
    source.onmessage = (message) => {
      let envelope: Envelope;
      try {
        envelope = JSON.parse(message.data);
      } catch {
        return;
      }
      this._receive(conn, envelope);
    };
    // EventSource would reconnect by itself with a stale ticket and without our
    // backoff: close it and decide here.
    source.onerror = () => void this._failed(conn, "error");
  }

  private _openWS(conn: Conn, sid: string | null, params: URLSearchParams): void {
    const path = sid !== null ? `/ws/sessions/${sid}/` : "/ws/stream/";
    const url = new URL(`${this._client.base}${path}?${params}`, typeof location !== "undefined" ? location.href : undefined);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const Socket = this._client._WebSocket;
    let socket: WebSocketLike;
    try {
      if (!Socket) throw new Error("No WebSocket implementation");
      socket = new Socket(url.href);
    } catch (err) {
      void this._failed(conn, "error", err);
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
      let frame: any;
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
    socket.onerror = () => { /* onclose follows and decides */ };
    socket.onclose = (event) => this._wsClosed(conn, event.code);
  }

  private _wsClosed(conn: Conn, code: number): void {
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
    void this._failed(conn, "ws_closed", { code });
  }

  private _reply(frame: any): void {
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

  private _rejectPending(code: string): void {
    for (const [id, pending] of this._pending) {
      clearTimeout(pending.timer);
      pending.reject(new TandemError("The connection closed before the reply.", { code }));
      this._pending.delete(id);
    }
  }

  /** Stop listening to `conn` (idempotent). Its queued envelopes will be skipped. */
  private _closeConn(conn: Conn | null): void {
    if (!conn || conn.closed) return;
    conn.closed = true;
    for (const timer of Object.values(conn.timers)) clearTimeout(timer);
    if (conn.close) conn.close();
    if (this._conn === conn) this._conn = null;
    if (conn.kind === "ws") this._rejectPending("not_connected");
  }

  /** Any frame proves the link works; silence longer than idleTimeout means it does not. */
  private _touch(conn: Conn): void {
    if (conn.kind === "shared") return; // the leader tab watches its own connection
    clearTimeout(conn.timers.idle);
    conn.timers.idle = setTimeout(() => void this._failed(conn, "idle_timeout"), this._opts.idleTimeout);
  }

  /**
   * The attempt or connection `conn` ended without us asking. Decide what next: wait
   * for the server to answer again, back off and reconnect, fall back to polling, or
   * give up for good.
   */
  private async _failed(conn: Conn, reason: string, detail: unknown = undefined): Promise<void> {
    if (!conn || conn.closed || this._final) return;
    const wasConnected = conn.connected;
    this._closeConn(conn);
    if (!isOnline()) {
      this._goOffline();
      return;
    }

    // Is the server there at all? If not, failures say nothing about the transport:
    // probe /healthz (cheap) and reconnect the moment it answers, instead of backing off
    // or falling back to polling.
    const up = await this._client.healthy(this._opts.healthProbeTimeout);
    if (this._final || this._conn !== null || this._isOffline()) return;
    if (!up) {
      this._serverDown(reason, detail);
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
        const status = err instanceof TandemError ? err.status : 0;
        if (status === 401) return this._terminate("auth_lost", { error: errorFields(err) });
        if (status === 403 || status === 404) return this._terminate("not_found", { error: errorFields(err) });
      }
      // Closed, offline or superseded (reconnect()) meanwhile: nothing left to decide.
      if (this._final || this._conn !== null || this._isOffline()) return;
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

  private _scheduleReconnect(delay: number | undefined, reason: string, detail?: unknown): void {
    if (delay === undefined) {
      const ceiling = Math.min(this._opts.backoffMax, this._opts.backoffBase * 2 ** this._attempt);
      delay = ceiling * (0.5 + Math.random() * 0.5); // jitter: clients that lost the same server spread out
      this._attempt = Math.min(this._attempt + 1, 20);
    }
    const info: StatusInfo = { attempt: this._attempt, delay: Math.round(delay), reason };
    if (reason === "ws_closed" && detail && typeof detail === "object" && "code" in detail) {
      info.code = (detail as { code: number }).code; // the WebSocket close code
    }
    this._setStatus("reconnecting", info);
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => void this._connect(), delay);
  }

  // ------------------------------------------------------------------ server down

  /** Nothing answers: say so, and probe /healthz until something does. */
  private _serverDown(reason: string, detail?: unknown): void {
    this._stopPolling();
    const first = !this._down;
    this._down = true;
    if (first || this._status !== "reconnecting") {
      const info: StatusInfo = { reason: "server_unreachable", after: reason, attempt: 0, delay: this._opts.healthProbeInterval };
      if (detail instanceof Error) info.error = errorFields(detail);
      this._setStatus("reconnecting", info);
    }
    this._scheduleProbe();
  }

  private _scheduleProbe(): void {
    if (this._final) return;
    clearTimeout(this._retryTimer);
    // Jitter, so that the clients of a restarted server do not all arrive at once.
    const delay = this._opts.healthProbeInterval * (0.5 + Math.random() * 0.5);
    this._retryTimer = setTimeout(() => void this._probe(), delay);
  }

  private async _probe(): Promise<void> {
    if (this._final || !this._down || this._isOffline()) return;
    if (this._shared) {
      await this._probeForLeader();
      return;
    }
    if (this._conn !== null) return;
    const up = await this._client.healthy(this._opts.healthProbeTimeout);
    if (this._final || !this._down || this._conn !== null || this._isOffline()) return;
    if (!up) {
      this._scheduleProbe();
      return;
    }
    // Back: reconnect the real transport at once, with a clean slate.
    this._down = false;
    this._attempt = 0;
    this._failures = 0;
    this._setStatus("reconnecting", { attempt: 0, delay: 0, reason: "server_back" });
    void this._connect();
  }

  /**
   * Tab sharing: the leader probes, but a browser slows the timers of a hidden tab (to
   * one a minute after five minutes hidden), and the leader may be one. A visible
   * follower probes too, and asks the leader to reconnect when the server answers.
   */
  private async _probeForLeader(): Promise<void> {
    if (typeof document !== "undefined" && document.visibilityState === "hidden") {
      this._scheduleProbe();
      return;
    }
    const up = await this._client.healthy(this._opts.healthProbeTimeout);
    if (this._final || !this._down) return;
    if (!up) {
      this._scheduleProbe();
      return;
    }
    this._down = false;
    this._client._hub?.reconnect(this);
  }

  // ------------------------------------------------------------------ polling

  private _startPolling(reason: string): void {
    if (this._final || this._polling) return;
    const poll: PollState = { closed: false, timer: undefined };
    this._polling = poll;
    this._setStatus("polling", { reason, interval: this._opts.pollInterval });
    if (poll.closed || this._final) return; // onStatus may close() or reconnect()
    void this._pollOnce(poll);
    if (reason !== "no_eventsource") this._scheduleTransportRetry();
  }

  private _stopPolling(): void {
    if (!this._polling) return;
    this._polling.closed = true;
    clearTimeout(this._polling.timer);
    this._polling = null;
    clearTimeout(this._retryTimer);
  }

  private _scheduleTransportRetry(): void {
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => void this._connect(), this._opts.transportRetryInterval);
  }

  private async _pollOnce(poll: PollState): Promise<void> {
    if (poll.closed || this._final) return;
    const sid = encodeURIComponent(this._sessionId!);
    try {
      if (this._lastSeq === null) {
        // Live-only and never connected: start from the head, as the stream would.
        const session = await this._client.get<{ last_seq: number }>(`/api/sessions/${sid}/`);
        if (poll.closed) return;
        if (this._lastSeq === null) this._lastSeq = session.last_seq;
      }
      let after = this._lastSeq!;
      const types = this._types ? `&types=${encodeURIComponent(this._types.join(","))}` : "";
      for (;;) {
        const page = await this._client.get<EventsPage>(`/api/sessions/${sid}/events/?after=${after}&limit=1000${types}`);
        if (poll.closed) return;
        if (page.reset) {
          this._enqueue(poll, this._syntheticReset(this._sessionId, after, page.last_seq));
          break;
        }
        for (const envelope of page.events) this._enqueue(poll, envelope);
        if (page.events.length < 1000) break;
        after = page.events[page.events.length - 1].seq!;
      }
      if (poll.closed || this._final) return;
      // Polls answer again after a failure (a 5xx while /healthz was fine).
      if (this._status !== "polling") this._setStatus("polling", { reason: "poll_recovered", interval: this._opts.pollInterval });
    } catch (err) {
      if (poll.closed || this._final) return;
      const status = err instanceof TandemError ? err.status : 0;
      if (status === 401) return this._terminate("auth_lost", { error: errorFields(err) });
      if (status === 403 || status === 404) return this._terminate("not_found", { error: errorFields(err) });
      // A network error or a 5xx: this poll delivered nothing, so we are not connected.
      const up = await this._client.healthy(this._opts.healthProbeTimeout);
      if (poll.closed || this._final) return;
      if (!up) {
        this._serverDown("poll_failed", err);
        return;
      }
      this._setStatus("reconnecting", { reason: "poll_failed", delay: this._opts.pollInterval, error: errorFields(err) });
    }
    if (poll.closed || this._final) return;
    poll.timer = setTimeout(() => void this._pollOnce(poll), this._opts.pollInterval);
  }

  private _syntheticReset(sessionId: string | null, after: number, lastSeq: number): Envelope {
    // The events endpoint says `reset: true` without a reason; the stream would have said this.
    return {
      seq: null, session_id: sessionId, type: "stream.reset", time: new Date().toISOString(),
      properties: { reason: after > lastSeq ? "unknown_position" : "history_expired", last_seq: lastSeq },
    };
  }

  // ------------------------------------------------------------------ tab sharing (see tabs.ts)

  /** @internal The spec a leader tab opens the shared upstream with. */
  _sharedSpec(): SharedSpec {
    return {
      sessionId: this._sessionId,
      transport: this._transport,
      types: this._types,
      after: this._sessionId !== null ? this._lastSeq : this._cursor,
      tuning: this._opts,
    };
  }

  /** @internal An envelope relayed by the leader tab. */
  _sharedEnvelope(envelope: Envelope): void {
    const conn = this._conn;
    if (!conn || conn.kind !== "shared") return;
    this._receive(conn, envelope);
  }

  /** @internal The leader's stream reports a status. `position`: where its stream is. */
  _sharedStatus(status: ConnectionStatus, info: StatusInfo, position: { lastSeq: number | null; cursor: string | null } | null): void {
    const conn = this._conn;
    if (this._final || !conn || conn.kind !== "shared") return;
    if (status === "closed") {
      if (info.reason === "auth_lost") this._client._notifyAuthLost();
      this._terminate(info.reason || "closed", info);
      return;
    }
    if (position && this._sessionId !== null && position.lastSeq !== null && this._types === null) {
      if (this._lastSeq === null) {
        this._lastSeq = position.lastSeq;
      } else if (this._lastSeq < position.lastSeq) {
        // Behind the leader's stream (it started after us): fill from REST, in order.
        this._enqueue(conn, { type: "__fill", seq: null, upto: position.lastSeq, session_id: this._sessionId });
      }
    } else if (position && this._sessionId === null && this._cursor === null && position.cursor) {
      this._cursor = position.cursor;
    }
    conn.connected = status === "live" || status === "polling";
    const unreachable = status === "reconnecting" && info.reason === "server_unreachable";
    if (unreachable && !info.leader && !this._down) {
      this._down = true;
      this._scheduleProbe();
    } else if (!unreachable && this._down) {
      this._down = false;
      clearTimeout(this._retryTimer);
    }
    this._setStatus(status, { ...info, shared: true });
  }

  /** @internal The leader tab went away: wait for the next one. */
  _sharedLost(): void {
    const conn = this._conn;
    if (this._final || !conn || conn.kind !== "shared") return;
    conn.connected = false;
    this._setStatus("reconnecting", { reason: "leader_changed", attempt: 0, delay: 0, shared: true });
  }

  // ------------------------------------------------------------------ delivery

  private _receive(conn: Conn, envelope: Envelope): void {
    if (conn.closed || this._final || !envelope || typeof envelope !== "object") return;
    this._touch(conn);
    this._enqueue(conn, envelope);
  }

  private _enqueue(source: Source, envelope: Envelope | FillRequest): void {
    this._inbox.push({ source, envelope });
    void this._pump();
  }

  private async _pump(): Promise<void> {
    if (this._pumping) return;
    this._pumping = true;
    try {
      while (this._inbox.length && !this._final) {
        const { source, envelope } = this._inbox.shift()!;
        // What a dropped connection had queued is skipped: our position did not move
        // past it, so whatever connects next resumes from there and sends it again.
        if (source.closed) continue;
        try {
          await this._handle(source, envelope);
        } catch (err) {
          if (this._final) break;
          const status = err instanceof TandemError ? err.status : 0;
          if (status === 401) {
            this._terminate("auth_lost", { error: errorFields(err) });
          } else if ((status === 403 || status === 404) && this._sessionId !== null) {
            this._terminate("not_found", { error: errorFields(err) });
          } else if (source === this._conn && this._conn.kind !== "shared") {
            // Could not fill a gap (network): reconnect; the resume fills it instead.
            void this._failed(this._conn, "gap_fill_failed", err);
          }
        }
      }
    } finally {
      this._pumping = false;
    }
  }

  private async _handle(source: Source, item: Envelope | FillRequest): Promise<void> {
    if (item.type === "__fill") {
      await this._fillGap(this._sessionId!, (item as FillRequest).upto);
      return;
    }
    const envelope = item as Envelope;
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
      else if (type === "auth.expired" && source === this._conn && this._conn.kind !== "shared") {
        void this._failed(this._conn, "auth_expired");
      }
      return;
    }
    const sid = this._sessionId !== null ? this._sessionId : envelope.session_id!;
    if (this._isDuplicate(sid, envelope.seq)) return;
    const last = this._position(sid);
    if (last !== null && envelope.seq > last + 1 && this._types === null) {
      await this._fillGap(sid, envelope.seq - 1);
      if (this._final || source.closed || this._isDuplicate(sid, envelope.seq)) return;
    }
    this._accept(sid, envelope);
  }

  private _connected(source: Source, envelope: Envelope): void {
    if (source !== this._conn) return; // polling items never carry server.connected
    const conn = source as Conn;
    const props = envelope.properties || {};
    if (conn.kind === "shared") {
      // The leader reports the status; only a live-only stream's start position is ours to take.
      if (this._sessionId !== null && this._lastSeq === null && typeof props.last_seq === "number") this._lastSeq = props.last_seq;
      return;
    }
    clearTimeout(conn.timers.connect);
    conn.connected = true;
    this._failures = 0;
    this._down = false;
    conn.timers.live = setTimeout(() => { this._attempt = 0; }, this._opts.liveResetAfter);
    if (this._sessionId !== null) {
      if (this._lastSeq === null && typeof props.last_seq === "number") this._lastSeq = props.last_seq;
    } else if (props.cursor) {
      this._cursor = props.cursor; // where the server will go on from (resets included)
    }
    this._stopPolling();
    this._setStatus("live", { transport: conn.kind, resumed: !!props.resumed, connection_id: props.connection_id });
  }

  private async _reset(envelope: Envelope): Promise<void> {
    const props = envelope.properties || {};
    const sessionId = this._sessionId !== null ? this._sessionId : envelope.session_id || null;
    const lastSeq = typeof props.last_seq === "number" ? props.last_seq : 0;
    if (this._sessionId !== null) this._lastSeq = lastSeq;
    else if (sessionId) this._seqs.set(sessionId, lastSeq);
    const info: ResetInfo = { reason: props.reason, last_seq: lastSeq, session_id: sessionId };
    const result = safeCall(this._onReset, info);
    // A page that returns its refetch promise gets nothing newer until its state is back.
    if (result && typeof (result as Promise<unknown>).then === "function") {
      try {
        await result;
      } catch (err) {
        report(err);
      }
    }
    this._emit(envelope);
  }

  private _sessionDeleted(envelope: Envelope): void {
    const deleted = (envelope.properties && envelope.properties.session_id) || envelope.session_id;
    if (this._sessionId !== null) {
      if (deleted === this._sessionId) this._terminate("session_deleted");
    } else if (deleted) {
      this._seqs.delete(deleted);
    }
  }

  private _position(sid: string): number | null {
    if (this._sessionId !== null) return this._lastSeq;
    return this._seqs.has(sid) ? this._seqs.get(sid)! : null;
  }

  private _isDuplicate(sid: string, seq: number): boolean {
    const last = this._position(sid);
    return last !== null && seq <= last;
  }

  private _accept(sid: string, envelope: Envelope): void {
    if (this._sessionId !== null) this._lastSeq = envelope.seq;
    else this._seqs.set(sid, envelope.seq!);
    if (envelope.cursor) this._cursor = envelope.cursor;
    this._emit(envelope);
  }

  /** Deliver the missing seqs (position, upto] from the events endpoint, in order. */
  private async _fillGap(sid: string, upto: number): Promise<void> {
    const path = `/api/sessions/${encodeURIComponent(sid)}/events/`;
    while (!this._final) {
      const after = this._position(sid);
      if (after === null || after >= upto) return;
      let page: EventsPage;
      try {
        page = await this._client.get<EventsPage>(`${path}?after=${after}&limit=1000`);
      } catch (err) {
        // On the user-level stream a session we lost access to is not worth a reconnect.
        const status = err instanceof TandemError ? err.status : 0;
        if (this._sessionId === null && (status === 403 || status === 404)) return;
        throw err;
      }
      if (page.reset) {
        await this._reset(this._syntheticReset(sid, after, page.last_seq));
        return;
      }
      for (const envelope of page.events) {
        if (!this._isDuplicate(sid, envelope.seq!)) this._accept(sid, envelope);
      }
      // Nothing (more) to fill with: deliver what we have rather than loop.
      if (this._position(sid) === after) return;
    }
  }

  private _emit(envelope: Envelope): void {
    safeCall(this._onEvent, envelope);
  }
}
