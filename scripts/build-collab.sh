#!/usr/bin/env bash
# Rebuilds static/vendor/collab/ (collab.js, VERSIONS.txt, LICENSES.txt): the shared document
# editor's npm libraries, installed exactly as package-lock.json records (npm ci) and bundled
# by esbuild (build.mjs). To change a version: edit scripts/collab/package.json, run
# `npm install --no-audit --no-fund` there to update package-lock.json, then this script,
# and commit all of it (tests/test_vendor_collab.py fails when the output is stale).
# With an argument, writes the output into that folder instead (the test does this).
set -euo pipefail
cd "$(dirname "$0")/collab"
if [ "${COLLAB_SKIP_NPM_CI:-}" != "1" ]; then
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
fi
node build.mjs "$@"
