/** Error codes this client makes up itself (the API's own codes pass through as they are). */
export type ClientErrorCode = "network_error" | "bad_response" | "not_connected" | "timeout";

export interface TandemErrorFields {
  /** The HTTP status, or 0 for network failures and WebSocket replies. */
  status?: number;
  /** The API's error code (`not_found`, `validation_error`, …) or a {@link ClientErrorCode}. */
  code?: string;
  /** The error's `details` object (field → messages for `validation_error`). */
  details?: Record<string, unknown> | null;
}

/**
 * An error from the API (the `{"error": {"code", "message", "details"}}` shape), the
 * network, or a WebSocket command.
 */
export class TandemError extends Error {
  status: number;
  code: string;
  details: Record<string, unknown>;

  constructor(message: string, { status = 0, code = "error", details = {} }: TandemErrorFields = {}) {
    super(message);
    this.name = "TandemError";
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

/** A plain object that survives `postMessage` (tab sharing) and JSON. */
export function errorFields(err: unknown): { message: string; status: number; code: string; details: Record<string, unknown> } {
  if (err instanceof TandemError) {
    return { message: err.message, status: err.status, code: err.code, details: err.details };
  }
  const message = err instanceof Error ? err.message : String(err);
  return { message, status: 0, code: "error", details: {} };
}
