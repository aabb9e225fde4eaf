// Safe Markdown for agent replies: marked (GFM) renders, raw HTML in the source is shown
// as text (never parsed), and DOMPurify keeps only a short allow-list of tags and
// attributes in what marked produced. Both libraries are vendored under /static/vendor/.
import { Marked } from "/static/vendor/marked/marked.esm.js";
import DOMPurify from "/static/vendor/dompurify/purify.es.mjs";
import hljs from "/static/vendor/highlightjs/highlight.min.js";

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

/** Render Markdown into an element (replacing its children), its code blocks
 * highlighted and each given a copy button. */
export function renderInto(element, source, { autodetect = true } = {}) {
  element.innerHTML = renderMarkdown(source);
  enhanceCode(element, { autodetect });
}

hljs.configure({ ignoreUnescapedHTML: true });

/** Highlight every `pre > code` under `root` and wrap it with its language and a copy
 * button. highlight.js reads the code's text and writes escaped spans only, so the
 * sanitised HTML stays safe. Without a `language-*` class the language is guessed, but
 * only when `autodetect` (a finished message: guessing on every streamed delta is slow). */
export function enhanceCode(root, { autodetect = true } = {}) {
  for (const code of root.querySelectorAll("pre > code")) {
    const pre = code.parentElement;
    if (pre.parentElement?.classList.contains("code-wrap")) continue;
    const named = /(?:^|\s)language-([\w+-]+)/.exec(code.className || "")?.[1];
    let language = "";
    try {
      if (named && hljs.getLanguage(named)) {
        code.innerHTML = hljs.highlight(code.textContent, { language: named, ignoreIllegals: true }).value;
        language = named;
      } else if (!named && autodetect && code.textContent.length < 20_000) {
        const result = hljs.highlightAuto(code.textContent);
        if (result.language && result.relevance >= 5) {
          code.innerHTML = result.value;
          language = result.language;
        }
      } else if (named) {
        language = named;
      }
    } catch {
      /* left as plain text */
    }
    code.classList.add("hljs");
    const wrap = document.createElement("div");
    wrap.className = "code-wrap";
    pre.replaceWith(wrap);
    const tools = document.createElement("div");
    tools.className = "code-tools";
    const lang = document.createElement("span");
    lang.className = "code-lang";
    lang.textContent = language;
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-button copy-code";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", language ? `Copy ${language} code` : "Copy code");
    copy.addEventListener("click", () => copyText(code.textContent, copy));
    tools.append(lang, copy);
    wrap.append(pre, tools);
  }
}

/** Put `text` on the clipboard and say so on `button` for a moment. */
export async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    // No clipboard API (plain http on another host, or refused): the old way.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    area.remove();
  }
  if (!button) return ok;
  const label = button.dataset.label || button.textContent;
  button.dataset.label = label;
  button.textContent = ok ? "Copied" : "Copy failed";
  button.dataset.copied = ok ? "true" : "false";
  clearTimeout(button._copyTimer);
  button._copyTimer = setTimeout(() => {
    button.textContent = label;
    delete button.dataset.copied;
  }, 2000);
  return ok;
}
