// The session page at "/s/<id>/": history over REST, then live events over WebSocket
// (SSE if WebSocket cannot connect): streaming replies, tool cards, permission requests,
// presence and typing, members, and the composer.
import { Tandem, TandemError } from "/static/js/tandem.js";
import { renderInto } from "/static/js/markdown.js";

const app = document.getElementById("session-app");
const SID = app.dataset.sessionId;
const ME = { id: Number(app.dataset.userId), username: app.dataset.username };
const MAX_CHARS = Number(app.dataset.maxChars) || 32000;
let role = app.dataset.role;
const canWrite = () => role === "owner" || role === "editor";
const base = `/api/sessions/${encodeURIComponent(SID)}`;

const api = new Tandem({
  onAuthLost: () => location.assign("/accounts/login/?next=" + encodeURIComponent(location.pathname)),
});

const $ = (id) => document.getElementById(id);
const els = {
  title: $("session-title"),
  status: $("session-status"),
  connection: $("connection"),
  presence: $("presence"),
  messages: $("messages"),
  messagesLoading: $("messages-loading"),
  messagesError: $("messages-error"),
  messagesEmpty: $("messages-empty"),
  typing: $("typing"),
  composer: $("composer"),
  input: $("composer-input"),
  send: $("send-button"),
  abort: $("abort-button"),
  sendNow: $("send-now-button"),
  composerError: $("composer-error"),
  charCount: $("char-count"),
  notice: $("page-notice"),
  gone: $("session-gone"),
  goneText: $("session-gone-text"),
  pending: $("pending-permissions"),
  pendingSummary: $("pending-summary"),
  review: $("review-permission"),
  dialog: $("permission-dialog"),
  members: $("members"),
  membersError: $("members-error"),
  invite: $("invite-form"),
};

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function showError(node, message) {
  if (!node) return;
  node.textContent = message || "";
  node.hidden = !message;
}

function errorText(err, fallback) {
  if (err instanceof TandemError) {
    const details = err.details && typeof err.details === "object" ? Object.values(err.details).flat() : [];
    const detail = details.filter((d) => typeof d === "string").join(" ");
    return detail ? `${err.message} ${detail}` : err.message || fallback;
  }
  return fallback;
}

let noticeTimer = null;
function notice(message) {
  clearTimeout(noticeTimer);
  els.notice.textContent = message;
  els.notice.classList.toggle("visible", Boolean(message));
  if (message) noticeTimer = setTimeout(() => notice(""), 12_000);
}

function formatTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function pretty(value) {
  if (value === undefined) return "";
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

function codePoints(text) {
  let n = 0;
  for (const _ of text) n += 1; // eslint-disable-line no-unused-vars
  return n;
}

const AVATAR_COLOURS = ["#1f5fa8", "#8a3ab9", "#0f7b5f", "#b3421b", "#5b5bd6", "#a3305e", "#2f6f3e", "#8a5a00"];
function colourFor(name) {
  let h = 0;
  for (const ch of name || "?") h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return AVATAR_COLOURS[h % AVATAR_COLOURS.length];
}
function initialOf(name) {
  return (name || "?").trim().charAt(0).toUpperCase() || "?";
}

const scroller = $("scroller");
function nearBottom() {
  return scroller.scrollHeight - (scroller.scrollTop + scroller.clientHeight) < 160;
}
function scrollToEnd() {
  scroller.scrollTop = scroller.scrollHeight;
  ownTop = scroller.scrollTop;
  stuck = true;
}
// Follow the conversation while the reader is at its end; leave them alone once they
// scroll up to read. Layout changes (a banner, a tool card) keep the end in view. Our own
// scrolls do not count as the reader's: by the time their event fires, more may have
// arrived below.
let stuck = true;
let ownTop = -1;
scroller.addEventListener("scroll", () => {
  if (scroller.scrollTop === ownTop) return;
  stuck = nearBottom();
}, { passive: true });
if (typeof ResizeObserver === "function") {
  const keep = new ResizeObserver(() => { if (stuck) scrollToEnd(); });
  keep.observe(scroller);
  keep.observe(document.getElementById("messages"));
}

// ------------------------------------------------------------------ session status

const STATUS_TEXT = { idle: "idle", busy: "busy", retry: "retrying" };
let sessionStatus = { type: app.querySelector("#session-status")?.dataset.status || "idle" };
let sessionGone = false;

function setSessionStatus(status) {
  sessionStatus = status || { type: "idle" };
  const type = sessionStatus.type || "idle";
  els.status.dataset.status = type;
  let text = STATUS_TEXT[type] || type;
  if (type === "retry" && sessionStatus.attempt) text = `retrying (attempt ${sessionStatus.attempt})`;
  els.status.textContent = text;
  els.status.title = sessionStatus.message || "";
  const showAbort = canWrite() && !sessionGone && type !== "idle";
  if (!showAbort && els.abort.contains(document.activeElement)) els.input.focus();
  els.abort.hidden = !showAbort;
  els.abort.disabled = false;
  if (els.sendNow) els.sendNow.hidden = !showAbort;
  syncRetry();
}

// ------------------------------------------------------------------ messages

const messages = new Map(); // id -> {data, el, body, statusEl, parts: Map}
const toolCards = new Map(); // call_id -> part record
let renderQueue = new Set();
let renderTimer = null;

const MESSAGE_STATUS_TEXT = {
  queued: "queued",
  streaming: "replying…",
  completed: "",
  cancelled: "cancelled",
  error: "error",
};

function messageRecord(id, data = {}) {
  let rec = messages.get(id);
  if (rec) return rec;
  const roleName = data.role || "assistant";
  const author = roleName === "assistant" ? "Agent" : data.author?.username || "someone";
  const statusEl = el("span", { class: "message-status", "data-status": data.status || "streaming" });
  const timeEl = el("time", {});
  const body = el("div", { class: "message-body" });
  const node = el("li", {
    class: `message message-${roleName}${data.author?.id === ME.id ? " message-mine" : ""}`,
    "data-message-id": id,
    "data-role": roleName,
    "data-status": data.status || "streaming",
  },
    el("div", { class: "message-head" },
      el("span", { class: "avatar small", "aria-hidden": "true",
                   style: roleName === "assistant" ? "" : `background:${colourFor(author)}`,
                   text: roleName === "assistant" ? "✦" : initialOf(author) }),
      el("span", { class: "author", text: author + (data.author?.id === ME.id ? " (you)" : "") }),
      timeEl, statusEl),
    body);
  node.id = `m-${id}`; // search hits and forks link here: /s/<session>/#m-<message>
  const forkButton = el("button", {
    type: "button", class: "secondary small fork-button", text: "Fork from here",
    title: "Start a new session of yours with the conversation up to this message",
    hidden: (data.status || "streaming") === "streaming",
  });
  forkButton.addEventListener("click", () => forkFrom(id, forkButton));
  node.querySelector(".message-head").append(forkButton);
  rec = { id, data: { ...data }, el: node, body, statusEl, timeEl, forkButton, parts: new Map() };
  messages.set(id, rec);
  insertMessageNode(rec);
  els.messagesEmpty.hidden = true;
  return rec;
}

function orderKey(data) {
  // The order of turns: a user message takes its turn when it is answered (its
  // completed_at; a queued one was posted earlier but comes after the replies it waited
  // for), a reply when it starts. Queued messages end the list, in posting order.
  if (data.status === "queued") return null;
  return (data.role === "user" && data.completed_at) || data.created_at || "\uffff";
}

function queuedCount() {
  let n = 0;
  for (const rec of messages.values()) if (rec.data.status === "queued") n += 1;
  return n;
}

function insertMessageNode(rec) {
  // Messages normally arrive in order, so append is the usual path.
  const key = orderKey(rec.data);
  let before = null;
  if (key !== null) {
    for (const other of [...els.messages.children].reverse()) {
      const o = messages.get(other.dataset.messageId);
      const otherKey = o ? orderKey(o.data) : null;
      if (otherKey === null || otherKey > key) before = other;
      else break;
    }
  }
  els.messages.insertBefore(rec.el, before);
}

function canWithdraw(rec) {
  return rec.data.status === "queued" && !sessionGone
    && (rec.data.author?.id === ME.id || role === "owner");
}

function syncMessageActions(rec) {
  // A queued message: its marker is the status; its author (or an owner) can withdraw it.
  let withdraw = rec.el.querySelector(":scope > .message-head .withdraw-button");
  if (canWithdraw(rec)) {
    if (!withdraw) {
      withdraw = el("button", { type: "button", class: "link-button withdraw-button", text: "Withdraw" });
      withdraw.setAttribute("aria-label", "Withdraw this queued message");
      withdraw.addEventListener("click", () => withdrawMessage(rec, withdraw));
      rec.el.querySelector(":scope > .message-head").append(withdraw);
    }
  } else if (withdraw) {
    withdraw.remove();
  }
  // A reply a retry replaced stays, collapsed: "Earlier attempt", opened on demand.
  if (rec.data.superseded_by && !rec.el.classList.contains("message-superseded")) {
    rec.el.classList.add("message-superseded");
    rec.body.hidden = true;
    const toggle = el("button", { type: "button", class: "link-button attempt-toggle", text: "Show earlier attempt" });
    toggle.setAttribute("aria-expanded", "false");
    toggle.addEventListener("click", () => {
      rec.body.hidden = !rec.body.hidden;
      toggle.setAttribute("aria-expanded", String(!rec.body.hidden));
      toggle.textContent = rec.body.hidden ? "Show earlier attempt" : "Hide earlier attempt";
    });
    rec.el.querySelector(":scope > .message-head").append(toggle);
  }
}

async function withdrawMessage(rec, button) {
  button.disabled = true;
  try {
    await api.del(`${base}/messages/${encodeURIComponent(rec.id)}/`);
    removeMessage(rec.id);
    notice("Queued message withdrawn.");
  } catch (err) {
    button.disabled = false;
    notice(err instanceof TandemError && err.code === "not_queued"
      ? "Too late: its turn has come."
      : errorText(err, "Could not withdraw the message."));
  }
}

function removeMessage(id) {
  const rec = messages.get(id);
  if (!rec) return;
  rec.el.remove();
  messages.delete(id);
  els.messagesEmpty.hidden = messages.size > 0;
  setSessionStatus(sessionStatus);
}

function latestReply() {
  let latest = null;
  for (const node of els.messages.children) {
    const rec = messages.get(node.dataset.messageId);
    if (rec && rec.data.role === "assistant") latest = rec;
  }
  return latest;
}

let retryRec = null;
function syncRetry() {
  // One Retry button, on the latest reply once it ended and nothing waits; prominent
  // when the reply failed or was cut short.
  const latest = latestReply();
  const show = latest && canWrite() && !sessionGone && latest.data.status !== "streaming"
    && (sessionStatus.type || "idle") === "idle" && !queuedCount() ? latest : null;
  if (retryRec && retryRec !== show) retryRec.el.querySelector(".retry-button")?.remove();
  retryRec = show;
  if (!show) return;
  let button = show.el.querySelector(".retry-button");
  if (!button) {
    button = el("button", { type: "button", class: "retry-button", text: "Retry" });
    button.setAttribute("aria-label", "Retry this reply");
    button.addEventListener("click", () => retryReply(show, button));
    show.el.append(button);
  }
  const failed = show.data.status === "error" || show.data.status === "cancelled";
  button.className = `retry-button ${failed ? "primary" : "secondary"}`;
}

async function retryReply(rec, button) {
  button.disabled = true;
  try {
    await api.post(`${base}/messages/${encodeURIComponent(rec.id)}/retry/`, {});
  } catch (err) {
    button.disabled = false;
    notice(errorText(err, "Could not retry the reply."));
  }
}

function updateMessageMeta(rec, data) {
  Object.assign(rec.data, data);
  const status = rec.data.status || "completed";
  rec.el.dataset.status = status;
  rec.statusEl.dataset.status = status;
  let text = MESSAGE_STATUS_TEXT[status] ?? status;
  if (status === "error" && rec.data.error?.message) text = `error: ${rec.data.error.message}`;
  rec.statusEl.textContent = text;
  rec.el.setAttribute("aria-busy", status === "streaming" ? "true" : "false");
  rec.forkButton.hidden = status === "streaming";
  if (rec.data.created_at) {
    rec.timeEl.dateTime = rec.data.created_at;
    rec.timeEl.textContent = formatTime(rec.data.created_at);
  }
  syncMessageActions(rec);
}

function upsertMessage(data) {
  const rec = messageRecord(data.id, data);
  updateMessageMeta(rec, { ...data, parts: undefined });
  for (const part of data.parts || []) setPart(rec, part);
  return rec;
}

function partRecord(rec, part) {
  let p = rec.parts.get(part.id);
  if (p) return p;
  p = { id: part.id, type: part.type, text: "", el: null, content: null };
  if (part.type === "tool") {
    p.el = el("div", { class: "tool-card", "data-part-id": part.id });
  } else if (part.type === "reasoning") {
    p.content = el("div", { class: "plain" });
    p.el = el("details", { class: "part part-reasoning", "data-part-id": part.id },
      el("summary", { text: "Reasoning" }), p.content);
  } else {
    const plain = rec.data.role === "user";
    p.el = el("div", { class: `part part-text ${plain ? "plain" : "markdown"}`, "data-part-id": part.id });
    p.content = p.el;
  }
  rec.parts.set(part.id, p);
  rec.body.append(p.el);
  return p;
}

function setPart(rec, part) {
  const p = partRecord(rec, part);
  if (part.type === "tool") {
    p.tool = part.tool ?? p.tool;
    p.callId = part.call_id ?? p.callId;
    p.state = { ...(p.state || {}), ...(part.state || {}) };
    if (p.callId) toolCards.set(p.callId, p);
    renderTool(p);
    return;
  }
  if (typeof part.text === "string") {
    p.text = part.text;
    p.uncertain = null; // a full state settles any overlap question
    scheduleRender(rec, p);
  }
}

function appendDelta(rec, part, delta, seq) {
  const p = partRecord(rec, part);
  if (p.uncertain) {
    // This part was mid-stream in a snapshot taken while events kept arriving: deltas up
    // to the snapshot's upper bound may already be in its text.
    if (seq !== null && seq !== undefined && seq <= p.uncertain.upto) {
      p.uncertain.deltas.push(delta);
      return;
    }
    settleOverlap(p);
  }
  p.text += delta;
  scheduleRender(rec, p);
}

function settleOverlap(p) {
  const { base: snap, deltas } = p.uncertain;
  p.uncertain = null;
  // The snapshot's text is (text at the lower bound) + the first k deltas: find the
  // largest such k and keep the deltas after it.
  let k = deltas.length;
  for (; k > 0; k -= 1) {
    if (snap.endsWith(deltas.slice(0, k).join(""))) break;
  }
  p.text = snap + deltas.slice(k).join("");
}

function scheduleRender(rec, p) {
  renderQueue.add(`${rec.id}\u0000${p.id}`);
  if (!renderTimer) renderTimer = setTimeout(flushRenders, 16);
}

function flushRenders() {
  renderTimer = null;
  const queue = renderQueue;
  renderQueue = new Set();
  for (const key of queue) {
    const [mid, pid] = key.split("\u0000");
    const rec = messages.get(mid);
    const p = rec?.parts.get(pid);
    if (!p) continue;
    if (p.el.classList.contains("markdown")) renderInto(p.content, p.text);
    else p.content.textContent = p.text;
  }
  if (stuck) scrollToEnd();
}

const TOOL_STATUS_TEXT = { pending: "waiting", running: "running", completed: "done", error: "failed" };

function renderTool(p) {
  const state = p.state || {};
  const status = state.status || "pending";
  p.el.dataset.status = status;
  if (p.callId) p.el.dataset.callId = p.callId;
  p.el.replaceChildren(
    el("div", { class: "tool-head" },
      el("span", { class: "tool-icon", "aria-hidden": "true", text: "⚙" }),
      el("span", { class: "tool-name" }, "Tool ", el("strong", { text: p.tool || "tool" })),
      el("span", { class: "tool-status", "data-status": status, text: TOOL_STATUS_TEXT[status] || status })),
  );
  const dl = el("dl", { class: "tool-io" });
  if (state.input !== undefined) dl.append(el("dt", { text: "Input" }), el("dd", {}, el("pre", { class: "code-block", text: pretty(state.input) })));
  if (state.output !== undefined) dl.append(el("dt", { text: "Output" }), el("dd", {}, el("pre", { class: "code-block", text: pretty(state.output) })));
  if (state.error !== undefined && state.error !== null) dl.append(el("dt", { text: "Error" }), el("dd", {}, el("pre", { class: "code-block error-text", text: pretty(state.error) })));
  p.el.append(dl);
}

function onToolStatus(props) {
  let p = props.call_id ? toolCards.get(props.call_id) : null;
  if (!p) {
    const rec = messageRecord(props.message_id, { role: "assistant", status: "streaming" });
    p = partRecord(rec, { id: `call-${props.call_id}`, type: "tool" });
    p.callId = props.call_id;
    toolCards.set(props.call_id, p);
  }
  p.tool = props.tool ?? p.tool;
  const state = { ...(p.state || {}), status: props.status };
  for (const key of ["input", "output", "error"]) if (key in props) state[key] = props[key];
  p.state = state;
  renderTool(p);
}

function clearMessages() {
  messages.clear();
  toolCards.clear();
  renderQueue.clear();
  els.messages.replaceChildren();
}

// ------------------------------------------------------------------ snapshot (REST)

/** Session, messages and pending permissions as of one seq when possible: read the head
 * before and after, retrying while events arrive in between. */
async function loadSnapshot() {
  let snap = null;
  for (let attempt = 0; attempt < 4; attempt += 1) {
    const before = await api.get(`${base}/`);
    const [msgs, perms] = await Promise.all([
      api.getAll(`${base}/messages/?limit=200`),
      api.get(`${base}/permissions/?status=pending`),
    ]);
    const after = await api.get(`${base}/`);
    snap = { session: after, messages: msgs, permissions: perms, low: before.last_seq, high: after.last_seq };
    if (before.last_seq === after.last_seq) break;
  }
  return snap;
}

function applySnapshot(snap) {
  clearMessages();
  const s = snap.session;
  if (s.role && s.role !== role) setRole(s.role);
  if (s.title) {
    els.title.textContent = s.title;
    document.title = `${s.title} · Tandem`;
  }
  setSessionStatus(s.status);
  for (const m of snap.messages) {
    const rec = upsertMessage(m);
    if (snap.high > snap.low && m.status === "streaming") {
      for (const p of rec.parts.values()) {
        if (p.type !== "tool") p.uncertain = { base: p.text, deltas: [], upto: snap.high };
      }
    }
  }
  flushRenders();
  els.messagesLoading.hidden = true;
  els.messagesEmpty.hidden = messages.size > 0;
  pendingPermissions.clear();
  for (const perm of snap.permissions || []) pendingPermissions.set(perm.id, perm);
  syncPermissionUi();
  syncRetry();
  if (stuck) scrollToEnd();
}

// ------------------------------------------------------------------ live events

let floorSeq = 0; // persisted events at or below this are already in the snapshot
let buffering = null; // events held while a snapshot reloads

function onEvent(event) {
  if (buffering) {
    buffering.push(event);
    return;
  }
  handle(event);
}

function handle(event) {
  if (event.seq !== null && event.seq !== undefined && event.seq <= floorSeq) return;
  const props = event.properties || {};
  switch (event.type) {
    case "message.created":
      if (props.message) {
        upsertMessage(props.message);
        setSessionStatus(sessionStatus);
        flushRenders();
        if (stuck || props.message.author?.id === ME.id) scrollToEnd();
      }
      break;
    case "message.part.updated": {
      const rec = messageRecord(props.message_id, { role: "assistant", status: "streaming" });
      if (typeof props.delta === "string") appendDelta(rec, props.part, props.delta, event.seq);
      else setPart(rec, props.part);
      break;
    }
    case "message.completed": {
      const rec = messages.get(props.message_id);
      if (rec) {
        for (const p of rec.parts.values()) if (p.uncertain) { settleOverlap(p); scheduleRender(rec, p); }
        updateMessageMeta(rec, { status: props.status, error: props.error, completed_at: event.time });
        syncRetry();
      }
      break;
    }
    case "message.updated": {
      const rec = messages.get(props.message_id);
      if (!rec) break;
      const wasQueued = rec.data.status === "queued";
      const change = { status: props.status };
      if (props.superseded_by) change.superseded_by = props.superseded_by;
      if (wasQueued) change.completed_at = event.time;
      updateMessageMeta(rec, change);
      if (wasQueued) insertMessageNode(rec); // its turn: out of the queue, into the conversation
      setSessionStatus(sessionStatus);
      break;
    }
    case "message.removed":
      removeMessage(props.message_id);
      break;
    case "tool.status":
      onToolStatus(props);
      break;
    case "session.status":
      setSessionStatus(props.status);
      break;
    case "session.updated":
      if (props.session?.title !== undefined) {
        els.title.textContent = props.session.title || SID;
        document.title = `${props.session.title || SID} · Tandem`;
      }
      break;
    case "session.deleted":
      endSession("This session was deleted.");
      break;
    case "permission.requested":
      if (props.permission) {
        pendingPermissions.set(props.permission.id, props.permission);
        syncPermissionUi();
      }
      break;
    case "permission.resolved":
      permissionResolved(props);
      break;
    case "member.added":
    case "member.removed":
      if (event.type === "member.removed" && props.user?.id === ME.id) {
        endSession("You were removed from this session.");
      } else {
        if (event.type === "member.added" && props.user?.id === ME.id && props.role) setRole(props.role);
        loadMembers();
      }
      break;
    case "presence.joined":
    case "presence.left":
    case "presence.updated":
      onPresence(event);
      break;
    default:
      break;
  }
}

async function onReset() {
  if (buffering) return;
  buffering = [];
  try {
    const snap = await loadSnapshot();
    applySnapshot(snap);
    floorSeq = snap.low;
  } catch (err) {
    showError(els.messagesError, errorText(err, "Could not reload the conversation."));
  } finally {
    const held = buffering || [];
    buffering = null;
    for (const event of held) handle(event);
  }
}

// ------------------------------------------------------------------ connection

const CONNECTION_TEXT = {
  connecting: "Connecting…",
  live: "Connected",
  reconnecting: "Reconnecting…",
  polling: "Connected (polling)",
  offline: "Offline",
  closed: "Disconnected",
};

let sub = null;
let transport = "ws";
let everLive = false;
let fallbackTimer = null;
let closingOnPurpose = false;

function setConnection(status) {
  els.connection.dataset.state = status;
  els.connection.dataset.transport = transport;
  els.connection.querySelector(".connection-text").textContent = CONNECTION_TEXT[status] || status;
  if (status === "live") {
    everLive = true;
    clearTimeout(fallbackTimer);
    if (presenceDirty) refreshPresence();
  }
}

function connect(after) {
  sub = api.subscribe(SID, {
    after,
    transport,
    onEvent,
    onStatus: (status, info = {}) => {
      if (sessionGone) return;
      if (status === "closed" && closingOnPurpose) return;
      setConnection(status);
      // WebSocket blocked (a proxy, a firewall)? Use SSE: everything but typing works.
      // (Deferred: closing a subscription from inside its own onStatus is not safe.)
      if (transport === "ws" && !everLive && status === "polling") setTimeout(fallBackToSse, 0);
      if (status === "closed") {
        if (info.reason === "session_deleted") endSession("This session was deleted.");
        else if (info.reason === "forbidden" || info.reason === "not_found") {
          endSession("This session is gone, or it is no longer shared with you.");
        } else if (info.reason === "auth_lost") {
          els.connection.querySelector(".connection-text").textContent = "Signed out";
        }
      }
    },
    onReset,
  });
  if (transport === "ws") {
    clearTimeout(fallbackTimer);
    fallbackTimer = setTimeout(() => { if (!everLive && navigator.onLine !== false) fallBackToSse(); }, 8000);
  }
}

function fallBackToSse() {
  if (transport !== "ws" || sessionGone) return;
  clearTimeout(fallbackTimer);
  const from = sub?.lastSeq ?? floorSeq;
  closingOnPurpose = true;
  try { sub?.close(); } catch { /* already closed */ }
  closingOnPurpose = false;
  transport = "sse";
  connect(from);
}

function endSession(message) {
  if (sessionGone) return;
  sessionGone = true;
  els.goneText.textContent = message;
  els.gone.hidden = false;
  const ending = sub;
  setTimeout(() => { try { ending?.close(); } catch { /* closed */ } }, 0);
  clearTimeout(fallbackTimer);
  setConnection("closed");
  els.input.disabled = true;
  els.send.disabled = true;
  els.abort.hidden = true;
  if (els.invite) els.invite.querySelectorAll("input, select, button").forEach((n) => { n.disabled = true; });
  pendingPermissions.clear();
  syncPermissionUi();
  presence.clear();
  renderPresence();
  els.gone.querySelector("a")?.focus();
}

// ------------------------------------------------------------------ composer and typing

function setRole(newRole) {
  role = newRole;
  app.dataset.role = newRole;
  $("session-role").textContent = newRole;
  const write = canWrite() && !sessionGone;
  els.input.disabled = !write;
  els.send.disabled = !write;
  setSessionStatus(sessionStatus);
  syncPermissionUi();
}

function validate(text) {
  if (!text.trim()) return "Write a message before sending.";
  const n = codePoints(text);
  if (n > MAX_CHARS) {
    return `This message is ${n.toLocaleString()} characters long; the limit is ${MAX_CHARS.toLocaleString()}. Shorten it by ${(n - MAX_CHARS).toLocaleString()} to send it.`;
  }
  return "";
}

function updateCharCount() {
  const n = codePoints(els.input.value);
  if (n > MAX_CHARS * 0.8) {
    els.charCount.textContent = `${n.toLocaleString()} / ${MAX_CHARS.toLocaleString()}`;
    els.charCount.classList.toggle("over", n > MAX_CHARS);
  } else {
    els.charCount.textContent = "";
    els.charCount.classList.remove("over");
  }
}

let sending = false;
async function sendMessage(ifBusy = "queue") {
  if (sending || !canWrite() || sessionGone) return;
  const text = els.input.value;
  const problem = validate(text);
  if (problem) {
    showError(els.composerError, problem);
    els.input.setAttribute("aria-invalid", "true");
    els.input.focus();
    return;
  }
  showError(els.composerError, "");
  els.input.removeAttribute("aria-invalid");
  sending = true;
  els.send.disabled = true;
  els.composer.setAttribute("aria-busy", "true");
  try {
    const result = await api.post(`${base}/messages/`, { parts: [{ type: "text", text }], if_busy: ifBusy });
    if (els.input.value === text) els.input.value = "";
    updateCharCount();
    if (result?.message) {
      // Shown at once; a queued one is marked "queued" until its turn comes.
      upsertMessage(result.message);
      setSessionStatus(sessionStatus);
      flushRenders();
      scrollToEnd();
    }
    if (result?.queued) notice(`Queued: your message is number ${result.position} in line.`);
    setTyping(false);
  } catch (err) {
    let message = errorText(err, "The message could not be sent. Try again.");
    if (err instanceof TandemError) {
      if (err.code === "queue_full") {
        message = "Too many messages are waiting in this session. Wait for some replies, then send again.";
      } else if (err.code === "session_busy" || err.status === 409) {
        message = "The agent is still replying. Wait until it finishes, or abort the reply, then send again.";
      } else if (err.status === 413) {
        message = `The server refused this message as too long (the limit is ${MAX_CHARS.toLocaleString()} characters).`;
      } else if (err.status === 403) {
        message = "You cannot send messages in this session.";
      } else if (err.status === 429) {
        message = "You are sending too fast. Wait a moment and try again.";
      } else if (err.status === 404) {
        endSession("This session is gone, or it is no longer shared with you.");
      }
    }
    showError(els.composerError, message);
  } finally {
    sending = false;
    els.composer.removeAttribute("aria-busy");
    els.send.disabled = !canWrite() || sessionGone;
    if (!sessionGone && document.activeElement === document.body) els.input.focus();
  }
}

els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  sendMessage();
});

