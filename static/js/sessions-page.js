// The sessions list at "/": the caller's sessions over REST, kept current from the
// user-level stream (session.* and member.* events), with create, rename and delete.
import { Tandem, TandemError, markSnippet } from "/static/js/tandem.js";
import { el, showError, errorText } from "/static/js/dom.js";
import { SEEN_KEY, markSeen, readSeen, unreadOnLoad } from "/static/js/seen.js";

const app = document.getElementById("sessions-app");
const me = { id: Number(app.dataset.userId), username: app.dataset.username };

const api = new Tandem({
  // One live stream per browser: this user's tabs share one connection (docs/CLIENT.md).
  shareTabs: `user-${me.id}`,
  onAuthLost: () => location.assign("/accounts/login/?next=" + encodeURIComponent(location.pathname)),
});

const $ = (id) => document.getElementById(id);
const list = $("session-list");
const sessions = new Map(); // id -> session (with role)

const STATUS_TEXT = { idle: "idle", busy: "busy", retry: "retrying" };
const CONNECTION_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  polling: "Live (polling)",
  offline: "Offline",
  closed: "Disconnected",
};

function announce(message) {
  const notice = $("list-notice");
  notice.textContent = "";
  // A fresh text node each time so screen readers repeat identical messages.
  requestAnimationFrame(() => { notice.textContent = message; });
}

function titleOf(session) {
  return session.title || "Untitled session";
}

function timeAgo(iso) {
  if (!iso) return "";
  const then = new Date(iso);
  if (Number.isNaN(then.getTime())) return "";
  const seconds = Math.round((Date.now() - then.getTime()) / 1000);
  if (seconds < 45) return "just now";
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.round(minutes / 60);
  if (hours < 24) return `${hours} h ago`;
  return then.toLocaleDateString();
}

// ------------------------------------------------------------------ rendering

function renderItem(session) {
  const statusType = session.status?.type || "idle";
  const isOwner = session.role === "owner";
  const headingId = `title-${session.id}`;
  const item = el("li", { class: "session-item", "data-session-id": session.id, "data-role": session.role || "" });

  const main = el("div", { class: "session-main" },
    el("h3", { class: "session-title", id: headingId },
      el("a", { href: `/s/${encodeURIComponent(session.id)}/`, text: titleOf(session) })),
    el("p", { class: "session-meta" },
      el("span", { class: "badge", "data-status": statusType, "data-testid": "status-badge",
                   title: session.status?.message || "" , text: STATUS_TEXT[statusType] || statusType }),
      el("span", { class: "meta-item", text: `agent ${session.agent}` }),
      el("span", { class: "meta-item", text: isOwner ? "owner" : `${session.role || "member"} · by ${session.owner?.username || "?"}` }),
      el("span", { class: "meta-item updated", text: timeAgo(session.active_at || session.updated_at) }),
      session.unread ? el("span", { class: "unread-marker", "data-testid": "unread", text: "new" },
        el("span", { class: "visually-hidden", text: " messages" })) : null));
  item.dataset.unread = session.unread ? "true" : "false";
  item.append(main);

  if (isOwner) {
    const renameForm = el("form", { class: "rename-form", hidden: true, novalidate: true });
    const inputId = `rename-${session.id}`;
    const input = el("input", { id: inputId, name: "title", type: "text", maxLength: 200, value: session.title || "", autocomplete: "off" });
    const err = el("p", { class: "error", role: "alert", hidden: true });
    const cancel = el("button", { type: "button", class: "secondary", text: "Cancel" });
    renameForm.append(
      el("label", { htmlFor: inputId, text: `New title for “${titleOf(session)}”` }),
      el("div", { class: "inline-fields" }, input, el("button", { type: "submit", class: "primary", text: "Save" }), cancel),
      err);

    const renameBtn = el("button", { type: "button", class: "secondary small", text: "Rename", "aria-describedby": headingId });
    const deleteBtn = el("button", { type: "button", class: "danger small", text: "Delete", "aria-describedby": headingId });
    const actions = el("div", { class: "session-actions" }, renameBtn, deleteBtn);

    renameBtn.addEventListener("click", () => {
      renameForm.hidden = false;
      actions.hidden = true;
      input.value = sessions.get(session.id)?.title || "";
      input.focus();
      input.select();
    });
    const closeRename = () => {
      renameForm.hidden = true;
      actions.hidden = false;
      showError(err, "");
      renameBtn.focus();
    };
    cancel.addEventListener("click", closeRename);
    input.addEventListener("keydown", (e) => { if (e.key === "Escape") { e.preventDefault(); closeRename(); } });
    renameForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      const title = input.value.trim();
      if (!title) { showError(err, "Give the session a title."); input.focus(); return; }
      try {
        const updated = await api.patch(`/api/sessions/${encodeURIComponent(session.id)}/`, { title });
        renameForm.hidden = true;
        actions.hidden = false;
        upsert({ ...sessions.get(session.id), ...updated });
        announce(`Renamed to ${title}.`);
        const fresh = list.querySelector(`[data-session-id="${CSS.escape(session.id)}"] .session-actions button`);
        if (fresh) fresh.focus();
      } catch (ex) {
        showError(err, errorText(ex, "Could not rename the session."));
      }
    });
    deleteBtn.addEventListener("click", () => confirmDelete(session.id, deleteBtn));
    item.append(actions, renameForm);
  }
  return item;
}

