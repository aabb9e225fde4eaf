#!/usr/bin/env bash
# Vendors highlight.js (the ES module build with its common languages) under
# static/vendor/highlightjs/ from the npm package @highlightjs/cdn-assets. Repeatable:
# the same version gives the same files. Run from the repository root.
set -euo pipefail
VERSION="${1:-11.12.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@highlightjs/cdn-assets@${VERSION}" >/dev/null && tar xzf ./*.tgz)
dest=static/vendor/highlightjs
mkdir -p "$dest"
cp "$work/package/es/highlight.min.js" "$dest/highlight.min.js"
cp "$work/package/LICENSE" "$dest/LICENSE"
echo "highlight.js ${VERSION}: $(sha256sum "$dest/highlight.min.js" | cut -d' ' -f1)"
