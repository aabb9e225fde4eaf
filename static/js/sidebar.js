// The sessions sidebar of the session page: every session of the caller, most recent
// activity first, each with its status (idle, busy, retrying, waiting for approval) and an
// unread marker, kept live from the user-level stream. Switching is a plain link.
//
// Unread: this browser remembers, per session, the last event seq its user has seen
// (localStorage "tandem.seen", shared by tabs). A session is unread when someone else's
// message (or a reply) arrived after that, live or while away (its `last_seq` moved on).
// The open session is always read. A session this browser has never recorded counts as
// read when first listed (there is nothing to compare with), and as unread when the user
// is added to it live.
import { Tandem, TandemError } from "/static/js/tandem.js";
import { el } from "/static/js/dom.js";
import { SEEN_KEY, forget, markSeen, readSeen } from "/static/js/seen.js";

const nav = document.getElementById("sessions-sidebar");
const list = document.getElementById("sidebar-list");
const toggle = document.getElementById("sidebar-toggle");
const toggleCount = document.getElementById("sidebar-toggle-count");
const closeButton = document.getElementById("sidebar-close");
const scrim = document.getElementById("sidebar-scrim");
const errorLine = document.getElementById("sidebar-error");
const app = document.getElementById("session-app");
const CURRENT = app?.dataset.sessionId || "";
const ME = Number(app?.dataset.userId);

const COLLAPSED_KEY = "tandem.sidebar.collapsed";
const PHONE = window.matchMedia("(max-width: 900px)");

// The words of the session page and the sessions list, so one status reads the same everywhere.
const STATUS_TEXT = { idle: "idle", busy: "busy", retry: "retrying", waiting: "waiting for approval" };

/** id -> {session, lastSeq, unread, waiting: Set<permission id>} */
const entries = new Map();

// ------------------------------------------------------------------ rendering

function titleOf(session) {
  return session.title || "Untitled session";
}

function statusOf(entry) {
  if (entry.waiting.size) return "waiting";
  return entry.session.status?.type || "idle";
}

function render(entry) {
  const s = entry.session;
  const status = statusOf(entry);
  const current = s.id === CURRENT;
  const unread = entry.unread && !current;
  const link = el("a", { class: "sidebar-link", href: `/s/${encodeURIComponent(s.id)}/`, "aria-current": current ? "page" : null },
    el("span", { class: "sidebar-title", text: titleOf(s) }),
    el("span", { class: "sidebar-state" },
      el("span", { class: "sidebar-status", "data-status": status, text: STATUS_TEXT[status] || status }),
      unread ? el("span", { class: "unread-marker", text: "new" }, el("span", { class: "visually-hidden", text: " messages" })) : null));
  return el("li", {
    class: "sidebar-item", "data-session-id": s.id, "data-status": status,
    "data-unread": unread ? "true" : "false", "data-current": current ? "true" : "false",
  }, link);
}

function itemFor(sessionId) {
  return list.querySelector(`[data-session-id="${CSS.escape(sessionId)}"]`);
}

/** Draws one entry in place, or at the top with `top` (new activity). */
function draw(sessionId, { top = false } = {}) {
  const entry = entries.get(sessionId);
  const existing = itemFor(sessionId);
  if (!entry) {
    existing?.remove();
    updateCount();
    return;
  }
  const hadFocus = existing?.contains(document.activeElement);
  const fresh = render(entry);
  if (!existing) list.prepend(fresh);
  else if (top && list.firstElementChild !== existing) { existing.remove(); list.prepend(fresh); }
  else existing.replaceWith(fresh);
  if (hadFocus) fresh.querySelector("a").focus();
  updateCount();
}

function updateCount() {
  // The toggle carries how many other sessions want attention: it is all a phone shows.
  let n = 0;
  for (const entry of entries.values()) {
    if (entry.session.id !== CURRENT && (entry.unread || entry.waiting.size)) n += 1;
  }
  if (!toggleCount) return;
  toggleCount.textContent = n ? String(n) : "";
  toggleCount.hidden = n === 0;
  toggle.setAttribute("aria-label", n ? `Sessions, ${n} with news` : "Sessions");
}

