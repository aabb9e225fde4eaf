// The session page at "/s/<id>/": history over REST, then live events over WebSocket
// (SSE if WebSocket cannot connect): streaming replies, tool cards, permission requests,
// presence and typing, members, and the composer.
import { Tandem, TandemError } from "/static/js/tandem.js";
import { el, showError, errorText } from "/static/js/dom.js";
import { copyText, renderInto } from "/static/js/markdown.js";

const app = document.getElementById("session-app");
const SID = app.dataset.sessionId;
const ME = { id: Number(app.dataset.userId), username: app.dataset.username };
const MAX_CHARS = Number(app.dataset.maxChars) || 32000;
let role = app.dataset.role;
const canWrite = () => role === "owner" || role === "editor";
const base = `/api/sessions/${encodeURIComponent(SID)}`;

const api = new Tandem({
  // One live stream per browser: this user's tabs share one connection (docs/CLIENT.md).
  shareTabs: `user-${ME.id}`,
  onAuthLost: () => location.assign("/accounts/login/?next=" + encodeURIComponent(location.pathname)),
});

const $ = (id) => document.getElementById(id);
const els = {
  title: $("session-title"),
  status: $("session-status"),
  connection: $("connection"),
  reconnectNow: $("reconnect-now"),
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
  loadOlder: $("load-older"),
  newPill: $("new-messages"),
  hints: $("command-hints"),
  members: $("members"),
  membersError: $("members-error"),
  invite: $("invite-form"),
};

// ------------------------------------------------------------------ small helpers

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

function formatFullDate(iso) {
  const d = iso ? new Date(iso) : null;
  if (!d || Number.isNaN(d.getTime())) return "";
  return d.toLocaleString([], { dateStyle: "full", timeStyle: "medium" });
}

function dayKey(iso) {
  const d = iso ? new Date(iso) : null;
  if (!d || Number.isNaN(d.getTime())) return "";
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
}

function dayLabel(iso) {
  const d = new Date(iso);
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(iso) === dayKey(today.toISOString())) return "Today";
  if (dayKey(iso) === dayKey(yesterday.toISOString())) return "Yesterday";
  return d.toLocaleDateString([], { weekday: "long", year: "numeric", month: "long", day: "numeric" });
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
  syncNewPill(false);
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
  if (stuck) syncNewPill(false);
  // Reading up to the top loads the page before it.
  if (scroller.scrollTop < 120 && olderUrl && !loadingOlder) loadOlder();
}, { passive: true });

// "New messages ↓": something arrived below while the reader is scrolled up.
function syncNewPill(show) {
  const pill = document.getElementById("new-messages");
  if (pill) pill.hidden = !show;
}
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
  const copyButton = el("button", { type: "button", class: "copy-button copy-message", text: "Copy" });
  copyButton.setAttribute("aria-label", `Copy this message (${author})`);
  copyButton.addEventListener("click", () => copyText(messageText(rec), copyButton));
  node.querySelector(".message-head").append(forkButton, copyButton);
  rec = { id, data: { ...data }, el: node, body, statusEl, timeEl, forkButton, parts: new Map() };
  messages.set(id, rec);
  insertMessageNode(rec);
  els.messagesEmpty.hidden = true;
  scheduleDays();
  return rec;
}

/** A message as text: its text parts' sources (Markdown as written), tools by name. */
function messageText(rec) {
  const out = [];
  for (const p of rec.parts.values()) {
    if (p.type === "tool") out.push(`[tool ${p.tool || ""}]`);
    else if (p.type !== "reasoning" && p.text) out.push(p.text);
  }
  return out.join("\n\n");
}

