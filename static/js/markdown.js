// Safe Markdown for agent replies: marked (GFM) renders, raw HTML in the source is shown
// as text (never parsed), and DOMPurify keeps only a short allow-list of tags and
// attributes in what marked produced. Both libraries are vendored under /static/vendor/.
import { Marked } from "/static/vendor/marked/marked.esm.js";
import DOMPurify from "/static/vendor/dompurify/purify.es.mjs";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const md = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    // Raw HTML blocks and inline tags are text, not markup: an agent that echoes
    // "<script>…" shows those characters.
    html({ text }) {
      return escapeHtml(text);
    },
    // Images from agent text would let a message make the reader's browser fetch any
    // URL; show them as links instead.
    image({ href, text }) {
      return `<a href="${escapeHtml(href || "")}">${escapeHtml(text || href || "image")}</a>`;
    },
  },
});

const ALLOWED_TAGS = [
  "a", "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "kbd", "blockquote",
  "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6",
  "table", "thead", "tbody", "tr", "th", "td", "span", "sup", "sub", "input",
];
const ALLOWED_ATTR = ["href", "title", "start", "align", "type", "checked", "disabled", "class"];

const purifier = DOMPurify(window);
purifier.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href") || "";
    // Only web and mail links; anything else (javascript:, data:) loses its href.
    if (!/^(https?:|mailto:|#|\/)/i.test(href)) node.removeAttribute("href");
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
  if (node.tagName === "INPUT") {
    // GFM task-list checkboxes only.
    if (node.getAttribute("type") !== "checkbox") node.remove();
    else node.setAttribute("disabled", "");
  }
  if (node.hasAttribute && node.hasAttribute("class")) {
    const cls = node.getAttribute("class");
    if (!/^language-[\w+-]+$/.test(cls)) node.removeAttribute("class");
  }
});

/** Markdown source → a sanitised HTML string. */
export function renderMarkdown(source) {
  let html;
  try {
    html = md.parse(String(source ?? ""), { async: false });
  } catch {
    html = `<p>${escapeHtml(source)}</p>`;
  }
  return purifier.sanitize(html, {
    ALLOWED_TAGS,
    ALLOWED_ATTR,
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
  });
}

/** Render Markdown into an element (replacing its children). */
export function renderInto(element, source) {
  element.innerHTML = renderMarkdown(source);
}
