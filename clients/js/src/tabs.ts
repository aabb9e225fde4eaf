/**
 * One live stream per browser, not per tab.
 *
 * Every tab of an origin that makes a `Tandem({shareTabs})` client joins one group: a
 * BroadcastChannel, and a Web Lock that exactly one tab holds at a time (the leader).
 * The leader opens one real subscription (an "upstream") per distinct stream that some
 * tab follows (session id + transport + type filter) and relays its envelopes and
 * statuses to every tab; each tab's own subscriptions de-duplicate by seq and fill gaps
 * over REST exactly as they do with a connection of their own. When the leader tab
 * closes, the browser releases its lock, the next tab in line becomes leader, every tab
 * asks again for its streams with its own position, and the new upstream resumes from
 * there: nothing is lost, and what arrives twice is dropped by seq.
 *
 * Followers' WebSocket commands travel to the leader and are sent on its socket; their
 * replies come back the same way.
 */
import { TandemError, errorFields } from "./errors.js";
import type { Subscription, Tandem, Tuning } from "./client.js";
import type { Command, ConnectionStatus, Envelope, StatusInfo } from "./types.js";

export interface SharedSpec {
  sessionId: string | null;
  transport: "sse" | "ws";
  types: string[] | null;
  after: number | string | null;
  tuning: Tuning;
}

type Position = { lastSeq: number | null; cursor: string | null };

type Message =
  | { t: "leader"; tab: string }
  | { t: "want"; tab: string; sub: string; key: string; spec: SharedSpec }
  | { t: "unwant"; tab: string; sub: string; key: string }
  | { t: "attached"; tab: string; sub: string; key: string; status: ConnectionStatus | null; info: StatusInfo; position: Position }
  | { t: "status"; key: string; status: ConnectionStatus; info: StatusInfo; position: Position }
  | { t: "ev"; key: string; env: Envelope }
  | { t: "reconnect"; key: string }
  | { t: "cmd"; tab: string; req: string; key: string; command: Command }
  | { t: "reply"; tab: string; req: string; ok: boolean; result?: unknown; error?: ReturnType<typeof errorFields> };

interface Upstream {
  sub: Subscription;
  wants: Map<string, number>; // "tab/sub" → when it last asked (ms)
  status: ConnectionStatus | null;
  info: StatusInfo;
}

// A follower repeats its "want" this often; the leader drops wants not repeated for WANT_TTL
// (a tab that crashed never says goodbye).
const WANT_REFRESH = 5000;
const WANT_TTL = 20000;

