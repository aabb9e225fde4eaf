"""Every scenario of docs/PERFORMANCE.md in one run: starts Tandem (and the seed peer,
when its virtualenv exists), runs the load tool against each, and writes one JSON report
per scenario plus ``summary.md`` into the output folder.

    python -m bench.suite --out /tmp/tandem-bench [--server uvicorn|daphne] [--quick]

Tandem runs as one server process on PostgreSQL and Redis (``--database-url``,
``--redis-url``), as DEPLOY.md lays it out, plus one agents worker (``manage.py
run_agents``) when a scenario posts messages; the peer (``bench/peer.py``, the seed
documents' FastAPI design) as one uvicorn worker on the same Redis, from a virtualenv of its
own (``--peer-venv``, with ``bench/peer-requirements.txt``). Both get the same load tool
and the same machine, one after the other, never at once.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.procinfo import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
TANDEM_PORT, PEER_PORT = 8100, 8101

# name, target, scenario arguments (full run, quick run)
SCENARIOS: list[tuple[str, str, list[str], list[str]]] = [
    ("fanout-1000", "both",
     ["fanout", "--clients", "1000", "--rate", "20", "--duration", "10", "--settle", "3"],
     ["fanout", "--clients", "100", "--rate", "20", "--duration", "3"]),
    ("fanout-5000", "both",
     ["fanout", "--clients", "5000", "--rate", "2,4,6,8", "--duration", "8", "--settle", "5",
      "--connect-concurrency", "100", "--timeout", "120", "--drain", "20"],
     ["fanout", "--clients", "300", "--rate", "5,10", "--duration", "3"]),
    ("echo-1000x2", "tandem",
     ["echo", "--sessions", "1000", "--per-session", "2", "--transport", "mixed", "--words", "20",
      "--publishers", "16", "--timeout", "120", "--drain", "60"],
     ["echo", "--sessions", "50", "--per-session", "2", "--transport", "mixed"]),
    ("idle-10000", "tandem",
     ["idle", "--clients", "10000", "--sessions", "1000", "--transport", "mixed", "--hold", "35",
      "--connect-concurrency", "100", "--timeout", "180", "--settle", "3"],
     ["idle", "--clients", "500", "--sessions", "50", "--transport", "mixed", "--hold", "5"]),
    ("idle-10000-sse", "peer",
     ["idle", "--clients", "10000", "--sessions", "1000", "--hold", "35",
      "--connect-concurrency", "100", "--timeout", "180", "--settle", "3"],
     ["idle", "--clients", "500", "--sessions", "50", "--hold", "5"]),
    ("first-delta", "tandem", ["first-delta", "--rounds", "100"], ["first-delta", "--rounds", "10"]),
    ("posts", "tandem",
     ["posts", "--sessions", "400", "--publishers", "16", "--duration", "15", "--drain", "60"],
     ["posts", "--sessions", "40", "--publishers", "8", "--duration", "3"]),
    # Issue 12: opening at once, coming back at once, and the cost of a delivery.
    ("storm-1000", "both", ["storm", "--clients", "1000", "--timeout", "120"], ["storm", "--clients", "20"]),
    ("storm-5000", "both", ["storm", "--clients", "5000", "--timeout", "120"], ["storm", "--clients", "50"]),
    ("storm-10000", "both", ["storm", "--clients", "10000", "--timeout", "180"], ["storm", "--clients", "100"]),
    ("storm-5000-ws", "tandem", ["storm", "--clients", "5000", "--transport", "ws", "--timeout", "120"],
     ["storm", "--clients", "50", "--transport", "ws"]),
    ("reconnect-kill-5000", "both",
     ["reconnect-storm", "--clients", "5000", "--drop", "kill", "--rate", "2", "--settle", "2",
      "--connect-concurrency", "200", "--timeout", "120", "--drain", "30"],
     ["reconnect-storm", "--clients", "20", "--drop", "kill", "--rate", "5", "--settle", "0.5"]),
    ("reconnect-5000", "both",
     ["reconnect-storm", "--clients", "5000", "--drop", "clients", "--backoff", "0", "--rate", "2",
      "--settle", "2", "--connect-concurrency", "200", "--timeout", "120", "--drain", "30"],
     ["reconnect-storm", "--clients", "20", "--drop", "clients", "--backoff", "0", "--rate", "5", "--settle", "0.5"]),
    ("fanout-5000-saturated", "both",
     ["fanout", "--clients", "5000", "--rate", "10", "--duration", "6", "--settle", "3",
      "--connect-concurrency", "200", "--timeout", "120", "--drain", "30"],
     ["fanout", "--clients", "50", "--rate", "10", "--duration", "2"]),
    ("churn-10x2000", "tandem",
     ["churn", "--rounds", "10", "--clients", "2000", "--sessions", "100", "--transport", "mixed",
      "--connect-concurrency", "100", "--settle", "2", "--timeout", "120"],
     ["churn", "--rounds", "3", "--clients", "200", "--sessions", "10", "--transport", "mixed"]),
]

WORKER_SCENARIOS = {"echo", "first-delta", "posts"}

SERVER_ENV = {
    "DEBUG": "0", "ALLOWED_HOSTS": "127.0.0.1,localhost", "TANDEM_HTTPS": "false",
    "SECRET_KEY": "bench-only-secret-key-0123456789-bench-only-secret-key-0123456789",
    # One user opens every benchmark stream and posts every event.
    "TANDEM_MAX_CONNECTIONS_PER_USER": "1000000", "TANDEM_RATE_WRITE": "none",
    "TANDEM_ALLOW_SIGNUP": "true",  # the tool registers its user
}


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url}: not healthy after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    time.sleep(2)  # let TIME_WAIT sockets and the port settle before the next server


def tandem_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The server's command line and the environment it adds."""
    env = {**SERVER_ENV, "DATABASE_URL": args.database_url, "REDIS_URL": args.redis_url}
    if args.server == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1",
               "--port", str(TANDEM_PORT), "--loop", "uvloop", "--http", "httptools",
               "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "5"]
    else:
        cmd = [sys.executable, "-m", "daphne", "--verbosity", "0", "-b", "127.0.0.1", "-p",
               str(TANDEM_PORT), "project.asgi:application"]
    return cmd, env