// A separator with the date above the first message of each day (a data attribute the
// stylesheet shows, so the list holds messages only).
let daysTimer = null;
function scheduleDays() {
  if (!daysTimer) daysTimer = setTimeout(syncDays, 0);
}
function syncDays() {
  clearTimeout(daysTimer);
  daysTimer = null;
  let last = "";
  for (const node of els.messages.children) {
    const rec = messages.get(node.dataset.messageId);
    const at = rec?.data.created_at;
    const key = dayKey(at);
    if (key && key !== last) node.dataset.dayLabel = dayLabel(at);
    else delete node.dataset.dayLabel;
    if (key) last = key;
  }
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
  scheduleDays();
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
    rec.timeEl.title = formatFullDate(rec.data.created_at);
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
    if (p.el.classList.contains("markdown")) renderInto(p.content, p.text, { autodetect: rec.data.status !== "streaming" });
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
  // The card's own content is redrawn; its approval slot (which may hold the reason
  // someone is typing, and the focus) is left alone.
  if (!p.main) {
    p.main = el("div", { class: "tool-main" });
    p.slot = el("div", { class: "tool-approval" });
    p.el.replaceChildren(p.main, p.slot);
  }
  p.main.replaceChildren(
    el("div", { class: "tool-head" },
      el("span", { class: "tool-icon", "aria-hidden": "true", text: "⚙" }),
      el("span", { class: "tool-name" }, "Tool ", el("strong", { text: p.tool || "tool" })),
      el("span", { class: "tool-status", "data-status": status, text: TOOL_STATUS_TEXT[status] || status })),
  );
  const dl = el("dl", { class: "tool-io" });
  if (state.input !== undefined) dl.append(el("dt", { text: "Input" }), el("dd", {}, el("pre", { class: "code-block", text: pretty(state.input) })));
  if (state.output !== undefined) dl.append(el("dt", { text: "Output" }), el("dd", {}, el("pre", { class: "code-block", text: pretty(state.output) })));
  if (state.error !== undefined && state.error !== null) dl.append(el("dt", { text: "Error" }), el("dd", {}, el("pre", { class: "code-block error-text", text: pretty(state.error) })));
  p.main.append(dl);
  if (p.resolution) p.main.append(el("p", { class: "approval-result", text: p.resolution }));
  if (pendingForCall(p.callId) && !p.slot.firstChild) placeApprovals();
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

const PAGE_SIZE = 200;
let olderUrl = null; // the page before the oldest message shown (null: it is the first)
let loadingOlder = false;

function syncLoadOlder() {
  els.loadOlder.hidden = !olderUrl;
  els.loadOlder.disabled = loadingOlder;
  els.loadOlder.textContent = loadingOlder ? "Loading older messages…" : "Load older messages";
}

async function loadOlder() {
  if (!olderUrl || loadingOlder) return false;
  loadingOlder = true;
  syncLoadOlder();
  const url = olderUrl;
  try {
    const page = await api.get(url);
    if (url !== olderUrl) return false; // a resync replaced the history meanwhile
    pageHeardFromServer();
    // Keep what the reader looks at in place while messages go in above it.
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    stuck = false;
    for (const m of page.results || []) upsertMessage(m);
    flushRenders();
    syncDays(); // now, so the height measured below includes the date lines
    olderUrl = page.previous || null;
    scroller.scrollTop = scroller.scrollHeight - fromBottom;
    ownTop = scroller.scrollTop;
    showError(els.messagesError, "");
    return true;
  } catch (err) {
    showError(els.messagesError, errorText(err, "Could not load older messages. Try again."));
    if (err instanceof TandemError && err.code === "network_error") networkErrors.add(els.messagesError);
    return false;
  } finally {
    loadingOlder = false;
    syncLoadOlder();
  }
}
els.loadOlder.addEventListener("click", () => loadOlder());
els.newPill.addEventListener("click", () => {
  scrollToEnd();
  els.input.disabled ? scroller.focus({ preventScroll: true }) : els.input.focus({ preventScroll: true });
});

/** Session, messages and pending permissions as of one seq when possible: read the head
 * before and after, retrying while events arrive in between. */
async function loadSnapshot() {
  let snap = null;
  for (let attempt = 0; attempt < 4; attempt += 1) {
    const before = await api.get(`${base}/`);
    // The latest page only: older messages load when the reader asks (or scrolls up).
    const [page, perms] = await Promise.all([
      api.get(`${base}/messages/?latest=true&limit=${PAGE_SIZE}`),
      api.get(`${base}/permissions/?status=pending`),
    ]);
    const after = await api.get(`${base}/`);
    snap = {
      session: after, messages: page.results || [], older: page.previous || null,
      permissions: perms, low: before.last_seq, high: after.last_seq,
    };
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
    syncTitle();
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
  olderUrl = snap.older;
  syncLoadOlder();
  showError(els.messagesError, "");
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
  if (event.seq !== null && event.seq !== undefined) pageHeardFromServer();
  switch (event.type) {
    case "message.created":
      if (props.message) {
        const known = messages.has(props.message.id);
        upsertMessage(props.message);
        setSessionStatus(sessionStatus);
        flushRenders();
        const mine = props.message.author?.id === ME.id;
        if (stuck || mine) scrollToEnd();
        else if (!known) syncNewPill(true);
        if (!known && !mine && props.message.role === "user") {
          const who = props.message.author?.username || "someone";
          const text = (props.message.parts || []).map((p) => p.text || "").join(" ").trim();
          announce(`${who}: ${text}`);
          attention({});
        }
      }
      break;
    case "message.part.updated": {
      const rec = messageRecord(props.message_id, { role: "assistant", status: "streaming" });
      if (typeof props.delta === "string") appendDelta(rec, props.part, props.delta, event.seq);
      else setPart(rec, props.part);
      if (!stuck) syncNewPill(true);
      break;
    }
    case "message.completed": {
      const rec = messages.get(props.message_id);
      if (rec) {
        const wasStreaming = rec.data.status === "streaming";
        for (const p of rec.parts.values()) if (p.uncertain) { settleOverlap(p); scheduleRender(rec, p); }
        updateMessageMeta(rec, { status: props.status, error: props.error, completed_at: event.time });
        // Finished: render once more, now guessing the language of unnamed code blocks.
        for (const p of rec.parts.values()) if (p.el?.classList.contains("markdown")) scheduleRender(rec, p);
        syncRetry();
        if (wasStreaming && rec.data.role === "assistant") {
          const said = messageText(rec).trim();
          if (props.status === "completed") announce(`Agent replied: ${said}`);
          else if (props.status === "cancelled") announce("The agent's reply was stopped.");
          else announce(`The agent's reply failed${props.error?.message ? `: ${props.error.message}` : "."}`);
          attention({});
        }
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
        els.title.textContent = props.session.title || "Untitled session";
        syncTitle();
      }
      break;
    case "session.deleted":
      endSession("This session was deleted.");
      break;
    case "permission.requested":
      if (props.permission) permissionRequested(props.permission);
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
    if (err instanceof TandemError && err.code === "network_error") networkErrors.add(els.messagesError);
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
// What Enter says while Send is off: the text stays in the box.
const NOT_CONNECTED = "Not connected: your message stays here. Send it when the connection is back.";
// Why we are not connected, when the client says (StatusInfo.reason).
const REASON_TEXT = {
  server_unreachable: "Server unreachable · reconnecting…",
  poll_failed: "Server not answering · reconnecting…",
  leader_changed: "Reconnecting…",
};

let sub = null;
let transport = "ws";
let everLive = false;
let fallbackTimer = null;
let closingOnPurpose = false;
// Whether events flow (live, or polls that answer): presence is current.
let linkUp = false;
// Whether Send works: while the first connection opens too (the page just loaded over REST).
let sendable = true;

function setConnection(status, info = {}) {
  els.connection.dataset.state = status;
  els.connection.dataset.transport = transport;
  els.connection.dataset.reason = info.reason || "";
  els.connection.dataset.tab = info.shared ? (info.leader ? "leader" : "follower") : "";
  const text = (status === "reconnecting" && REASON_TEXT[info.reason]) || CONNECTION_TEXT[status] || status;
  els.connection.querySelector(".connection-text").textContent = text;
  els.connection.title = info.error?.message ? `${text} (${info.error.message})` : "";
  const wasUp = linkUp;
  linkUp = status === "live" || status === "polling";
  sendable = linkUp || status === "connecting";
  // Reconnecting on its own may take a while (it waits for the server): offer it now.
  if (els.reconnectNow) els.reconnectNow.hidden = sessionGone || !(status === "reconnecting" || status === "offline");
  els.presence.dataset.stale = linkUp ? "false" : "true";
  els.presence.title = linkUp ? "" : "Not connected: who is here may be out of date.";
  if (!sessionGone) {
    els.send.disabled = !canWrite() || !sendable || sending;
    els.send.title = sendable ? "" : "Not connected: Send comes back when the connection does.";
    if (sendable && els.composerError.textContent === NOT_CONNECTED) showError(els.composerError, "");
  }
  if (status === "live") {
    pageHeardFromServer();
    everLive = true;
    clearTimeout(fallbackTimer);
  }
  if (linkUp && (!wasUp || presenceDirty)) refreshPresence();
}

els.reconnectNow?.addEventListener("click", () => {
  if (sub && !sessionGone) sub.reconnect();
});

function connect(after) {
  sub = api.subscribe(SID, {
    after,
    transport,
    onEvent,
    onStatus: (status, info = {}) => {
      if (sessionGone) return;
      if (status === "closed" && closingOnPurpose) return;
      setConnection(status, info);
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
  // What this page knew of the members is no longer this user's to see (or true).
  members = [];
  renderMembers();
  $("session-role").textContent = "no longer a member";
  showError(els.membersError, "");
  showError($("invite-error"), "");
  els.members.replaceChildren(el("li", { class: "member member-gone muted", text: message }));
  els.gone.querySelector("a")?.focus();
}

// ------------------------------------------------------------------ composer and typing

function setRole(newRole) {
  role = newRole;
  // Approval blocks are made for a role: rebuild them.
  for (const block of approvals.values()) block.remove();
  approvals.clear();
  app.dataset.role = newRole;
  $("session-role").textContent = newRole;
  const write = canWrite() && !sessionGone;
  els.input.disabled = !write;
  els.send.disabled = !write || !sendable;
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
  if (!sendable) {
    showError(els.composerError, NOT_CONNECTED);
    return;
  }
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
    pageHeardFromServer();
    if (els.input.value === text) els.input.value = "";
    updateCharCount();
    fitComposer();
    if (result?.message) {
      // Shown at once; a queued one is marked "queued" until its turn comes. Unless the
      // stream has shown it already: its events are newer than this answer (a queued
      // message can take its turn before the answer is read, and the answer's "queued"
      // would then stick).
      if (!messages.has(result.message.id)) upsertMessage(result.message);
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
    if (err instanceof TandemError && (err.code === "network_error" || err.status >= 500)) networkErrors.add(els.composerError);
  } finally {
    sending = false;
    els.composer.removeAttribute("aria-busy");
    els.send.disabled = !canWrite() || sessionGone || !sendable;
    if (!sessionGone && document.activeElement === document.body) els.input.focus();
  }
}

els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  sendMessage();
});

// On a touch screen Enter is a new line (a phone keyboard has no Shift+Enter) and the
// Send button sends; with a keyboard and mouse Enter sends and Shift+Enter is a new line.
const touchFirst = window.matchMedia("(pointer: coarse)");
function syncComposerHint() {
  const hint = document.getElementById("composer-hint");
  if (!hint || hint.classList.contains("viewer-note")) return;
  hint.textContent = touchFirst.matches
    ? "Enter starts a new line; tap Send to send."
    : "Enter sends, Shift+Enter starts a new line, Esc stops the reply.";
  els.composer.dataset.enter = touchFirst.matches ? "newline" : "send";
  // Phone widths hide the hint line: the box itself says it.
  els.input.placeholder = touchFirst.matches ? "Enter starts a new line; tap Send to send" : "";
}
touchFirst.addEventListener?.("change", syncComposerHint);
syncComposerHint();

els.input.addEventListener("keydown", (e) => {
  if (hintsKeydown(e)) return;
  if (e.key === "Enter" && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
    if (touchFirst.matches) return; // a new line
    e.preventDefault();
    sendMessage();
  }
});

/** The composer grows with its text, up to a third of the window, then scrolls. */
function fitComposer() {
  const box = els.input;
  box.style.height = "auto";
  const most = Math.max(80, Math.round(window.innerHeight * 0.33));
  box.style.height = `${Math.min(box.scrollHeight + 2, most)}px`;
}

// Hints for the agent's commands ("!calc …") while the message starts with "!".
const COMMANDS = (() => {
  try { return JSON.parse(document.getElementById("agent-commands")?.textContent || "[]"); } catch { return []; }
})();
let hintIndex = -1;
let hintItems = [];
function syncHints() {
  const value = els.input.value;
  const word = /^![^\s]*$/.test(value) ? value : null;
  // A command typed out in full needs no hint (and Enter then sends it).
  hintItems = word === null ? [] : COMMANDS.filter((c) => c.command.startsWith(word) && c.command !== word);
  els.hints.hidden = hintItems.length === 0;
  if (!hintItems.length) {
    hintIndex = -1;
    els.input.removeAttribute("aria-activedescendant");
    els.hints.replaceChildren();
    return;
  }
  if (hintIndex >= hintItems.length) hintIndex = hintItems.length - 1;
  if (hintIndex < 0) hintIndex = 0;
  els.hints.replaceChildren(...hintItems.map((c, i) => {
    const li = el("li", { role: "option", id: `command-hint-${i}`, "aria-selected": i === hintIndex ? "true" : "false" },
      el("code", { text: c.usage }), el("span", { class: "command-text", text: c.description }));
    li.addEventListener("mousedown", (e) => { e.preventDefault(); pickHint(i); });
    return li;
  }));
  els.input.setAttribute("aria-activedescendant", `command-hint-${hintIndex}`);
}
function pickHint(i) {
  const c = hintItems[i];
  if (!c) return;
  els.input.value = `${c.command}${c.usage.includes(" ") ? " " : ""}`;
  els.input.focus();
  els.input.setSelectionRange(els.input.value.length, els.input.value.length);
  hintItems = [];
  syncHints();
  els.input.dispatchEvent(new Event("input"));
}
function closeHints() {
  hintItems = [];
  els.hints.hidden = true;
  els.input.removeAttribute("aria-activedescendant");
}
function hintsKeydown(e) {
  if (els.hints.hidden || !hintItems.length) return false;
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    e.preventDefault();
    hintIndex = (hintIndex + (e.key === "ArrowDown" ? 1 : hintItems.length - 1)) % hintItems.length;
    syncHints();
    return true;
  }
  if (e.key === "Tab" || (e.key === "Enter" && !e.shiftKey && !e.isComposing)) {
    e.preventDefault();
    pickHint(hintIndex);
    return true;
  }
  if (e.key === "Escape") {
    e.preventDefault();
    e.stopPropagation();
    closeHints();
    return true;
  }
  return false;
}

// Esc stops the running reply (as "Abort reply"), unless it closes something first.
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape" || e.defaultPrevented || e.isComposing) return;
  if (els.abort.hidden || els.abort.disabled) return;
  e.preventDefault();
  abortReply();
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
  fitComposer();
  syncHints();
  if (els.composerError.textContent && !validate(els.input.value)) {
    showError(els.composerError, "");
    els.input.removeAttribute("aria-invalid");
  }
  setTyping(els.input.value.length > 0);
});
els.input.addEventListener("blur", () => { setTyping(false); closeHints(); });

els.sendNow?.addEventListener("click", () => sendMessage("interrupt"));

async function abortReply() {
  els.abort.disabled = true;
  try {
    const result = await api.post(`${base}/abort/`, {});
    notice(result?.aborted ? "Reply aborted." : "There was no reply to abort.");
  } catch (err) {
    notice(errorText(err, "Could not abort the reply."));
    els.abort.disabled = false;
  }
}
els.abort.addEventListener("click", abortReply);

// ------------------------------------------------------------------ permissions

// A request is answered on its tool card, inline: nothing is modal and nothing takes the
// focus, so someone typing keeps typing. Editors and the owner get Approve / Reject and
// a reason; viewers see the request and who answered it. The first answer wins (the
// server decides); a late one is told who answered first.
const pendingPermissions = new Map(); // id -> permission, oldest first
const approvals = new Map(); // permission id -> its approval block (kept across card re-renders)

function pendingForCall(callId) {
  if (!callId) return null;
  for (const perm of pendingPermissions.values()) if (perm.call_id === callId) return perm;
  return null;
}

// An outside agent's question (MCP request_approval): no reply and no tool card behind it.
function isQuestion(perm) {
  return perm?.message_id == null && perm?.tool === "approval" && typeof perm?.input?.question === "string";
}

function questionOf(perm) {
  return isQuestion(perm) ? perm.input.question : null;
}

function approvalBlock(perm) {
  let block = approvals.get(perm.id);
  if (block) return block;
  const write = canWrite();
  const expires = perm.expires_at ? new Date(perm.expires_at) : null;
  const until = expires && !Number.isNaN(expires.getTime())
    ? ` If nobody answers by ${expires.toLocaleTimeString()}, it counts as rejected.` : "";
  const asked = isQuestion(perm);
  const who = asked ? String(perm.input.asked_by || "Someone") : "";
  block = el("div", { class: "approval", role: "group", "data-permission-id": perm.id,
                      "aria-label": asked ? `Question from ${who}` : `Permission request: run ${perm.tool}` },
    el("p", { class: "approval-marker", text: write ? "Waiting for your approval" : "Waiting for an editor's approval" }));
  if (asked) {
    // The question is shown as text (textContent), never as Markdown or HTML.
    block.append(
      el("p", { class: "approval-asker", text: `${who} asks, through an outside agent:` }),
      el("p", { class: "approval-question", text: perm.input.question }));
    if (perm.input.details !== undefined && perm.input.details !== null) {
      block.append(el("pre", { class: "approval-details", text: pretty(perm.input.details) }));
    }
  }
  block.append(el("p", { class: "approval-note", text: (asked
    ? (write ? "You, or any editor, can answer; the first answer counts." : "You are a viewer: an editor or the owner will answer.")
    : write
      ? `The agent asks to run ${perm.tool} with the input above. You, or any editor, can answer; the first answer counts.`
      : `The agent asks to run ${perm.tool}. You are a viewer: an editor or the owner will answer.`) + until }));
  if (write) {
    const reason = el("input", { type: "text", class: "approval-reason", maxLength: 2000, autocomplete: "off" });
    const approve = el("button", { type: "button", class: "primary approve-button", text: "Approve" });
    const reject = el("button", { type: "button", class: "danger reject-button", text: "Reject" });
    approve.setAttribute("aria-label", asked ? `Approve the question from ${who}` : `Approve running ${perm.tool}`);
    reject.setAttribute("aria-label", asked ? `Reject the question from ${who}` : `Reject running ${perm.tool}`);
    approve.addEventListener("click", () => answerPermission(perm.id, true));
    reject.addEventListener("click", () => answerPermission(perm.id, false));
    // Enter in the reason field must not approve by accident: it does nothing there.
    reason.addEventListener("keydown", (e) => { if (e.key === "Enter") e.preventDefault(); });
    block.append(el("div", { class: "approval-answer" },
      el("label", {}, "Reason (optional)", reason), reject, approve));
  }
  block.append(el("p", { class: "error approval-error", role: "alert", hidden: true }));
  approvals.set(perm.id, block);
  return block;
}

function placeApprovals() {
  // Each pending request sits on its tool card; one whose card is not shown (older
  // history not loaded) sits in the banner.
  const elsewhere = [];
  for (const perm of pendingPermissions.values()) {
    const block = approvalBlock(perm);
    const card = perm.call_id ? toolCards.get(perm.call_id) : null;
    const slot = card?.slot?.isConnected ? card.slot : null;
    if (slot) {
      if (block.parentElement !== slot) slot.replaceChildren(block);
      card.el.classList.add("awaiting");
    } else {
      elsewhere.push(block);
    }
  }
  const box = $("pending-elsewhere");
  for (const child of [...box.children]) if (!elsewhere.includes(child)) child.remove();
  for (const block of elsewhere) if (block.parentElement !== box) box.append(block);
  for (const [id, block] of approvals) {
    if (pendingPermissions.has(id)) continue;
    const hadFocus = block.contains(document.activeElement);
    const card = block.closest(".tool-card");
    block.remove();
    approvals.delete(id);
    card?.classList.remove("awaiting");
    if (hadFocus && !els.input.disabled) els.input.focus({ preventScroll: true });
  }
}

function syncPermissionUi() {
  const waiting = [...pendingPermissions.values()];
  els.pending.hidden = waiting.length === 0;
  if (waiting.length) {
    const tools = waiting.map((p) => (isQuestion(p) ? "a question" : p.tool));
    $("pending-marker").textContent = canWrite() ? "Waiting for your approval." : "Waiting for an editor's approval.";
    els.pendingSummary.textContent = waiting.length === 1
      ? (isQuestion(waiting[0])
        ? `${waiting[0].input.asked_by || "Someone"} asks a question through an outside agent.`
        : `The agent asks to run ${tools[0]}.`)
      : `${waiting.length} requests: ${tools.join(", ")}.`;
    els.review.textContent = waiting.length === 1 ? "Show request" : "Show first request";
  }
  placeApprovals();
  syncNotificationsControl();
  syncTitle();
}

els.review.addEventListener("click", () => {
  const first = pendingPermissions.values().next().value;
  const block = first && approvals.get(first.id);
  if (!block) return;
  stuck = false;
  block.scrollIntoView({ block: "center" });
  // Asked for: now the focus may go there.
  (block.querySelector(".approve-button") || block).focus?.({ preventScroll: true });
  if (!block.querySelector(".approve-button")) {
    block.tabIndex = -1;
    block.focus({ preventScroll: true });
  }
});

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

function showResolution(perm, text) {
  // The card keeps who answered, after the approval block goes.
  const card = perm?.call_id ? toolCards.get(perm.call_id) : null;
  if (card) {
    card.resolution = text;
    renderTool(card);
  }
}

async function answerPermission(id, approved) {
  const perm = pendingPermissions.get(id);
  const block = approvals.get(id);
  if (!perm || !block) return;
  const reason = block.querySelector(".approval-reason")?.value.trim() || "";
  const buttons = block.querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  block.setAttribute("aria-busy", "true");
  showError(block.querySelector(".approval-error"), "");
  const settle = (text) => {
    pendingPermissions.delete(id);
    showResolution(perm, text);
    notice(text);
    syncPermissionUi();
  };
  try {
    const result = await api.post(`${base}/permissions/${encodeURIComponent(id)}/`,
      reason ? { approved, reason } : { approved });
    pageHeardFromServer();
    settle(resolvedText(perm.tool, result?.approved ?? approved, ME, reason, questionOf(perm)));
  } catch (err) {
    if (err instanceof TandemError && (err.code === "already_resolved" || err.status === 409)) {
      const current = err.details?.permission || {};
      settle(current.status === "expired"
        ? `The request to run ${perm.tool} had already expired.`
        : `Already answered: ${resolvedText(perm.tool, current.approved, current.resolved_by, current.reason, questionOf(perm))}`);
    } else if (err instanceof TandemError && err.status === 404) {
      settle("That permission request no longer exists.");
    } else {
      buttons.forEach((b) => { b.disabled = false; });
      block.removeAttribute("aria-busy");
      showError(block.querySelector(".approval-error"), errorText(err, "Your answer was not sent. Try again."));
      if (err instanceof TandemError && err.code === "network_error") networkErrors.add(block.querySelector(".approval-error"));
    }
  }
}

function permissionResolved(props) {
  const perm = pendingPermissions.get(props.permission_id);
  pendingPermissions.delete(props.permission_id);
  const tool = perm?.tool || "the tool";
  // A request closed because its reply ended (an abort, a failure) was never answered:
  // the server ends the tool first, so its card has already ended when this arrives.
  // "You rejected running calculator" would be wrong; say what happened.
  const card = perm?.call_id ? toolCards.get(perm.call_id) : null;
  const cardEnded = card && ["error", "completed"].includes(card.state?.status);
  let text;
  if (props.resolved_by !== "timeout" && props.approved === false && cardEnded) {
    text = `The request to run ${tool} was cancelled: the reply was stopped.`;
  } else {
    text = resolvedText(tool, props.approved, props.resolved_by, props.reason, questionOf(perm));
  }
  if (perm) {
    showResolution(perm, text);
    notice(text);
    announce(text);
  }
  syncPermissionUi();
}

function permissionRequested(perm) {
  const known = pendingPermissions.has(perm.id);
  pendingPermissions.set(perm.id, perm);
  syncPermissionUi();
  if (known) return;
  const text = canWrite()
    ? `The agent asks permission to run ${perm.tool}. It waits for your approval.`
    : `The agent asks permission to run ${perm.tool}.`;
  announce(text);
  if (canWrite()) attention({ approval: true, title: "Approval needed", body: text, tag: perm.id });
}

// ------------------------------------------------------------------ attention

// While the tab is hidden: a count in its title (new messages and requests waiting for
// you), and for requests a browser notification once the reader allowed them. Permission
// to notify is asked only when they press "Enable notifications", never on load.
let unseen = 0;
const baseTitle = () => `${els.title.textContent || SID} · Tandem`;
function pageHidden() {
  return document.visibilityState === "hidden";
}
function syncTitle() {
  const waiting = canWrite() ? pendingPermissions.size : 0;
  const count = pageHidden() ? unseen : 0;
  const marks = [];
  if (count) marks.push(`(${count})`);
  if (waiting && pageHidden()) marks.push("⏳");
  const title = `${marks.length ? marks.join(" ") + " " : ""}${baseTitle()}`;
  if (document.title !== title) document.title = title;
}
function attention({ approval = false, title = "", body = "", tag = "" } = {}) {
  if (!pageHidden()) return;
  unseen += 1;
  syncTitle();
  if (approval && notificationsAllowed()) {
    try {
      const n = new Notification(`${title} · ${els.title.textContent || "Tandem"}`, { body, tag });
      n.onclick = () => { window.focus(); n.close(); };
    } catch {
      /* some browsers allow notifications only from a service worker */
    }
  }
}
document.addEventListener("visibilitychange", () => {
  if (!pageHidden()) unseen = 0;
  syncTitle();
});

function notificationsSupported() {
  return typeof window.Notification === "function";
}
function notificationsAllowed() {
  return notificationsSupported() && Notification.permission === "granted";
}
const enableNotifications = $("enable-notifications");
function syncNotificationsControl() {
  enableNotifications.hidden = !(canWrite() && notificationsSupported() && Notification.permission === "default");
}
enableNotifications.addEventListener("click", async () => {
  try {
    const answer = await Notification.requestPermission();
    notice(answer === "granted"
      ? "Notifications are on: you will hear of approval requests while this tab is in the background."
      : "Notifications stay off. The tab title still counts what waits for you.");
  } catch {
    notice("This browser did not allow notifications.");
  }
  syncNotificationsControl();
});

// Screen readers hear new messages once, politely; the history loaded on opening is not
// read out.
const announcer = $("announcer");
function announce(text) {
  if (!text) return;
  const line = el("p", { text: text.length > 300 ? `${text.slice(0, 300)}…` : text });
  announcer.append(line);
  while (announcer.children.length > 3) announcer.firstElementChild.remove();
}

// Errors that say the network failed are cleared as soon as the page hears from the
// server again.
const networkErrors = new Set();
function pageHeardFromServer() {
  for (const node of networkErrors) showError(node, "");
  networkErrors.clear();
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
    clearStaleInviteError();
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
    clearStaleInviteError();
    notice(`${username} was removed from this session.`);
    $("invite-username")?.focus();
  } catch (err) {
    button.disabled = false;
    showError(els.membersError, errorText(err, `Could not remove ${username}.`));
  }
}

// The invite form's error names a person and a fact ("grace is already a member.", "There is
// no user called …"): it goes when the fact may have changed, that is when the name is
// edited or the members change, instead of staying on screen after it stopped being true.
let inviteError = null; // {username, kind: "member" | "unknown" | "other"}
function setInviteError(message, username = "", kind = "other") {
  inviteError = message ? { username, kind } : null;
  showError($("invite-error"), message);
}
function clearStaleInviteError() {
  if (!inviteError) return;
  const isMember = members.some((m) => m.user.username === inviteError.username);
  if ((inviteError.kind === "member" && !isMember) || (inviteError.kind === "unknown" && isMember)) setInviteError("");
}
$("invite-username")?.addEventListener("input", () => { if (inviteError) setInviteError(""); });

if (els.invite) {
  els.invite.addEventListener("submit", async (e) => {
    e.preventDefault();
    const username = $("invite-username").value.trim();
    const inviteRole = $("invite-role").value;
    if (!username) {
      setInviteError("Enter the username of the person to invite.");
      $("invite-username").focus();
      return;
    }
    setInviteError("");
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
      let kind = "other";
      if (err instanceof TandemError && err.status === 409) { message = `${username} is already a member.`; kind = "member"; }
      else if (err instanceof TandemError && err.code === "validation_error" && err.details?.username) {
        message = `There is no user called “${username}”.`;
        kind = "unknown";
      }
      setInviteError(message, username, kind);
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
  fitComposer();
  syncNotificationsControl();
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
  connect(snap.low);
  // A link to an older message (#m-…) loads pages back until it is there.
  for (let pages = 0; /^#m-/.test(location.hash) && !showLinkedMessage() && olderUrl && pages < 25; pages += 1) {
    if (!(await loadOlder())) break;
  }
  if (!showLinkedMessage()) {
    scrollToEnd();
    // Ready to write; not on a touch screen, where focus would pop the keyboard up.
    if (canWrite() && !sessionGone && !touchFirst.matches && document.activeElement === document.body) {
      els.input.focus({ preventScroll: true });
    }
  }
  loadMembers();
  refreshPresence();
}

window.addEventListener("pagehide", () => {
  setTyping(false);
  try { sub?.close(); } catch { /* closed */ }
});

start();
