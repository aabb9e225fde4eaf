"""The JavaScript/TypeScript client in ``clients/js``: its types check with ``tsc``, the
committed browser bundle (``static/js/tandem.js``) is exactly what its sources build,
and its Node tests (``node --test``, npm ``eventsource`` and ``ws``) pass against a live
server. ``scripts/test.sh`` installs the package's dependencies (``npm ci``)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORD

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "js"
BUNDLE = ROOT / "static" / "js" / "tandem.js"


def run(*args: str, timeout: float = 180.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("node") is None or not (CLIENT / "node_modules").is_dir():
        pytest.fail("Node and clients/js/node_modules are required (scripts/test.sh runs npm ci there)")
    return subprocess.run(
        list(args), cwd=CLIENT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_the_types_check() -> None:
    proc = run("node_modules/.bin/tsc", "-p", "tsconfig.json", "--noEmit")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_committed_ui_bundle_is_what_the_sources_build(tmp_path: Path) -> None:
    out = tmp_path / "tandem.js"
    proc = run("node", "scripts/build-ui.mjs", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes() == BUNDLE.read_bytes(), (
        "static/js/tandem.js differs from what clients/js/src builds: run `npm run build:ui` in clients/js and commit it"
    )


@pytest.mark.slow
def test_the_node_client_against_a_live_server(servers: Any, alice: Any, bob: Any, shared_session: Any) -> None:
    (server,) = servers(1, TANDEM_ECHO_DELAY_MS="2")
    built = run("node_modules/.bin/tsc", "-p", "tsconfig.json")  # dist/, what the package ships
    assert built.returncode == 0, built.stdout + built.stderr
    proc = run(
        "node", "--test", "--test-reporter=spec", "test/",
        env={
            "TANDEM_URL": server.url, "TANDEM_PASSWORD": PASSWORD, "TANDEM_OWNER": alice.username,
            "TANDEM_EDITOR": bob.username, "TANDEM_SESSION": str(shared_session.id),
        },
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- server log ---\n{server.log()[-4000:]}"
    # Every test file ran: an empty or skipped run would pass too.
    counts = dict(re.findall(r"^\S+ (tests|pass|fail|skipped|todo) (\d+)$", proc.stdout, re.M))
    assert int(counts["tests"]) >= 15 and counts["pass"] == counts["tests"], proc.stdout
