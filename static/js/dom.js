// What every page script builds its DOM with.
import { TandemError } from "/static/js/tandem.js";

// An element with its attributes and children. `class`, `text` (its text) and
// `on<event>` (a listener) are special; a name the element has as a property (`hidden`,
// `value`, `htmlFor`, `maxLength`, `style`…) is set as that property, anything else
// (`data-*`, `aria-*`, `novalidate`, `tabindex`…) as an attribute, `true` as an empty
// one. Values `undefined`, `null` and `false` are left out, and so are null children.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

// An error line: shows `message`, or hides itself when there is none.
export function showError(node, message) {
  if (!node) return;
  node.textContent = message || "";
  node.hidden = !message;
}

// What to tell a person about a failed request: the server's message and the details of
// what it refused, or `fallback` for anything that is not the server's answer.
export function errorText(err, fallback) {
  if (err instanceof TandemError) {
    const details = err.details && typeof err.details === "object" ? Object.values(err.details).flat() : [];
    const detail = details.filter((d) => typeof d === "string").join(" ");
    return detail ? `${err.message} ${detail}` : err.message || fallback;
  }
  return fallback;
}
