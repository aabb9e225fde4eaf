#!/usr/bin/env bash
# Install everything the tests need, lint with ruff, check types with mypy, and run the whole suite twice: on SQLite and on
# PostgreSQL, with the real Redis for the fan-out tests. Starts PostgreSQL and Redis if
# they are installed here but not running. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"

# Lint and import order ([tool.ruff] in pyproject.toml): findings fail the run before any test.
echo "== ruff check =="
"$VENV/bin/ruff" check --output-format concise .
# Types ([tool.mypy]: strict on project, events_app, sessions_app, tandem_client).
echo "== mypy =="
"$VENV/bin/mypy"

# The browser tests drive Debian's Chromium; the deployment test runs nginx.
missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
if [ -n "$missing" ]; then
  echo "Installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null
fi

# Real third-party Node clients (npm eventsource and ws) that tests drive against a live server.
if ! command -v npm >/dev/null 2>&1; then
  echo "Installing: nodejs npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null && apt-get install -y -q nodejs npm >/dev/null
fi
(cd tests/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
# The JavaScript/TypeScript client (clients/js): TypeScript, esbuild and its own eventsource/ws,
# for tests/test_js_client.py (types, the committed UI bundle, its Node tests).
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
# The shared document editor's npm libraries, locked: tests/test_vendor_collab.py rebuilds
# static/vendor/collab/collab.js from them and checks it is the committed file.
(cd scripts/collab && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

PG_URL="${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"

if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "Redis is not running: starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  echo "PostgreSQL is not running: starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
for _ in $(seq 50); do
  (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && break
  sleep 0.2
done

status=0
echo "== pytest on SQLite =="
env -u DATABASE_URL -u REDIS_URL "$VENV/bin/python" -m pytest "$@" || status=$?
echo "== pytest on PostgreSQL =="
env -u REDIS_URL DATABASE_URL="$PG_URL" "$VENV/bin/python" -m pytest "$@" || status=$?
exit $status
