/**
 * A search hit's snippet as DOM nodes: text nodes, and a `<mark>` around each
 * highlighted range. The snippet is user text: it is only ever set as text, never
 * parsed as HTML, so markup in a message stays inert.
 * @param snippet plain text
 * @param highlights `[start, end)` in Unicode code points
 */
export function markSnippet(snippet: string, highlights: ReadonlyArray<readonly [number, number]> = []): DocumentFragment {
  const chars = Array.from(String(snippet)); // code points, as the server counts
  const fragment = document.createDocumentFragment();
  let at = 0;
  const ranges = [...highlights]
    .filter((r) => Array.isArray(r) && Number.isInteger(r[0]) && Number.isInteger(r[1]))
    .sort((a, b) => a[0] - b[0]);
  for (const [start, end] of ranges) {
    if (start < at || end <= start || end > chars.length) continue;
    if (start > at) fragment.append(document.createTextNode(chars.slice(at, start).join("")));
    const mark = document.createElement("mark");
    mark.textContent = chars.slice(start, end).join("");
    fragment.append(mark);
    at = end;
  }
  if (at < chars.length) fragment.append(document.createTextNode(chars.slice(at).join("")));
  return fragment;
}