els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
    e.preventDefault();
    sendMessage();
  }
});

let typingSent = false;
let typingIdle = null;
let typingRefresh = 0;

function sendPresence(state) {
  if (transport !== "ws" || !sub || sub.status !== "live") return;
  try {
    const p = sub.send({ type: "presence.update", state });
    if (p && typeof p.catch === "function") p.catch(() => {});
  } catch {
    /* not connected: typing is best effort */
  }
}

function setTyping(on) {
  clearTimeout(typingIdle);
  if (on) {
    const now = Date.now();
    if (!typingSent || now - typingRefresh > 4000) {
      typingSent = true;
      typingRefresh = now;
      sendPresence({ typing: true });
    }
    typingIdle = setTimeout(() => setTyping(false), 3000);
  } else if (typingSent) {
    typingSent = false;
    sendPresence({ typing: false });
  }
}

els.input.addEventListener("input", () => {
  updateCharCount();
  if (els.composerError.textContent && !validate(els.input.value)) {
    showError(els.composerError, "");
    els.input.removeAttribute("aria-invalid");
  }
  setTyping(els.input.value.length > 0);
});
els.input.addEventListener("blur", () => setTyping(false));

els.sendNow?.addEventListener("click", () => sendMessage("interrupt"));

els.abort.addEventListener("click", async () => {
  els.abort.disabled = true;
  try {
    const result = await api.post(`${base}/abort/`, {});
    notice(result?.aborted ? "Reply aborted." : "There was no reply to abort.");
  } catch (err) {
    notice(errorText(err, "Could not abort the reply."));
    els.abort.disabled = false;
  }
});

