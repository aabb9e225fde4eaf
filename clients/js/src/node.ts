/**
 * The Node (≥ 20) entry: the same client, with npm `eventsource` for SSE and npm `ws`
 * for WebSocket unless you pass your own. Node has no cookie jar here: sign in with
 * `Tandem.login(base, username, password)` or pass `token` (and `refreshToken`).
 * Streams authenticate with a fresh stream ticket per connection attempt.
 */
import { EventSource } from "eventsource";
import WebSocket from "ws";
import { Tandem as BaseTandem, type EventSourceConstructor, type TandemOptions, type WebSocketConstructor } from "./client.js";

export class Tandem extends BaseTandem {
  constructor(options: TandemOptions = {}) {
    super({
      ...options,
      EventSource: options.EventSource ?? (EventSource as unknown as EventSourceConstructor),
      WebSocket: options.WebSocket ?? (WebSocket as unknown as WebSocketConstructor),
    });
  }
}

export { Subscription, DEFAULTS } from "./client.js";
export type {
  TandemOptions, SubscribeOptions, Tuning, EventSourceConstructor, EventSourceLike, WebSocketConstructor, WebSocketLike,
} from "./client.js";
export { TandemError } from "./errors.js";
export type { TandemErrorFields, ClientErrorCode } from "./errors.js";
export type * from "./types.js";