def peer_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The seed-design peer (bench/peer.py), one uvicorn worker, from its own virtualenv."""
    cmd = [str(Path(args.peer_venv) / "bin" / "uvicorn"), "bench.peer:app", "--loop", "uvloop", "--http",
           "httptools", "--workers", "1", "--host", "127.0.0.1", "--port", str(PEER_PORT),
           "--log-level", "warning"]
    return cmd, {"REDIS_URL": args.redis_url}


def restart_command(cmd: list[str], env: dict[str, str]) -> str:
    """One string for ``--restart-cmd``: the same server, the same environment."""
    return shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *cmd])


def start_tandem(args: argparse.Namespace, logs: Path) -> subprocess.Popen[bytes]:
    cmd, extra = tandem_command(args)
    env = {**os.environ, **extra}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=(logs / "tandem.log").open("ab"),
                            stderr=subprocess.STDOUT)
    wait_healthy(f"http://127.0.0.1:{TANDEM_PORT}/healthz", proc)
    return proc


def start_worker(args: argparse.Namespace, logs: Path) -> subprocess.Popen[bytes]:
    """The agents worker: with Redis, replies run there, not in the server (DEPLOY.md)."""
    env = {**os.environ, **SERVER_ENV, "DATABASE_URL": args.database_url, "REDIS_URL": args.redis_url}
    log = logs / "worker.log"
    proc = subprocess.Popen([sys.executable, "manage.py", "run_agents"], cwd=ROOT, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the agents worker did not start: see {log}")
        time.sleep(0.2)
    return proc


def start_peer(args: argparse.Namespace, logs: Path) -> subprocess.Popen[bytes]:
    cmd, extra = peer_command(args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **extra}, stdout=(logs / "peer.log").open("ab"),
                            stderr=subprocess.STDOUT)
    wait_healthy(f"http://127.0.0.1:{PEER_PORT}/stats", proc)
    return proc


def run_one(
    name: str, target: str, scenario_args: list[str], out: Path, worker: int | None = None
) -> dict[str, Any] | None:
    port = TANDEM_PORT if target == "tandem" else PEER_PORT
    path = out / f"{name}.{target}.json"
    cmd = [sys.executable, "-m", "bench", *scenario_args, "--target", target,
           "--url", f"http://127.0.0.1:{port}", "--json", str(path)]
    print(f"== {name} on {target}: {' '.join(scenario_args)}", flush=True)
    worker_cpu = cpu_seconds(worker) if worker else 0.0
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    (out / f"{name}.{target}.txt").write_text(proc.stdout + proc.stderr)
    if not path.exists():
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        return None
    time.sleep(3)
    report: dict[str, Any] = json.loads(path.read_text())
    if worker:
        # Where replies run: its CPU share over the scenario says whether it kept up.
        used = cpu_seconds(worker) - worker_cpu
        report["agents_worker"] = {"cpu_seconds": round(used, 1), "cpu_share": round(used / elapsed, 2)}
        path.write_text(json.dumps(report, indent=2))
    return report


def summarize(results: dict[str, dict[str, Any]]) -> str:
    """One line per run with the figures the targets are about."""
    lines = ["| run | figures |", "|---|---|"]
    for key, r in results.items():
        figures: list[str] = []
        clients = r.get("clients")
        if isinstance(clients, dict) and "connected" in clients:
            figures.append(f"connected {clients['connected']}/{clients['requested']} in {clients['seconds']} s")
        if isinstance(clients, dict) and "all_connected_s" in clients:
            hs = clients["handshake_ms"]
            figures.append(f"connect p50 {hs['p50']} / p99 {hs['p99']} ms, all in {clients['all_connected_s']} s")
        if isinstance(clients, dict) and "resumed" in clients:
            rs = clients["resume_ms"]
            figures.append(
                f"resumed {clients['resumed']}/{clients['requested']}, all in {clients['all_resumed_s']} s "
                f"(p50 {rs['p50']} / p99 {rs['p99']} ms)"
            )
            if "lost" in r:
                figures.append(f"lost {r['lost']}, dup {r['duplicates']}, reordered {r['reordered']}")
        for phase in r.get("phases", []):
            lat = phase["latency_ms"]
            figures.append(
                f"@{phase['rate_per_session']:g}/s: {phase['deliveries_per_s']:,.0f} deliveries/s, "
                f"p50 {lat['p50']} / p99 {lat['p99']} ms, lost {phase['lost']}, dup {phase['duplicates']}"
                + (f", {phase['server_us_per_delivery']} µs server CPU/delivery" if phase.get("server_us_per_delivery") else "")
            )
        if "latency_ms" in r and "lost" in r:
            lat = r["latency_ms"]
            figures.append(f"p50 {lat['p50']} / p99 {lat['p99']} ms, lost {r['lost']}, dup {r['duplicates']}")
        if "post_to_first_delta_ms" in r:
            lat = r["post_to_first_delta_ms"]
            figures.append(f"POST -> first delta p50 {lat['p50']} / p99 {lat['p99']} ms")
        if "accepted_per_s" in r:
            figures.append(f"{r['accepted_per_s']} posts/s, {r['events_persisted_per_s']} events/s, lost {r['lost']}")
            if r.get("server_cpu_ms_per_post"):
                figures.append(f"{r['server_cpu_ms_per_post']} ms server CPU/post")
        if "still_open" in r:
            figures.append(f"held {r['still_open']}, longest heartbeat gap p99 {r['heartbeats']['longest_gap_ms']['p99']} ms")
        if "rss_kb" in r and isinstance(r["rss_kb"], dict) and "change_pct" in r["rss_kb"]:
            figures.append(f"RSS {r['rss_kb']['start']} -> {r['rss_kb']['end']} KB ({r['rss_kb']['change_pct']} %)")
        server = r.get("server", {})
        if "kb_per_connection" in server:
            figures.append(f"{server['kb_per_connection']} KB/connection")
        lines.append(f"| {key} | {'; '.join(figures)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/tandem-bench")
    p.add_argument("--server", choices=("uvicorn", "daphne"), default="uvicorn")
    p.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/tandem_bench")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    p.add_argument("--peer-venv", default="/tmp/seed-peer",
                   help="a virtualenv with bench/peer-requirements.txt (the peer's FastAPI stack)")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--port", type=int, default=8100, help="Tandem's port; the peer's is the next one")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the suite, measures nothing")
    args = p.parse_args()
    global TANDEM_PORT, PEER_PORT
    TANDEM_PORT, PEER_PORT = args.port, args.port + 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.database_url.startswith("postgres"):
        name = args.database_url.rsplit("/", 1)[1]
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", name], capture_output=True)
    only = {n for n in args.only.split(",") if n}
    chosen = [s for s in SCENARIOS if not only or s[0] in only]
    peer_ok = (Path(args.peer_venv) / "bin" / "uvicorn").exists()
    if not peer_ok:
        print(f"no peer virtualenv at {args.peer_venv}: Tandem only (see bench/peer-requirements.txt)")
    results: dict[str, dict[str, Any]] = {}
    for who in ("tandem", "peer"):
        todo = [s for s in chosen if s[1] in (who, "both")]
        if not todo or (who == "peer" and not peer_ok):
            continue
        start = start_tandem if who == "tandem" else start_peer
        procs = [start(args, out)]
        # Replies run in the agents worker: only the scenarios that post messages need it.
        if who == "tandem" and any(s[2][0] in WORKER_SCENARIOS for s in todo):
            procs.append(start_worker(args, out))
        try:
            for name, _, full, quick in todo:
                worker = procs[1].pid if len(procs) > 1 else None
                scenario_args = quick if args.quick else full
                if "kill" in scenario_args:
                    cmd, extra = tandem_command(args) if who == "tandem" else peer_command(args)
                    scenario_args = [*scenario_args, "--restart-cmd", restart_command(cmd, extra)]
                report = run_one(name, who, scenario_args, out, worker)
                if report is not None:
                    results[f"{name}.{who}"] = report
                if procs[0].poll() is not None:  # killed by the scenario: a fresh one for the next
                    time.sleep(2)
                    procs[0] = start(args, out)
        finally:
            for proc in procs:
                stop(proc)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summarize(results))
    print(summarize(results))
    print(f"reports in {out}")
    if shutil.which("nproc"):
        print("machine:", subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(), "cores")


if __name__ == "__main__":
    main()