// ------------------------------------------------------------------ permissions

const pendingPermissions = new Map(); // id -> permission, oldest first
const dismissed = new Set();
let shownPermission = null;
let permissionReturnFocus = null;
const permButtons = {
  approve: $("permission-approve"),
  reject: $("permission-reject"),
  later: $("permission-later"),
};

function syncPermissionUi() {
  // The banner lists what is still waiting; the dialog opens for requests not put off.
  const waiting = [...pendingPermissions.values()];
  els.pending.hidden = waiting.length === 0;
  if (waiting.length) {
    const tools = waiting.map((p) => p.tool);
    els.pendingSummary.textContent = waiting.length === 1
      ? `It asks to run ${tools[0]}.`
      : `${waiting.length} requests: ${tools.join(", ")}.`;
    els.review.textContent = canWrite() ? "Review request" : "View request";
  }
  if (shownPermission && !pendingPermissions.has(shownPermission.id)) closePermissionDialog();
  if (!shownPermission) {
    const next = waiting.find((p) => !dismissed.has(p.id));
    if (next) openPermissionDialog(next);
  } else {
    fillPermissionDialog(pendingPermissions.get(shownPermission.id) || shownPermission);
  }
}

function fillPermissionDialog(perm) {
  shownPermission = perm;
  // An outside agent's question (MCP request_approval) has no reply behind it: show the
  // question itself rather than a tool and its input.
  const asked = isQuestion(perm);
  $("permission-text").replaceChildren(...(asked
    ? [`${perm.input.asked_by || "Someone"} asks, through an outside agent:`]
    : ["The agent wants to run ", Object.assign(document.createElement("strong"), { id: "permission-tool", textContent: perm.tool }), " with this input:"]));
  $("permission-input").textContent = asked
    ? perm.input.question + (perm.input.details ? `\n\n${pretty(perm.input.details)}` : "")
    : pretty(perm.input ?? {});
  const expires = perm.expires_at ? new Date(perm.expires_at) : null;
  $("permission-expires").textContent = expires && !Number.isNaN(expires.getTime())
    ? `If nobody answers by ${expires.toLocaleTimeString()}, it counts as rejected.` : "";
  const write = canWrite();
  $("permission-answer").hidden = !write;
  $("permission-readonly").hidden = write;
  permButtons.approve.hidden = !write;
  permButtons.reject.hidden = !write;
  permButtons.later.textContent = write ? "Later" : "Close";
  els.dialog.dataset.permissionId = perm.id;
}