function upsert(session, { top = false } = {}) {
  const previous = sessions.get(session.id);
  const merged = { ...(previous || {}), ...session };
  if (!merged.role) merged.role = merged.owner?.id === me.id ? "owner" : previous?.role;
  sessions.set(session.id, merged);
  const existing = list.querySelector(`[data-session-id="${CSS.escape(session.id)}"]`);
  if (existing) {
    // Keep an open rename form (and its focus) alone; update the rest in place.
    const renameOpen = existing.querySelector(".rename-form:not([hidden])");
    if (renameOpen) {
      existing.querySelector(".session-title a").textContent = titleOf(merged);
      updateBadge(existing, merged.status);
    } else {
      const hadFocus = existing.contains(document.activeElement);
      const focusedText = hadFocus ? document.activeElement.textContent : null;
      const fresh = renderItem(merged);
      existing.replaceWith(fresh);
      if (hadFocus) {
        const target = [...fresh.querySelectorAll("a, button")].find((n) => n.textContent === focusedText);
        (target || fresh.querySelector("a")).focus();
      }
    }
  } else if (top) {
    list.prepend(renderItem(merged));
  } else {
    list.append(renderItem(merged));
  }
  refreshEmpty();
}

function updateBadge(item, status) {
  const badge = item.querySelector(".badge");
  const type = status?.type || "idle";
  badge.dataset.status = type;
  badge.textContent = STATUS_TEXT[type] || type;
  badge.title = status?.message || "";
}

function setStatus(sessionId, status) {
  const session = sessions.get(sessionId);
  if (!session) return;
  session.status = status;
  const item = list.querySelector(`[data-session-id="${CSS.escape(sessionId)}"]`);
  if (item) updateBadge(item, status);
}

function removeSession(sessionId, why) {
  const session = sessions.get(sessionId);
  sessions.delete(sessionId);
  const item = list.querySelector(`[data-session-id="${CSS.escape(sessionId)}"]`);
  if (item) {
    const hadFocus = item.contains(document.activeElement);
    const next = item.nextElementSibling || item.previousElementSibling;
    item.remove();
    if (hadFocus) (next?.querySelector("a") || $("new-title")).focus();
  }
  if (session && why) announce(`${titleOf(session)}: ${why}`);
  refreshEmpty();
}

function refreshEmpty() {
  $("list-empty").hidden = sessions.size > 0 || !$("list-loading").hidden;
}

// ------------------------------------------------------------------ delete

let deleteTarget = null;
let deleteReturnFocus = null;
const deleteDialog = $("delete-dialog");

function confirmDelete(sessionId, returnFocus) {
  deleteTarget = sessionId;
  deleteReturnFocus = returnFocus;
  $("delete-title").textContent = titleOf(sessions.get(sessionId) || {});
  deleteDialog.returnValue = "";
  deleteDialog.showModal();
  $("delete-cancel").focus();
}

deleteDialog.addEventListener("close", async () => {
  const target = deleteTarget;
  deleteTarget = null;
  if (deleteDialog.returnValue !== "delete" || !target) {
    if (deleteReturnFocus?.isConnected) deleteReturnFocus.focus();
    return;
  }
  try {
    await api.del(`/api/sessions/${encodeURIComponent(target)}/`);
    removeSession(target, "deleted.");
  } catch (ex) {
    if (ex instanceof TandemError && ex.status === 404) removeSession(target, "already gone.");
    else {
      showError($("list-error"), errorText(ex, "Could not delete the session."));
      if (deleteReturnFocus?.isConnected) deleteReturnFocus.focus();
    }
  }
});

// ------------------------------------------------------------------ create

$("create-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = e.currentTarget;
  const button = form.querySelector("button[type=submit]");
  const title = $("new-title").value.trim();
  const agent = $("new-agent").value;
  showError($("create-error"), "");
  button.disabled = true;
  try {
    const session = await api.post("/api/sessions/", title ? { title, agent } : { agent });
    upsert(session, { top: true });
    $("new-title").value = "";
    announce(`Created ${titleOf(session)}.`);
    // A new session is made to be used: open it.
    location.assign(`/s/${encodeURIComponent(session.id)}/`);
  } catch (ex) {
    showError($("create-error"), errorText(ex, "Could not create the session."));
  } finally {
    button.disabled = false;
  }
});

