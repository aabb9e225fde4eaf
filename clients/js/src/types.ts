/** The wire shapes this client reads (PROTOCOL.md v1.3, docs/API.md). */

export interface UserRef {
  id: number;
  username: string;
}

/** One event envelope (PROTOCOL §4). `seq` is null for ephemeral events. */
export interface Envelope {
  seq: number | null;
  session_id: string | null;
  type: string;
  time: string;
  properties: Record<string, any>;
  /** User-level streams: the cursor that resumes after this event. */
  cursor?: string;
  published_by?: UserRef | null;
  [key: string]: unknown;
}

export interface Page<T> {
  results: T[];
  next: string | null;
}

export interface EventsPage {
  events: Envelope[];
  last_seq: number;
  reset: boolean;
}

export interface Part {
  type: string;
  text?: string;
  [key: string]: unknown;
}

export type IfBusy = "queue" | "reject" | "interrupt";

/** What a subscription reports through `onStatus`. */
export type ConnectionStatus = "connecting" | "live" | "reconnecting" | "polling" | "offline" | "closed";

/**
 * The second argument of `onStatus`. Which fields are there depends on the status:
 * - live: `transport`, `resumed`, `connection_id`; with tab sharing also `shared: true` and
 *   `leader` (whether this tab holds the one connection)
 * - reconnecting: `attempt`, `delay` (ms), `reason` (`error`, `ws_closed` + `code`,
 *   `connect_timeout`, `idle_timeout`, `server_unreachable`, `requested`, `online`, `leader_changed`, …)
 * - polling: `reason`, `interval`
 * - closed: `reason` (`closed`, `auth_lost`, `not_found`, `forbidden`, `bad_request`, `session_deleted`)
 */
export interface StatusInfo {
  reason?: string;
  attempt?: number;
  delay?: number;
  code?: number;
  transport?: string;
  resumed?: boolean;
  connection_id?: string;
  interval?: number;
  shared?: boolean;
  /** Tab sharing: whether this tab holds the shared connection. */
  leader?: boolean;
  error?: { message: string; status: number; code: string; details: Record<string, unknown> };
  [key: string]: unknown;
}

export interface ResetInfo {
  reason: string;
  last_seq: number;
  session_id: string | null;
}

/** A WebSocket command of PROTOCOL §6 (an `id` is added by the client). */
export interface Command {
  type: string;
  session_id?: string;
  [key: string]: unknown;
}