function isQuestion(perm) {
  return perm?.message_id == null && perm?.tool === "approval" && typeof perm?.input?.question === "string";
}

function openPermissionDialog(perm) {
  if (sessionGone) return;
  const active = document.activeElement;
  permissionReturnFocus = active && !els.dialog.contains(active) && active !== document.body ? active : null;
  fillPermissionDialog(perm);
  $("permission-reason").value = "";
  showError($("permission-error"), "");
  setPermissionBusy(false);
  if (!els.dialog.open) els.dialog.showModal();
  // Focus the heading, not a button: an Enter meant for the composer must not approve.
  $("permission-heading").focus();
}

function closePermissionDialog(message) {
  const wasOpen = els.dialog.open;
  shownPermission = null;
  delete els.dialog.dataset.permissionId;
  if (wasOpen) els.dialog.close();
  if (message) notice(message);
}

els.dialog.addEventListener("close", () => {
  if (els.dialog.open) return; // already showing the next request
  const leftPending = shownPermission && pendingPermissions.has(shownPermission.id);
  if (leftPending) {
    // Escape or "Later": the request stays in the banner, with a button to come back.
    dismissed.add(shownPermission.id);
    shownPermission = null;
    notice("The permission request is still waiting. Use “Review request” to answer it.");
  }
  shownPermission = null;
  const target = leftPending
    ? els.review
    : permissionReturnFocus?.isConnected && !permissionReturnFocus.disabled ? permissionReturnFocus : els.input;
  permissionReturnFocus = null;
  if (target && !target.disabled && target.offsetParent !== null) target.focus();
  else if (!els.input.disabled) els.input.focus();
  else els.title.focus?.();
  // Another request may be waiting.
  setTimeout(syncPermissionUi, 0);
});