// ------------------------------------------------------------------ loading and live updates

async function reload() {
  try {
    const all = await api.getAll("/api/sessions/");
    const seen = new Set(all.map((s) => s.id));
    for (const id of [...sessions.keys()]) if (!seen.has(id)) removeSession(id);
    // Rebuild in server order (newest activity first).
    for (const session of all) upsert({ ...session, unread: sessions.get(session.id)?.unread || unreadOnLoad(session) });
    for (const session of all) {
      const item = list.querySelector(`[data-session-id="${CSS.escape(session.id)}"]`);
      if (item) list.append(item);
    }
    showError($("list-error"), "");
  } catch (ex) {
    showError($("list-error"), errorText(ex, "Could not load your sessions."));
  } finally {
    $("list-loading").hidden = true;
    refreshEmpty();
  }
}

async function fetchOne(sessionId) {
  try {
    const session = await api.get(`/api/sessions/${encodeURIComponent(sessionId)}/`);
    upsert(session, { top: true });
  } catch {
    /* not visible to us (yet): ignore */
  }
}

/** The list is in order of activity, newest first, as the server lists it (every persisted
 * event is activity): a session with a new event moves to the top, live. */
function bump(sessionId, time, seq) {
  const session = sessions.get(sessionId);
  const item = list.querySelector(`[data-session-id="${CSS.escape(sessionId)}"]`);
  if (!session || !item) return;
  if (time) session.active_at = time;
  if (typeof seq === "number") session.last_seq = Math.max(session.last_seq || 0, seq);
  const updated = item.querySelector(".updated");
  if (updated) updated.textContent = timeAgo(session.active_at || session.updated_at);
  if (list.firstElementChild === item) return;
  // Moving a node blurs it: give the focus back, so a keyboard user is not thrown out.
  const focused = item.contains(document.activeElement) ? document.activeElement : null;
  list.prepend(item);
  focused?.focus();
}

function onEvent(event) {
  const props = event.properties || {};
  const sid = event.session_id || props.session_id || props.session?.id;
  if (typeof event.seq === "number" && sid && event.type !== "session.deleted") {
    // After the event's own handling below (which may add the session), not before.
    queueMicrotask(() => bump(sid, event.time, event.seq));
  }
  switch (event.type) {
    case "session.created": {
      if (!props.session) break;
      if (!sessions.has(props.session.id)) {
        const role = props.session.owner?.id === me.id ? "owner" : undefined;
        if (role) upsert({ ...props.session, role }, { top: true });
        else fetchOne(props.session.id);
      }
      break;
    }
    case "session.updated":
      if (props.session && sessions.has(props.session.id)) upsert(props.session);
      break;
    case "session.status":
      if (sid) {
        if (sessions.has(sid)) setStatus(sid, props.status);
        else fetchOne(sid);
      }
      break;
    case "session.deleted":
      if (sid && sessions.has(sid)) removeSession(sid, "deleted.");
      break;
    case "member.added":
      if (props.user?.id === me.id && sid && !sessions.has(sid)) fetchOne(sid);
      else if (props.user?.id === me.id && sid) upsert({ ...sessions.get(sid), role: props.role });
      break;
    case "member.removed":
      if (props.user?.id === me.id && sid) removeSession(sid, "you were removed.");
      break;
    case "message.created":
      // Someone else's message, or a reply: news (the sidebar's rule, static/js/sidebar.js).
      if (sid && sessions.has(sid) && props.message?.author?.id !== me.id && !sessions.get(sid).unread) {
        upsert({ ...sessions.get(sid), unread: true });
      }
      break;
    default:
      break;
  }
  // Nothing new to read came: the session is seen up to here (as the sidebar does).
  const seenNow = sid && sessions.get(sid);
  if (seenNow && !seenNow.unread && typeof event.seq === "number") markSeen(sid, event.seq);
}

// A session opened in another tab is read here too.
window.addEventListener("storage", (e) => {
  if (e.key !== SEEN_KEY) return;
  const seen = readSeen();
  for (const session of sessions.values()) {
    if (session.unread && (seen[session.id] ?? -1) >= session.last_seq) upsert({ ...session, unread: false });
  }
});

// Why we are not connected, when the client says (StatusInfo.reason).
const REASON_TEXT = {
  server_unreachable: "Server unreachable · reconnecting…",
  poll_failed: "Server not answering · reconnecting…",
};

