#!/usr/bin/env bash
# Install Tandem into .venv and serve it on http://127.0.0.1:8000 with SQLite and an
# in-memory channel layer: no services needed. Set DATABASE_URL / REDIS_URL to use
# PostgreSQL / Redis instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt -e .
"$VENV/bin/python" manage.py migrate --noinput
exec "$VENV/bin/python" manage.py runserver "${TANDEM_BIND:-127.0.0.1:8000}"
