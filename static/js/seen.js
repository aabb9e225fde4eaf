// What this browser's user has seen of each session: the last event seq, per session id,
// in localStorage (shared by every tab of the origin). The sidebar writes it as the open
// session's events come; the sidebar and the sessions page read it for "new" markers.
export const SEEN_KEY = "tandem.seen";

/** @returns {Record<string, number>} */
export function readSeen() {
  try {
    const value = JSON.parse(localStorage.getItem(SEEN_KEY) || "{}");
    return value && typeof value === "object" ? value : {};
  } catch {
    return {};
  }
}

export function markSeen(sessionId, seq) {
  if (!sessionId || typeof seq !== "number") return;
  const seen = readSeen();
  if ((seen[sessionId] ?? -1) >= seq) return;
  seen[sessionId] = seq;
  write(seen);
}

export function forget(sessionId) {
  const seen = readSeen();
  if (!(sessionId in seen)) return;
  delete seen[sessionId];
  write(seen);
}

/** Unread on load: moved on since this browser last recorded it. A session never recorded
 * has nothing to compare with: it is recorded now, as read. */
export function unreadOnLoad(session) {
  const known = readSeen()[session.id];
  if (known === undefined) {
    markSeen(session.id, session.last_seq);
    return false;
  }
  return session.last_seq > known;
}

function write(seen) {
  try { localStorage.setItem(SEEN_KEY, JSON.stringify(seen)); } catch { /* full or blocked: not remembered */ }
}