permButtons.later.addEventListener("click", () => els.dialog.close());
els.review.addEventListener("click", () => {
  const first = pendingPermissions.values().next().value;
  if (first) {
    dismissed.delete(first.id);
    openPermissionDialog(first);
  }
});

function setPermissionBusy(busy) {
  permButtons.approve.disabled = busy;
  permButtons.reject.disabled = busy;
  els.dialog.querySelector("form").setAttribute("aria-busy", busy ? "true" : "false");
}

function whoAnswered(by) {
  if (by === "timeout") return "nobody answered in time";
  if (!by) return "someone";
  if (typeof by === "object") return by.id === ME.id ? "you" : by.username;
  return String(by);
}

function resolvedText(tool, approved, by, reason, question = null) {
  const request = question === null ? `The request to run ${tool}` : `The question “${question}”`;
  if (by === "timeout") return `${request} expired: nobody answered in time.`;
  const who = whoAnswered(by);
  const Who = who === "you" ? "You" : who;
  const what = question === null ? `running ${tool}` : `the question “${question}”`;
  return `${Who} ${approved ? "approved" : "rejected"} ${what}${reason ? ` (“${reason}”)` : ""}.`;
}

async function answerPermission(approved) {
  const perm = shownPermission;
  if (!perm) return;
  const reason = $("permission-reason").value.trim();
  setPermissionBusy(true);
  showError($("permission-error"), "");
  try {
    const result = await api.post(`${base}/permissions/${encodeURIComponent(perm.id)}/`,
      reason ? { approved, reason } : { approved });
    pendingPermissions.delete(perm.id);
    closePermissionDialog(resolvedText(perm.tool, result?.approved ?? approved, ME, reason, isQuestion(perm) ? perm.input.question : null));
    syncPermissionUi();
  } catch (err) {
    if (err instanceof TandemError && (err.code === "already_resolved" || err.status === 409)) {
      const current = err.details?.permission || {};
      pendingPermissions.delete(perm.id);
      const text = current.status === "expired"
        ? `The request to run ${perm.tool} had already expired.`
        : `Already answered: ${resolvedText(perm.tool, current.approved, current.resolved_by, current.reason, isQuestion(perm) ? perm.input.question : null)}`;
      closePermissionDialog(text);
      syncPermissionUi();
    } else if (err instanceof TandemError && err.status === 404) {
      pendingPermissions.delete(perm.id);
      closePermissionDialog("That permission request no longer exists.");
      syncPermissionUi();
    } else {
      setPermissionBusy(false);
      showError($("permission-error"), errorText(err, "Your answer was not sent. Try again."));
    }
  }
}

