// The session's shared document (PROTOCOL §10) beside the conversation: CodeMirror 6 bound
// to the Yjs Y.Text "doc" by y-codemirror.next, synced through the stock y-websocket
// WebsocketProvider on /ws/sessions/{id}/doc/. Remote cursors and selections carry each
// person's name and colour (Yjs awareness); viewers get a read-only editor; a button swaps
// the editor for the rendered Markdown. The libraries come from /static/vendor/collab/
// (scripts/build-collab.sh builds them from npm). On phones the panel is a tab.
import {
  EditorView, basicSetup, EditorState, Compartment, Transaction, markdown,
  HighlightStyle, syntaxHighlighting, tags, Y, yCollab, WebsocketProvider, Awareness,
} from "/static/vendor/collab/collab.js";
import { Tandem, TandemError } from "/static/js/tandem.js";
import { el } from "/static/js/dom.js";
import { renderInto } from "/static/js/markdown.js";

const app = document.getElementById("session-app");
const mount = document.getElementById("doc-panel");

// The same palette and hash as the page's avatars, so a person's cursor has their avatar's colour.
const COLOURS = ["#1f5fa8", "#8a3ab9", "#0f7b5f", "#b3421b", "#5b5bd6", "#a3305e", "#2f6f3e", "#8a5a00"];
function colourFor(name) {
  let h = 0;
  for (const ch of name || "?") h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return COLOURS[h % COLOURS.length];
}

const CONNECTION_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline: your edits are kept here and sent when you are back",
  closed: "Disconnected",
};

// Close codes (PROTOCOL §6, §10) after which reconnecting as we are cannot help.
const CLOSE_NOT_AUTHENTICATED = 4401;
const CLOSE_FORBIDDEN = 4403;
const CLOSE_NOT_FOUND = 4404;
const CLOSE_TOO_MANY = 4429;
const CLOSE_TOO_BIG = [1009, 4009];

const KEEPALIVE_MS = 10_000;
const QUERY_AWARENESS = new Uint8Array([3]);

const MAX_NAME = 64;
const HEX_COLOUR = /^#[0-9a-fA-F]{6}$/;

// Markdown colours from the page's custom properties, so the editor follows the theme
// (light or dark) instead of CodeMirror's fixed light palette.
const markdownStyle = HighlightStyle.define([
  { tag: tags.heading1, fontWeight: "700", fontSize: "1.25em" },
  { tag: tags.heading2, fontWeight: "700", fontSize: "1.12em" },
  { tag: [tags.heading3, tags.heading4, tags.heading5, tags.heading6], fontWeight: "700" },
  { tag: tags.strong, fontWeight: "700" },
  { tag: tags.emphasis, fontStyle: "italic" },
  { tag: tags.strikethrough, textDecoration: "line-through" },
  { tag: [tags.link, tags.url], color: "var(--accent)", textDecoration: "underline" },
  { tag: tags.monospace, fontFamily: "var(--mono)", color: "var(--accent-strong)" },
  { tag: tags.quote, color: "var(--muted)", fontStyle: "italic" },
  { tag: [tags.processingInstruction, tags.meta, tags.contentSeparator], color: "var(--muted)" },
]);

const themeFromPage = EditorView.theme({
  "&": { color: "var(--text)", backgroundColor: "var(--surface)", height: "100%" },
  ".cm-content": { fontFamily: "var(--mono)", caretColor: "var(--text)" },
  ".cm-cursor, .cm-dropCursor": { borderLeftColor: "var(--text)" },
  ".cm-gutters": { backgroundColor: "var(--surface-2)", color: "var(--muted)", borderRight: "1px solid var(--border)" },
  ".cm-activeLine": { backgroundColor: "color-mix(in srgb, var(--accent-soft) 45%, transparent)" },
  ".cm-activeLineGutter": { backgroundColor: "var(--accent-soft)" },
  "&.cm-focused .cm-selectionBackground, .cm-selectionBackground, ::selection": {
    backgroundColor: "color-mix(in srgb, var(--accent) 28%, transparent)",
  },
  ".cm-ySelectionInfo": { fontFamily: "var(--font)", opacity: "1" },
});

