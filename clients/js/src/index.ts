/**
 * The Tandem client for browsers (and anything with global fetch, EventSource and
 * WebSocket). Node programs import the package's Node entry (node.ts), which brings npm
 * `eventsource` and `ws`. esbuild bundles this file into static/js/tandem.js for the UI
 * (`npm run build:ui` in clients/js).
 */
export { Tandem, Subscription, DEFAULTS } from "./client.js";
export type {
  TandemOptions, SubscribeOptions, Tuning, EventSourceConstructor, EventSourceLike, WebSocketConstructor, WebSocketLike,
} from "./client.js";
export { TandemError } from "./errors.js";
export type { TandemErrorFields, ClientErrorCode } from "./errors.js";
export { markSnippet } from "./snippet.js";
export { TabHub } from "./tabs.js";
export type * from "./types.js";