permButtons.approve.addEventListener("click", () => answerPermission(true));
permButtons.reject.addEventListener("click", () => answerPermission(false));

function permissionResolved(props) {
  const perm = pendingPermissions.get(props.permission_id);
  pendingPermissions.delete(props.permission_id);
  dismissed.delete(props.permission_id);
  const question = isQuestion(perm) ? perm.input.question : null;
  const text = resolvedText(perm?.tool || "the tool", props.approved, props.resolved_by, props.reason, question);
  if (shownPermission?.id === props.permission_id) closePermissionDialog(text);
  else if (perm) notice(text);
  syncPermissionUi();
}

// ------------------------------------------------------------------ presence

const presence = new Map(); // user id -> {user, conns: Map(conn id -> state), count}
let presenceDirty = false;
let presenceTimer = null;

function onPresence(event) {
  const props = event.properties || {};
  const user = props.user;
  if (!user) return;
  let entry = presence.get(user.id);
  if (event.type === "presence.left") {
    if (entry) entry.conns.delete(props.connection_id);
    schedulePresenceRefresh();
  } else {
    if (!entry) {
      entry = { user, conns: new Map(), base: 0, baseState: {} };
      presence.set(user.id, entry);
    }
    entry.conns.set(props.connection_id, { ...(props.state || {}), at: Date.now() });
    if (event.type === "presence.joined") schedulePresenceRefresh();
  }
  renderPresence();
}

function schedulePresenceRefresh() {
  clearTimeout(presenceTimer);
  presenceTimer = setTimeout(refreshPresence, 300);
}

async function refreshPresence() {
  presenceDirty = false;
  try {
    const rows = await api.get(`${base}/presence/`);
    const seen = new Set();
    for (const row of rows) {
      seen.add(row.user.id);
      let entry = presence.get(row.user.id);
      if (!entry) {
        entry = { user: row.user, conns: new Map(), base: 0, baseState: {} };
        presence.set(row.user.id, entry);
      }
      entry.base = row.connections || 1;
      entry.baseState = { ...(row.state || {}), at: Date.now() };
    }
    for (const id of [...presence.keys()]) if (!seen.has(id)) presence.delete(id);
    renderPresence();
  } catch {
    presenceDirty = true;
  }
}

const TYPING_TTL = 8000;
function isTyping(entry) {
  const now = Date.now();
  for (const state of entry.conns.values()) if (state.typing && now - state.at < TYPING_TTL) return true;
  return Boolean(entry.baseState?.typing && now - entry.baseState.at < TYPING_TTL && entry.conns.size === 0);
}

