// What static/js/doc-panel.js uses from npm, in one ES module (one copy of Yjs, which the
// binding, the provider and the page must share). scripts/build-collab.sh bundles it into
// static/vendor/collab/collab.js.
export { EditorView, basicSetup } from "codemirror";
export { EditorState, Compartment, Transaction } from "@codemirror/state";
export { HighlightStyle, syntaxHighlighting } from "@codemirror/language";
export { tags } from "@lezer/highlight";
export { markdown } from "@codemirror/lang-markdown";
export * as Y from "yjs";
export { yCollab } from "y-codemirror.next";
export { WebsocketProvider } from "y-websocket";
export { Awareness } from "y-protocols/awareness";