class DocPanel {
  constructor() {
    this.sid = app.dataset.sessionId;
    this.me = { id: Number(app.dataset.userId), username: app.dataset.username || "?" };
    this.role = app.dataset.role;
    this.api = new Tandem({
      onAuthLost: () => location.assign("/accounts/login/?next=" + encodeURIComponent(location.pathname)),
    });
    this.ended = false;
    this.attempts = 0; // failed connections in a row: the reconnect backoff
    this.retryTimer = null;
    this.previewOn = false;
    this.previewPending = false;
    this.readOnly = new Compartment();
    this.maxChars = Number(mount.dataset.maxChars) || Infinity;
    this.build();
    this.open();
    this.watchPage();
  }

  canWrite() {
    return this.role === "owner" || this.role === "editor";
  }

  // ---------------------------------------------------------------- the panel's DOM

  build() {
    this.status = el("p", { id: "doc-connection", class: "connection doc-connection", "data-state": "connecting", role: "status", "aria-live": "polite" },
      el("span", { class: "dot", "aria-hidden": "true" }), el("span", { class: "connection-text", text: CONNECTION_TEXT.connecting }));
    this.readOnlyBadge = el("span", { id: "doc-readonly", class: "doc-readonly", text: "Read only", hidden: true });
    this.previewButton = el("button", { type: "button", id: "doc-preview-toggle", class: "secondary small", "aria-pressed": "false", "aria-controls": "doc-preview", text: "Preview", onclick: () => this.setPreview(!this.previewOn) });
    this.people = el("ul", { id: "doc-people", class: "doc-people", "aria-label": "In the document now" });
    this.notice = el("p", { id: "doc-notice", class: "doc-notice", role: "alert", hidden: true });
    this.viewerNote = el("p", { id: "doc-viewer-note", class: "hint doc-viewer-note", hidden: true, text: "You are a viewer: you follow the document live, but only editors and the owner can change it." });
    this.editorHost = el("div", { id: "doc-editor", class: "doc-editor", "aria-label": "Shared document (Markdown)" });
    this.preview = el("div", { id: "doc-preview", class: "doc-preview markdown", hidden: true, tabindex: "0", "aria-label": "Shared document, rendered" });
    mount.replaceChildren(
      el("div", { class: "doc-head" },
        el("h2", { id: "doc-heading", text: "Document" }),
        this.readOnlyBadge,
        el("span", { class: "doc-head-spacer" }),
        this.status,
        this.previewButton),
      this.people,
      this.viewerNote,
      this.notice,
      el("div", { class: "doc-body" }, this.editorHost, this.preview),
    );
    mount.setAttribute("aria-labelledby", "doc-heading");
    this.buildTabs();
  }