function renderPresence() {
  const entries = [...presence.values()].sort((a, b) => a.user.username.localeCompare(b.user.username));
  // Always show yourself while connected.
  if (!sessionGone && sub && !presence.has(ME.id) && els.connection.dataset.state === "live") {
    entries.unshift({ user: ME, conns: new Map(), base: 1, baseState: {} });
  }
  els.presence.replaceChildren(...entries.map((entry) => {
    const name = entry.user.username;
    const typing = entry.user.id !== ME.id && isTyping(entry);
    return el("li", {
      class: `avatar${typing ? " typing" : ""}`, "data-username": name, "data-typing": typing ? "true" : "false",
      title: `${name}${entry.user.id === ME.id ? " (you)" : ""}${typing ? ", typing" : ""}`,
      style: `background:${colourFor(name)}`,
    },
    el("span", { "aria-hidden": "true", text: initialOf(name) }),
    el("span", { class: "visually-hidden", text: `${name}${entry.user.id === ME.id ? " (you)" : ""}${typing ? ", typing" : ""}` }));
  }));
  const typers = entries.filter((e) => e.user.id !== ME.id && isTyping(e)).map((e) => e.user.username);
  let text = "";
  if (typers.length === 1) text = `${typers[0]} is typing…`;
  else if (typers.length === 2) text = `${typers[0]} and ${typers[1]} are typing…`;
  else if (typers.length > 2) text = "Several people are typing…";
  if (els.typing.textContent !== text) els.typing.textContent = text;
}
setInterval(renderPresence, 2000); // lets stale typing flags fade out

// ------------------------------------------------------------------ members

let members = [];
async function loadMembers() {
  try {
    members = await api.get(`${base}/members/`);
    renderMembers();
    showError(els.membersError, "");
  } catch (err) {
    if (!(err instanceof TandemError && err.status === 404)) showError(els.membersError, errorText(err, "Could not load the members."));
  }
}

const ROLE_ORDER = { owner: 0, editor: 1, viewer: 2 };
function renderMembers() {
  $("members-count").textContent = members.length ? `(${members.length})` : "";
  const sorted = [...members].sort((a, b) => (ROLE_ORDER[a.role] - ROLE_ORDER[b.role]) || a.user.username.localeCompare(b.user.username));
  els.members.replaceChildren(...sorted.map((m) => {
    const name = m.user.username;
    const li = el("li", { class: "member", "data-username": name, "data-role": m.role },
      el("span", { class: "avatar small", "aria-hidden": "true", style: `background:${colourFor(name)}`, text: initialOf(name) }),
      el("span", { class: "member-name", text: name + (m.user.id === ME.id ? " (you)" : "") }),
      el("span", { class: "role-pill", "data-role": m.role, text: m.role }));
    if (role === "owner" && m.role !== "owner" && !sessionGone) {
      li.append(el("button", {
        type: "button", class: "link-button remove-member", text: "Remove", "aria-label": `Remove ${name}`,
        onclick: (e) => removeMember(name, e.currentTarget),
      }));
    }
    return li;
  }));
}

async function removeMember(username, button) {
  button.disabled = true;
  try {
    await api.del(`${base}/members/${encodeURIComponent(username)}/`);
    members = members.filter((m) => m.user.username !== username);
    renderMembers();
    notice(`${username} was removed from this session.`);
    $("invite-username")?.focus();
  } catch (err) {
    button.disabled = false;
    showError(els.membersError, errorText(err, `Could not remove ${username}.`));
  }
}

if (els.invite) {
  els.invite.addEventListener("submit", async (e) => {
    e.preventDefault();
    const username = $("invite-username").value.trim();
    const inviteRole = $("invite-role").value;
    const errorNode = $("invite-error");
    if (!username) {
      showError(errorNode, "Enter the username of the person to invite.");
      $("invite-username").focus();
      return;
    }
    showError(errorNode, "");
    const button = els.invite.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const added = await api.post(`${base}/members/`, { username, role: inviteRole });
      members = [...members.filter((m) => m.user.username !== added.user.username), added];
      renderMembers();
      $("invite-username").value = "";
      notice(`${added.user.username} can now ${added.role === "editor" ? "send messages and answer requests" : "follow this session"}.`);
    } catch (err) {
      let message = errorText(err, "Could not invite them.");
      if (err instanceof TandemError && err.status === 409) message = `${username} is already a member.`;
      else if (err instanceof TandemError && err.code === "validation_error" && err.details?.username) {
        message = `There is no user called “${username}”.`;
      }
      showError(errorNode, message);
      $("invite-username").focus();
    } finally {
      button.disabled = false;
    }
  });
}

// ------------------------------------------------------------------ fork

async function forkFrom(messageId, button) {
  button.disabled = true;
  notice("Forking…");
  try {
    const session = await api.fork(SID, { messageId });
    location.assign(`/s/${encodeURIComponent(session.id)}/`);
  } catch (err) {
    button.disabled = false;
    notice(errorText(err, "Could not fork the session. Try again."));
  }
}

/** The message the URL points at (#m-<id>, from a search hit or a fork's link), shown. */
function showLinkedMessage() {
  const match = /^#m-(.+)$/.exec(location.hash);
  const rec = match ? messages.get(decodeURIComponent(match[1])) : null;
  if (!rec) return false;
  rec.el.classList.add("message-target");
  rec.el.scrollIntoView({ block: "center" });
  stuck = false;
  return true;
}

// ------------------------------------------------------------------ start

async function start() {
  // On a phone the members panel starts folded, so the conversation gets the room.
  if (window.matchMedia("(max-width: 900px)").matches) $("members-panel").open = false;
  setSessionStatus(sessionStatus);
  updateCharCount();
  let snap;
  try {
    snap = await loadSnapshot();
  } catch (err) {
    els.messagesLoading.hidden = true;
    if (err instanceof TandemError && err.status === 404) {
      endSession("This session is gone, or it is no longer shared with you.");
    } else {
      showError(els.messagesError, errorText(err, "Could not load the conversation. Reload the page to try again."));
    }
    return;
  }
  applySnapshot(snap);
  floorSeq = snap.low;
  if (!showLinkedMessage()) scrollToEnd();
  connect(snap.low);
  loadMembers();
  refreshPresence();
}

window.addEventListener("pagehide", () => {
  setTyping(false);
  try { sub?.close(); } catch { /* closed */ }
});

start();