function setConnection(status, info = {}) {
  const node = $("list-connection");
  node.dataset.state = status;
  node.dataset.reason = info.reason || "";
  node.dataset.tab = info.shared ? (info.leader ? "leader" : "follower") : "";
  const text = (status === "reconnecting" && REASON_TEXT[info.reason]) || CONNECTION_TEXT[status] || status;
  node.querySelector(".connection-text").textContent = text;
  node.title = info.error?.message ? `${text} (${info.error.message})` : "";
  // Reconnecting on its own may take a while (it waits for the server): offer it now.
  $("reconnect-now").hidden = !(status === "reconnecting" || status === "offline");
}

// Subscribe first and hold events until the list is loaded, then apply them in order:
// nothing that happens while the list loads is lost, and nothing older wins.
let buffered = [];
const sub = api.subscribe(null, {
  // The sidebar's types too, so the list and the session pages' sidebars share one stream.
  types: "session.*,member.*,message.created,permission.*",
  onEvent: (event) => (buffered ? buffered.push(event) : onEvent(event)),
  onStatus: (status, info) => setConnection(status, info),
  onReset: () => reload(),
});
$("reconnect-now").addEventListener("click", () => sub.reconnect());
await reload();
const pending = buffered;
buffered = null;
for (const event of pending) onEvent(event);
window.addEventListener("pagehide", () => sub.close());
// Keep the "updated" times fresh.
setInterval(() => {
  for (const item of list.querySelectorAll(".session-item")) {
    const session = sessions.get(item.dataset.sessionId);
    const node = item.querySelector(".updated");
    if (session && node) node.textContent = timeAgo(session.active_at || session.updated_at);
  }
}, 30_000);

// ------------------------------------------------------------------ search

const search = {
  form: $("search-form"), input: $("search-input"), results: $("search-results"),
  status: $("search-status"), error: $("search-error"), more: $("search-more"), clear: $("search-clear"),
  next: null, query: "",
};

function hitHref(hit) {
  const page = `/s/${encodeURIComponent(hit.session.id)}/`;
  return hit.message_id ? `${page}#m-${encodeURIComponent(hit.message_id)}` : page;
}

function renderHit(hit) {
  const link = el("a", { class: "search-hit-link", href: hitHref(hit) },
    el("span", { class: "search-hit-title", text: hit.session.title || "Untitled session" }),
    el("span", { class: "search-hit-kind muted", text: hit.message_id ? ` · message, ${timeAgo(hit.created_at)}` : " · title" }));
  const snippet = el("p", { class: "search-snippet" });
  snippet.append(markSnippet(hit.snippet, hit.highlights));
  return el("li", { class: "search-hit", "data-session-id": hit.session.id, "data-message-id": hit.message_id || "" },
    link, snippet);
}

async function runSearch({ more = false } = {}) {
  const q = more ? search.query : search.input.value;
  showError(search.error, "");
  if (!more) {
    if (!q.trim()) { showError(search.error, "Type something to search for."); search.input.focus(); return; }
    if (q.length > 200) { showError(search.error, "Search for at most 200 characters."); return; }
    search.query = q;
    search.results.replaceChildren();
  }
  search.status.textContent = "Searching…";
  try {
    const page = await api.search(q, { next: more ? search.next : null });
    for (const hit of page.results) search.results.append(renderHit(hit));
    search.next = page.next;
    const count = search.results.children.length;
    search.status.textContent = count ? `${count}${page.next ? "+" : ""} result${count === 1 ? "" : "s"} for “${q}”` : `Nothing found for “${q}”.`;
  } catch (err) {
    search.status.textContent = "";
    showError(search.error, errorText(err, "Search failed. Try again."));
  }
  search.results.hidden = search.results.children.length === 0;
  search.more.hidden = !search.next;
  search.clear.hidden = false;
}

search.form.addEventListener("submit", (e) => {
  e.preventDefault();
  // The query goes in the URL, so Back from a hit returns to the same results.
  history.replaceState(null, "", search.input.value.trim() ? `?q=${encodeURIComponent(search.input.value)}` : location.pathname);
  runSearch();
});
search.more.addEventListener("click", () => runSearch({ more: true }));
search.clear.addEventListener("click", () => {
  search.input.value = "";
  search.results.replaceChildren();
  search.results.hidden = true;
  search.more.hidden = true;
  search.clear.hidden = true;
  search.status.textContent = "";
  showError(search.error, "");
  history.replaceState(null, "", location.pathname);
  search.input.focus();
});

// "/?q=…": a search submitted before this script ran (the form's plain GET), a Back, or a link.
const initialQuery = new URLSearchParams(location.search).get("q");
if (initialQuery) {
  search.input.value = initialQuery;
  runSearch();
}
