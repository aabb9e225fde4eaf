"""Runs small Node programs that use real third-party clients (npm ``eventsource``, ``ws``)
against a live server. The packages are installed in ``tests/node`` by the test command."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"


def run_node(script: str, *args: str, timeout: float = 30.0) -> Any:
    """Run ``script`` (ES module source) in ``tests/node`` and return the JSON it prints
    last on stdout. A test that needs Node fails when Node or the packages are missing."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules").is_dir():
        pytest.fail("Node and tests/node/node_modules are required (scripts/test.sh installs them)")
    proc = subprocess.run(
        [node, "--input-type=module", "-e", script, "--", *args],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"node exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise AssertionError(f"node printed nothing:\n{proc.stderr}")
    return json.loads(lines[-1])
