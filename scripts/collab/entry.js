// What static/js/doc-panel.js uses from npm, in one ES module (one copy of Yjs, which the
// binding, the provider and the page must share). scripts/build-collab.sh bundles it into
// static/vendor/collab/collab.js.
export { EditorView, basicSetup, minimalSetup } from "codemirror";
export { EditorState, Compartment, Transaction } from "@codemirror/state";
export { keymap, placeholder } from "@codemirror/view";
export { indentWithTab } from "@codemirror/commands";
export { HighlightStyle, syntaxHighlighting } from "@codemirror/language";
export { tags } from "@lezer/highlight";
export { markdown, markdownLanguage } from "@codemirror/lang-markdown";
export * as Y from "yjs";
export { yCollab, yUndoManagerKeymap } from "y-codemirror.next";
export { WebsocketProvider } from "y-websocket";
export { Awareness } from "y-protocols/awareness";