  // Phones (and narrow windows): the conversation and the document share one column, with
  // a tab for each. Wide screens show both and CSS hides the tabs.
  buildTabs() {
    const layout = mount.closest(".session-layout");
    const conversation = layout?.querySelector(".conversation");
    if (!layout || !conversation) return;
    if (!conversation.id) conversation.id = "conversation";
    const tab = (view, label, controls) => el("button", {
      type: "button", role: "tab", id: `tab-${view}`, class: "doc-tab", "aria-controls": controls, text: label,
      onclick: () => this.showView(view), onkeydown: (event) => {
        if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
          const next = view === "doc" ? "conversation" : "doc";
          this.showView(next);
          document.getElementById(`tab-${next}`)?.focus();
        }
      },
    });
    this.tabs = el("div", { class: "doc-tabs", role: "tablist", "aria-label": "Show" },
      tab("conversation", "Conversation", conversation.id), tab("doc", "Document", mount.id));
    layout.before(this.tabs);
    this.layout = layout;
    // Tab panels only while the tabs show (CSS hides them on wide screens).
    const narrow = window.matchMedia("(max-width: 1100px)");
    const panels = [[conversation, "tab-conversation"], [mount, "tab-doc"]];
    const labels = new Map(panels.map(([panel]) => [panel, panel.getAttribute("aria-labelledby")]));
    const applyRoles = () => {
      for (const [panel, tabId] of panels) {
        if (narrow.matches) {
          panel.setAttribute("role", "tabpanel");
          panel.setAttribute("aria-labelledby", tabId);
        } else {
          panel.removeAttribute("role");
          if (labels.get(panel)) panel.setAttribute("aria-labelledby", labels.get(panel));
          else panel.removeAttribute("aria-labelledby");
        }
      }
    };
    narrow.addEventListener("change", applyRoles);
    applyRoles();
    this.showView("conversation");
  }

  showView(view) {
    this.layout.dataset.docView = view;
    for (const button of this.tabs.querySelectorAll("[role=tab]")) {
      const selected = button.id === `tab-${view}`;
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
    }
    if (view === "doc") this.view?.requestMeasure();
  }

  setConnection(state) {
    this.status.dataset.state = state;
    mount.dataset.connection = state;
    this.status.querySelector(".connection-text").textContent = CONNECTION_TEXT[state] || state;
  }

  showNotice(message) {
    this.notice.textContent = message || "";
    this.notice.hidden = !message;
  }

  // ---------------------------------------------------------------- the document and its editor

  // A fresh Y.Doc, provider and editor. Also how the panel recovers when the server refused
  // an update (too big, or we lost the right to edit): the refused change exists only in
  // the local Y.Doc, and sending it again would be refused again, so it is dropped with it.
  open() {
    this.ydoc = new Y.Doc();
    this.ytext = this.ydoc.getText("doc");
    this.awareness = new Awareness(this.ydoc);
    // Another client's awareness state is theirs to write: before the binding paints it,
    // keep a name as short text and a colour as #rrggbb (it goes into a style attribute).
    this.awareness.on("change", ({ added, updated }) => this.cleanStates([...added, ...updated]));
    this.awareness.on("change", () => this.renderPeople());
    const colour = colourFor(this.me.username);
    this.awareness.setLocalStateField("user", { name: this.me.username, color: colour, colorLight: colour + "33" });

    const base = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws/sessions`;
    this.provider = new WebsocketProvider(base, `${encodeURIComponent(this.sid)}/doc/`, this.ydoc, {
      connect: false, // each connection needs a fresh ticket: connect() fetches one first
      awareness: this.awareness,
      disableBc: true, // every edit goes through the server, which decides who may write
      params: {},
    });
    this.provider.on("status", ({ status }) => {
      if (status === "connecting") this.setConnection(this.attempts ? "reconnecting" : "connecting");
    });
    this.provider.on("sync", (synced) => {
      if (!synced) return;
      this.attempts = 0;
      this.setConnection("live");
      mount.dataset.synced = "true";
    });
    const provider = this.provider;
    provider.on("connection-close", (event) => this.onClose(provider, event));
    // The provider closes a socket that has been silent for 30 s. A server that does not
    // send a connection's own awareness renewals back to it (ours does not) is silent while
    // nobody else is here, so ask it for the awareness states ("query awareness", one byte
    // 3) when nothing came for a while: its answer keeps the connection open.
    this.keepalive = setInterval(() => {
      if (provider.wsconnected && provider.ws && Date.now() - provider.wsLastMessageReceived > KEEPALIVE_MS) {
        provider.ws.send(QUERY_AWARENESS);
      }
    }, KEEPALIVE_MS / 2);

    this.ytext.observe(() => this.schedulePreview());
    this.view = new EditorView({
      parent: this.editorHost,
      state: EditorState.create({
        doc: this.ytext.toString(),
        extensions: [
          basicSetup, // Tab is left to the page (moving focus); Mod-] and Mod-[ indent
          markdown(),
          syntaxHighlighting(markdownStyle),
          themeFromPage,
          EditorView.lineWrapping,
          EditorView.contentAttributes.of({ "aria-label": "Shared document (Markdown)" }),
          this.readOnly.of(this.readOnlyExtensions()),
          EditorState.transactionFilter.of((tr) => this.withinLimit(tr)),
          yCollab(this.ytext, this.awareness),
        ],
      }),
    });
    this.applyRole();
    this.connect();
  }

  close() {
    clearTimeout(this.retryTimer);
    clearInterval(this.keepalive);
    this.closing = true;
    try { this.provider?.destroy(); } catch { /* already closed */ }
    this.closing = false;
    this.view?.destroy();
    this.awareness?.destroy();
    this.ydoc?.destroy();
    mount.dataset.synced = "false";
  }

  restart(message) {
    this.close();
    this.showNotice(message);
    this.open();
  }

  // The server refuses an update that makes the document longer than its limit (and
  // closes the connection), so the editor refuses the keystroke or paste instead. Only the
  // user's own changes: a remote one was accepted by the server already.
  withinLimit(tr) {
    if (!tr.docChanged || !tr.annotation(Transaction.userEvent)) return tr;
    if (tr.newDoc.length <= this.maxChars) {
      if (this.overLimit) { this.overLimit = false; this.showNotice(""); }
      return tr;
    }
    const chars = (doc) => { let n = 0; for (const _ of doc.toString()) n += 1; return n; }; // eslint-disable-line no-unused-vars
    const after = chars(tr.newDoc);
    if (after <= this.maxChars || after <= chars(tr.startState.doc)) return tr;
    this.overLimit = true;
    this.showNotice(`The document is limited to ${this.maxChars.toLocaleString()} characters: that change would make it ${after.toLocaleString()}.`);
    return [];
  }

  readOnlyExtensions() {
    const write = this.canWrite() && !this.ended;
    return write ? [] : [EditorState.readOnly.of(true), EditorView.editable.of(false)];
  }

  applyRole() {
    const write = this.canWrite() && !this.ended;
    mount.dataset.readonly = String(!write);
    this.readOnlyBadge.hidden = write;
    this.viewerNote.hidden = write || this.ended;
    this.view?.dispatch({ effects: this.readOnly.reconfigure(this.readOnlyExtensions()) });
  }

  cleanStates(clients) {
    const states = this.awareness.getStates();
    for (const client of clients) {
      if (client === this.ydoc.clientID) continue;
      const state = states.get(client);
      if (!state || typeof state !== "object") continue;
      const user = state.user && typeof state.user === "object" ? state.user : {};
      const name = String(typeof user.name === "string" ? user.name : "Someone").slice(0, MAX_NAME);
      const color = typeof user.color === "string" && HEX_COLOUR.test(user.color) ? user.color : colourFor(name);
      state.user = { name, color, colorLight: color + "33" };
    }
  }

  renderPeople() {
    const seen = new Map();
    for (const [client, state] of this.awareness.getStates()) {
      if (client === this.ydoc.clientID || !state?.user) continue;
      seen.set(state.user.name, state.user.color);
    }
    this.people.replaceChildren(...[...seen].sort().map(([name, color]) =>
      el("li", { class: "doc-person", style: `--person: ${color}`, text: name })));
    this.people.hidden = seen.size === 0;
  }

  // ---------------------------------------------------------------- connecting

  async connect() {
    clearTimeout(this.retryTimer);
    if (this.ended) return;
    if (navigator.onLine === false) {
      this.setConnection("offline");
      return; // the "online" event connects again
    }
    const provider = this.provider;
    let ticket;
    try {
      ticket = await this.api.ticket();
    } catch (err) {
      if (provider !== this.provider) return;
      if (err instanceof TandemError && err.status === 401) { this.end("", "Signed out"); return; }
      this.retry();
      return;
    }
    if (provider !== this.provider || this.ended) return;
    if (navigator.onLine === false) { this.setConnection("offline"); return; }
    provider.params = { ticket };
    provider.connect();
  }

  retry(floor = 0) {
    this.attempts += 1;
    this.setConnection(navigator.onLine === false ? "offline" : "reconnecting");
    const delay = Math.max(floor, Math.min(500 * 2 ** (this.attempts - 1), 15000)) * (0.75 + Math.random() / 2);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  onClose(provider, event) {
    // We reconnect ourselves (with a fresh ticket), so the provider's own retry stays off.
    provider.shouldConnect = false;
    if (provider !== this.provider || this.closing || this.ended) return;
    mount.dataset.synced = "false";
    const code = event?.code; // no event: the provider closed a silent connection itself
    if (code === CLOSE_NOT_FOUND) {
      this.end("This session is gone, or it is no longer shared with you.");
    } else if (code === CLOSE_FORBIDDEN && event.reason === "member_removed") {
      this.end("You were removed from this session.");
    } else if (code === CLOSE_FORBIDDEN) {
      // Our update was refused: we are (now) a viewer. Reload the role, start over read-only.
      setTimeout(() => this.reloadRole().then(() => {
        if (!this.ended) this.restart(this.canWrite() ? "" : "Your change was not saved: you can no longer edit this document.");
      }), 0);
    } else if (CLOSE_TOO_BIG.includes(code)) {
      setTimeout(() => this.restart("Your last change was not saved: the document would be over its size limit."), 0);
    } else if (code === CLOSE_NOT_AUTHENTICATED) {
      this.retry(); // the next ticket request says whether we are still signed in
    } else if (code === CLOSE_TOO_MANY) {
      this.retry(5000);
    } else {
      this.retry();
    }
  }

  async reloadRole() {
    try {
      const session = await this.api.get(`/api/sessions/${encodeURIComponent(this.sid)}/`);
      this.role = session.role;
    } catch (err) {
      if (err instanceof TandemError && err.status === 404) this.end("This session is gone, or it is no longer shared with you.");
    }
  }

  // Stops for good: the session is gone, we were removed, or we are signed out.
  end(notice = "", statusText = CONNECTION_TEXT.closed) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.retryTimer);
    this.closing = true;
    try { this.provider.disconnect(); } catch { /* closed */ }
    this.closing = false;
    this.setConnection("closed");
    this.status.querySelector(".connection-text").textContent = statusText;
    if (notice) this.showNotice(notice);
    this.applyRole();
  }

  // The page's own code changes the role (member.added) and shows the "session gone" banner;
  // the panel follows both without reaching into it.
  watchPage() {
    new MutationObserver(() => {
      if (app.dataset.role && app.dataset.role !== this.role) {
        this.role = app.dataset.role;
        this.applyRole();
      }
    }).observe(app, { attributes: true, attributeFilter: ["data-role"] });
    const gone = document.getElementById("session-gone");
    if (gone) {
      new MutationObserver(() => {
        if (!gone.hidden) this.end(document.getElementById("session-gone-text")?.textContent || "");
      }).observe(gone, { attributes: true, attributeFilter: ["hidden"] });
    }
    window.addEventListener("online", () => this.backOnline());
    window.addEventListener("offline", () => this.goOffline());
    window.addEventListener("pagehide", () => { this.closing = true; try { this.provider.disconnect(); } catch { /* closed */ } });
  }

  // Without a network the socket may take a long time to notice; close it at once, keep
  // editing locally, and sync when the browser says it is back.
  goOffline() {
    if (this.ended) return;
    clearTimeout(this.retryTimer);
    this.closing = true;
    try { this.provider.disconnect(); } catch { /* closed */ }
    this.closing = false;
    mount.dataset.synced = "false";
    this.setConnection("offline");
  }

  backOnline() {
    if (this.ended || this.provider.wsconnected || this.provider.wsconnecting) return;
    this.attempts = 0;
    this.setConnection("reconnecting");
    this.connect();
  }

  // ---------------------------------------------------------------- preview

  setPreview(on) {
    this.previewOn = on;
    this.previewButton.setAttribute("aria-pressed", String(on));
    this.previewButton.textContent = on ? "Source" : "Preview";
    this.preview.hidden = !on;
    this.editorHost.hidden = on;
    mount.dataset.preview = String(on);
    if (on) this.renderPreview();
    else this.view.focus();
  }

  schedulePreview() {
    if (!this.previewOn || this.previewPending) return;
    this.previewPending = true;
    requestAnimationFrame(() => { this.previewPending = false; if (this.previewOn) this.renderPreview(); });
  }

  renderPreview() {
    const text = this.ytext.toString();
    if (text.trim()) renderInto(this.preview, text);
    else this.preview.replaceChildren(el("p", { class: "muted", text: "The document is empty." }));
  }
}

if (app && mount) new DocPanel();