function randomId(): string {
  if (typeof crypto !== "undefined" && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function plainInfo(info: StatusInfo): StatusInfo {
  // Only what structured clone and JSON both keep.
  const out: StatusInfo = {};
  for (const [key, value] of Object.entries(info || {})) {
    if (value instanceof Error) out[key] = errorFields(value);
    else if (value === null || ["string", "number", "boolean"].includes(typeof value)) out[key] = value;
    else if (typeof value === "object") {
      try {
        out[key] = JSON.parse(JSON.stringify(value));
      } catch {
        /* not worth relaying */
      }
    }
  }
  return out;
}

export function keyOf(spec: Pick<SharedSpec, "sessionId" | "transport" | "types">): string {
  return JSON.stringify([spec.sessionId, spec.transport, spec.types ? [...spec.types].sort() : null]);
}

export class TabHub {
  readonly tabId = randomId();
  private readonly client: Tandem;
  private readonly channel: BroadcastChannel;
  private leader = false;
  private readonly subs = new Map<string, { sub: Subscription; key: string }>(); // this tab's, by id
  private readonly ids = new WeakMap<Subscription, string>();
  private readonly upstreams = new Map<string, Upstream>(); // the leader's, by key
  private readonly pending = new Map<string, { resolve: (v: unknown) => void; reject: (e: TandemError) => void; timer: ReturnType<typeof setTimeout> }>();
  private reqSeq = 0;
  private refreshTimer: ReturnType<typeof setInterval> | undefined;

  static supported(): boolean {
    return typeof BroadcastChannel === "function" && typeof navigator !== "undefined"
      && !!(navigator as Navigator & { locks?: LockManager }).locks;
  }

  constructor(client: Tandem, group: string) {
    this.client = client;
    this.channel = new BroadcastChannel(`tandem-tabs:${group}`);
    this.channel.onmessage = (event: MessageEvent<Message>) => this.onMessage(event.data);
    // Held until this tab goes away: then the browser hands it to the next tab in line.
    void navigator.locks.request(`tandem-tabs-leader:${group}`, () => {
      this.becomeLeader();
      return new Promise<void>(() => {});
    });
    this.refreshTimer = setInterval(() => this.refresh(), WANT_REFRESH);
  }

  /** Whether this tab holds the group's streams. */
  get isLeader(): boolean { return this.leader; }

  // ------------------------------------------------------------ the tab's own subscriptions

  attach(sub: Subscription): void {
    let id = this.ids.get(sub);
    if (!id) {
      id = randomId();
      this.ids.set(sub, id);
    }
    const spec = sub._sharedSpec();
    const key = keyOf(spec);
    this.subs.set(id, { sub, key });
    this.post({ t: "want", tab: this.tabId, sub: id, key, spec });
  }

  detach(sub: Subscription): void {
    const id = this.ids.get(sub);
    if (!id) return;
    const entry = this.subs.get(id);
    if (!entry) return;
    this.subs.delete(id);
    this.post({ t: "unwant", tab: this.tabId, sub: id, key: entry.key });
  }

  reconnect(sub: Subscription): void {
    const id = this.ids.get(sub);
    const entry = id ? this.subs.get(id) : undefined;
    if (entry) this.post({ t: "reconnect", key: entry.key });
  }

  command(sub: Subscription, command: Command, timeout: number): Promise<unknown> {
    const id = this.ids.get(sub);
    const entry = id ? this.subs.get(id) : undefined;
    if (!entry) return Promise.reject(new TandemError("The WebSocket is not connected.", { code: "not_connected" }));
    const req = `${this.tabId}:${++this.reqSeq}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(req);
        reject(new TandemError("No reply to the command.", { code: "timeout" }));
      }, timeout);
      this.pending.set(req, { resolve, reject, timer });
      this.post({ t: "cmd", tab: this.tabId, req, key: entry.key, command });
    });
  }

  private refresh(): void {
    for (const [id, { sub, key }] of this.subs) {
      this.post({ t: "want", tab: this.tabId, sub: id, key, spec: sub._sharedSpec() });
    }
    if (this.leader) this.expire();
  }

  // ------------------------------------------------------------ messages

  /** Every tab, this one included, sees every message (BroadcastChannel skips the sender). */
  private post(message: Message): void {
    try {
      this.channel.postMessage(message);
    } catch (err) {
      console.error(err);
    }
    this.onMessage(message);
  }

  private onMessage(m: Message): void {
    switch (m.t) {
      case "leader":
        if (m.tab !== this.tabId) {
          // A new leader: the old one's streams are gone with its tab, and so are the
          // replies to commands it was sending for us.
          this.leader = false;
          for (const [req, pending] of this.pending) {
            clearTimeout(pending.timer);
            pending.reject(new TandemError("The connection closed before the reply.", { code: "not_connected" }));
            this.pending.delete(req);
          }
          for (const { sub } of this.subs.values()) sub._sharedLost();
          this.refresh();
        }
        break;
      case "want":
        if (this.leader) this.want(m.tab, m.sub, m.key, m.spec);
        break;
      case "unwant":
        if (this.leader) this.unwant(m.tab, m.sub, m.key);
        break;
      case "reconnect":
        if (this.leader) this.upstreams.get(m.key)?.sub.reconnect();
        break;
      case "cmd":
        if (this.leader) this.runCommand(m.tab, m.req, m.key, m.command);
        break;
      case "attached":
        if (m.tab === this.tabId) {
          const entry = this.subs.get(m.sub);
          if (entry && m.status) entry.sub._sharedStatus(m.status, { ...m.info, leader: this.leader }, m.position);
        }
        break;
      case "status":
        for (const entry of this.subs.values()) {
          if (entry.key === m.key) entry.sub._sharedStatus(m.status, { ...m.info, leader: this.leader }, m.position);
        }
        if (m.status === "closed") {
          for (const [id, entry] of this.subs) if (entry.key === m.key) this.subs.delete(id);
        }
        break;
      case "ev":
        for (const entry of this.subs.values()) if (entry.key === m.key) entry.sub._sharedEnvelope(m.env);
        break;
      case "reply":
        if (m.tab === this.tabId) {
          const pending = this.pending.get(m.req);
          if (!pending) break;
          this.pending.delete(m.req);
          clearTimeout(pending.timer);
          if (m.ok) pending.resolve(m.result);
          else pending.reject(new TandemError(m.error?.message || "The command failed.", m.error));
        }
        break;
    }
  }

  // ------------------------------------------------------------ the leader's side

  private becomeLeader(): void {
    this.leader = true;
    this.post({ t: "leader", tab: this.tabId });
    this.refresh(); // this tab's own subscriptions
  }

  private want(tab: string, sub: string, key: string, spec: SharedSpec): void {
    let up = this.upstreams.get(key);
    const fresh = !up;
    if (!up) {
      const created: Upstream = { sub: null as unknown as Subscription, wants: new Map(), status: null, info: {} };
      up = created;
      this.upstreams.set(key, created);
      const position = (): Position => ({ lastSeq: created.sub?.lastSeq ?? null, cursor: created.sub?.cursor ?? null });
      created.sub = this.client.subscribe(spec.sessionId, {
        ...spec.tuning,
        after: spec.after,
        types: spec.types,
        transport: spec.transport,
        share: false,
        onEvent: (env) => this.post({ t: "ev", key, env }),
        onStatus: (status, info) => {
          if (this.upstreams.get(key) !== created) return; // dropped: nobody follows it
          created.status = status;
          created.info = plainInfo(info);
          this.post({ t: "status", key, status, info: created.info, position: position() });
          if (status === "closed" && this.upstreams.get(key) === created) this.upstreams.delete(key);
        },
      });
    }
    const known = up.wants.has(`${tab}/${sub}`);
    up.wants.set(`${tab}/${sub}`, Date.now());
    if ((!known || fresh) && up.status) {
      this.post({
        t: "attached", tab, sub, key, status: up.status, info: up.info,
        position: { lastSeq: up.sub.lastSeq, cursor: up.sub.cursor },
      });
    }
  }

  private unwant(tab: string, sub: string, key: string): void {
    const up = this.upstreams.get(key);
    if (!up) return;
    up.wants.delete(`${tab}/${sub}`);
    if (up.wants.size === 0) this.drop(key, up);
  }

  private expire(): void {
    const now = Date.now();
    for (const [key, up] of this.upstreams) {
      for (const [who, at] of up.wants) if (now - at > WANT_TTL) up.wants.delete(who);
      if (up.wants.size === 0) this.drop(key, up);
    }
  }

  private drop(key: string, up: Upstream): void {
    this.upstreams.delete(key); // first: its "closed" is not relayed
    up.sub.close();
  }

  private runCommand(tab: string, req: string, key: string, command: Command): void {
    const up = this.upstreams.get(key);
    const answer = (ok: boolean, result?: unknown, error?: unknown): void => {
      this.post({ t: "reply", tab, req, ok, result, error: error === undefined ? undefined : errorFields(error) });
    };
    if (!up) {
      answer(false, undefined, new TandemError("The WebSocket is not connected.", { code: "not_connected" }));
      return;
    }
    up.sub.send(command).then((result) => answer(true, result), (err) => answer(false, undefined, err));
  }
}