// ------------------------------------------------------------------ state

function upsert(session, { unread = false, top = false } = {}) {
  const previous = entries.get(session.id);
  const entry = previous || { session: {}, lastSeq: 0, unread: false, waiting: new Set() };
  entry.session = { ...entry.session, ...session };
  if (typeof session.last_seq === "number") entry.lastSeq = Math.max(entry.lastSeq, session.last_seq);
  if (unread) entry.unread = true;
  entries.set(session.id, entry);
  draw(session.id, { top: top || !previous });
  return entry;
}

function remove(sessionId) {
  entries.delete(sessionId);
  forget(sessionId);
  draw(sessionId);
}

async function loadWaiting(entry) {
  // A permission request is only pending while a reply runs: idle sessions have none.
  if ((entry.session.status?.type || "idle") === "idle") return;
  try {
    const pending = await api.get(`/api/sessions/${encodeURIComponent(entry.session.id)}/permissions/?status=pending`);
    for (const p of pending) entry.waiting.add(p.id);
    draw(entry.session.id);
  } catch { /* the session may be gone; its event says so */ }
}

async function reload() {
  try {
    const all = await api.getAll("/api/sessions/");
    const seen = readSeen();
    const fresh = new Set(all.map((s) => s.id));
    for (const id of [...entries.keys()]) if (!fresh.has(id)) { entries.delete(id); itemFor(id)?.remove(); }
    list.replaceChildren();
    for (const s of all) {
      const previous = entries.get(s.id);
      const known = seen[s.id];
      if (s.id === CURRENT || known === undefined) markSeen(s.id, s.last_seq);
      const entry = { session: s, lastSeq: s.last_seq, waiting: previous?.waiting || new Set(),
                      unread: previous?.unread || (known !== undefined && s.last_seq > known && s.id !== CURRENT) };
      entries.set(s.id, entry);
      list.append(render(entry));
      loadWaiting(entry);
    }
    errorLine.hidden = true;
    updateCount();
  } catch (err) {
    errorLine.textContent = err instanceof TandemError ? `Could not load your sessions: ${err.message}` : "Could not load your sessions.";
    errorLine.hidden = false;
  }
}

async function fetchOne(sessionId, options) {
  try {
    const session = await api.get(`/api/sessions/${encodeURIComponent(sessionId)}/`);
    const entry = upsert(session, options);
    loadWaiting(entry);
  } catch { /* not visible to us */ }
}

function onEvent(event) {
  const props = event.properties || {};
  const sid = event.session_id || props.session?.id;
  if (!sid) return;
  const entry = entries.get(sid);
  const persisted = typeof event.seq === "number";
  if (entry && persisted) {
    entry.lastSeq = Math.max(entry.lastSeq, event.seq);
    if (sid === CURRENT) markSeen(sid, event.seq);
  }
  switch (event.type) {
    case "session.created":
      if (!entry && props.session) upsert(props.session, { top: true });
      return;
    case "session.updated":
      if (entry && props.session) { entry.session = { ...entry.session, ...props.session }; draw(sid, { top: true }); }
      return;
    case "session.status":
      if (!entry) { fetchOne(sid, { top: true }); return; }
      entry.session.status = props.status;
      if ((props.status?.type || "idle") === "idle") entry.waiting.clear();
      draw(sid, { top: true });
      return;
    case "session.deleted":
      remove(sid);
      return;
    case "member.added":
      if (props.user?.id === ME && !entry) fetchOne(sid, { unread: true, top: true });
      else if (entry) draw(sid, { top: true });
      return;
    case "member.removed":
      if (props.user?.id === ME) remove(sid);
      else if (entry) draw(sid, { top: true });
      return;
    case "message.created": {
      if (!entry) return;
      const authorId = props.message?.author?.id;
      if (sid !== CURRENT && authorId !== ME) entry.unread = true;
      draw(sid, { top: true });
      return;
    }
    case "permission.requested":
      if (entry && props.permission?.id) { entry.waiting.add(props.permission.id); draw(sid, { top: true }); }
      return;
    case "permission.resolved":
      if (entry && entry.waiting.delete(props.permission_id)) draw(sid);
      return;
    default:
      if (entry && persisted) draw(sid, { top: true });
  }
}

