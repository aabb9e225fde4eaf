"""Run the chaos test (tests/test_chaos.py) for longer than CI does:

    python -m bench.chaos --seconds 600 [--postgres]

It kills server processes, and stops and hangs (SIGSTOP) a redis-server of its own on a
free port (never the machine's Redis). The figures are printed as one JSON line starting
with ``chaos:``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--postgres", action="store_true", help="use PostgreSQL (TEST_POSTGRES_URL) instead of SQLite")
    args = parser.parse_args()
    env = {**os.environ, "TANDEM_CHAOS_SECONDS": str(args.seconds)}
    if args.postgres:
        env["DATABASE_URL"] = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
    command = [
        sys.executable, "-m", "pytest", "tests/test_chaos.py", "-s", "-q", "-p", "no:cacheprovider",
        "-o", f"timeout={int(args.seconds) + 300}",
    ]
    return subprocess.call(command, cwd=Path(__file__).resolve().parent.parent, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