/** After an event of another session that brought nothing to read (a status change, one's
 * own message), everything up to it counts as seen, unless something unread is waiting:
 * so a reload agrees with what the live page showed. */
function afterEvent(event) {
  const sid = event.session_id;
  const entry = sid ? entries.get(sid) : null;
  if (entry && !entry.unread && typeof event.seq === "number") markSeen(sid, event.seq);
}

// Another tab of this browser opened a session: it is read here too.
window.addEventListener("storage", (e) => {
  if (e.key !== SEEN_KEY) return;
  const seen = readSeen();
  for (const [id, entry] of entries) {
    if (entry.unread && (seen[id] ?? -1) >= entry.lastSeq) { entry.unread = false; draw(id); }
  }
});

// ------------------------------------------------------------------ open and close

function readCollapsed() {
  try { return localStorage.getItem(COLLAPSED_KEY) === "1"; } catch { return false; }
}

/** Desktop: a column, folded away with the toggle (remembered). Phone: a drawer over the
 * page, closed until asked for, closed again by Esc, the scrim, the close button or a link. */
function setOpen(open, { remember = false, focus = false } = {}) {
  const phone = PHONE.matches;
  nav.hidden = !open;
  nav.dataset.mode = phone ? "drawer" : "column";
  document.body.classList.toggle("sidebar-open", open);
  document.body.classList.toggle("sidebar-drawer", phone && open);
  if (scrim) scrim.hidden = !(phone && open);
  // The drawer is modal on a phone: the page behind it takes no focus or taps.
  if (app) app.inert = phone && open;
  toggle?.setAttribute("aria-expanded", open ? "true" : "false");
  if (remember && !phone) {
    try { localStorage.setItem(COLLAPSED_KEY, open ? "0" : "1"); } catch { /* not remembered */ }
  }
  if (focus && open) (list.querySelector('[aria-current="page"]') || list.querySelector("a") || closeButton)?.focus();
  else if (focus && !open) toggle?.focus();
}

function layout() {
  setOpen(PHONE.matches ? false : !readCollapsed());
}

toggle?.addEventListener("click", () => setOpen(nav.hidden, { remember: true, focus: PHONE.matches }));
closeButton?.addEventListener("click", () => setOpen(false, { remember: true, focus: true }));
scrim?.addEventListener("click", () => setOpen(false));
nav.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && PHONE.matches && !nav.hidden) { e.preventDefault(); setOpen(false, { focus: true }); }
});
PHONE.addEventListener("change", layout);
layout();

// ------------------------------------------------------------------ start

// The same user-level stream as the sessions list (same types): all of this user's tabs,
// list and sessions alike, share one connection (docs/CLIENT.md, tab sharing).
const me = document.getElementById("session-app")?.dataset.userId;
const api = new Tandem(me ? { shareTabs: `user-${me}` } : {});
// Held until the list is loaded, then applied in order (as the sessions page does).
let held = [];
const sub = api.subscribe(null, {
  types: "session.*,member.*,message.created,permission.*",
  onEvent: (event) => (held ? held.push(event) : (onEvent(event), afterEvent(event))),
  onReset: () => reload(),
});
await reload();
const early = held;
held = null;
for (const event of early) { onEvent(event); afterEvent(event); }
window.addEventListener("pagehide", () => { try { sub.close(); } catch { /* closed */ } });
