"""A small, fast run of the load tool (``python -m bench``) against a real server, so the
benchmark cannot rot. Speed is the benchmark's business (docs/PERFORMANCE.md): these
tests check that it connects, counts and reports correctly, never how fast anything is."""
from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.stats import by_bn, count_reordered, percentiles

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def run_bench(url: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--url", url, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("scenario")  # the readable table
    return json.loads(out.read_text())


def test_fanout_over_sse_and_websocket_loses_nothing(servers: Any, tmp_path: Path) -> None:
    (server,) = servers(1)
    report = run_bench(
        server.url, tmp_path, "fanout", "--clients", "6", "--sessions", "2", "--transport", "mixed",
        "--rate", "20,40", "--events", "5", "--settle", "0.2", "--drain", "10",
    )
    assert report["clients"] == {**report["clients"], "requested": 6, "connected": 6, "failed": 0}
    assert [p["rate_per_session"] for p in report["phases"]] == [20.0, 40.0]
    for phase in report["phases"]:
        # 5 events per session per phase, 3 clients on each of the 2 sessions.
        assert phase["published"] == 10 and phase["expected_deliveries"] == 30
        assert (phase["delivered"], phase["lost"], phase["duplicates"], phase["reordered"]) == (30, 0, 0, 0)
        assert phase["latency_ms"]["p50"] is not None
        assert phase["latency_ms"]["p50"] <= phase["latency_ms"]["p99"] <= phase["latency_ms"]["max"]
        assert phase["server_us_per_delivery"] > 0 and phase["client_cpu_seconds"] > 0
    assert report["server"]["pids"] == [server.proc.pid]
    assert report["server"]["rss_kb"]["connected"] > 0


def test_echo_replies_reach_every_client_of_every_session(servers: Any, tmp_path: Path) -> None:
    (server,) = servers(1)
    report = run_bench(
        server.url, tmp_path, "echo", "--sessions", "3", "--per-session", "2", "--transport", "mixed",
        "--words", "6", "--drain", "20",
    )
    assert report["posts"]["statuses"] == {"202": 3}
    assert report["lost"] == report["duplicates"] == report["reordered"] == 0
    # Each client read every event its session persisted after it connected.
    assert report["delivered"] == 2 * report["events_persisted"] > 0


def test_first_delta_and_churn_report_what_they_measure(servers: Any, tmp_path: Path) -> None:
    (server,) = servers(1)
    first = run_bench(server.url, tmp_path, "first-delta", "--rounds", "3")
    assert first["rounds"] == 3 and first["lost"] == 0
    assert first["post_to_first_delta_ms"]["p50"] > 0
    churn = run_bench(
        server.url, tmp_path, "churn", "--rounds", "2", "--clients", "8", "--sessions", "2",
        "--transport", "mixed", "--settle", "0.5",
    )
    assert [r["connected"] for r in churn["rounds"]] == [8, 8]
    # After the last round nothing is left open: streams, hub groups, listeners.
    gauges = churn["gauges"]
    assert gauges['tandem_open_streams{transport="sse"}']["after"] == 0
    assert gauges['tandem_open_streams{transport="ws"}']["after"] == 0
    # (The server runs replies inline: its agents pool keeps one group, before and after.)
    assert gauges["tandem_hub_groups"] == {"before": 1, "after": 1}
    assert gauges["tandem_hub_listeners"] == {"before": 1, "after": 1}


def test_storm_opens_every_client_at_once_and_reports_it(servers: Any, tmp_path: Path) -> None:
    (server,) = servers(1, TANDEM_MAX_CONNECTIONS_PER_USER="1000")
    report = run_bench(server.url, tmp_path, "storm", "--clients", "20", "--transport", "mixed")
    clients = report["clients"]
    assert clients == {**clients, "requested": 20, "connected": 20, "failed": 0, "errors": {}}
    assert clients["all_connected_s"] is not None
    # The response head comes before server.connected, and both were timed for every client.
    assert 0 < clients["headers_ms"]["p50"] <= clients["handshake_ms"]["max"]
    assert report["client_cpu_seconds"] >= 0 and report["server"]["pids"] == [server.proc.pid]


def test_reconnect_storm_resumes_every_client_exactly(servers: Any, tmp_path: Path) -> None:
    (server,) = servers(1, TANDEM_MAX_CONNECTIONS_PER_USER="1000")
    report = run_bench(
        server.url, tmp_path, "reconnect-storm", "--clients", "20", "--transport", "mixed",
        "--drop", "clients", "--backoff", "0", "--rate", "10", "--settle", "0.5",
    )
    assert report["clients"] == {**report["clients"], "requested": 20, "resumed": 20, "failed": 0}
    assert report["published"]["failed"] == 0 and report["published"]["accepted"] > 0
    assert (report["lost"], report["duplicates"], report["reordered"]) == (0, 0, 0)
    # Publishing started once all were connected and went on through the drop: each
    # client read every event exactly once, across its two connections.
    assert report["delivered"] == 20 * report["published"]["accepted"]


def test_reconnect_storm_after_a_kill_restarts_the_server_and_resumes(servers: Any, tmp_path: Path) -> None:
    (server,) = servers(1, TANDEM_MAX_CONNECTIONS_PER_USER="1000")
    # The same server again, exactly as the fixture started it: its command line and environment.
    proc = Path(f"/proc/{server.proc.pid}")
    argv = proc.joinpath("cmdline").read_bytes().decode().split("\0")[:-1]
    environ = [e for e in proc.joinpath("environ").read_bytes().decode().split("\0") if e]
    restart = shlex.join(["env", "-i", *environ, *argv])
    report = run_bench(
        server.url, tmp_path, "reconnect-storm", "--clients", "20", "--transport", "mixed",
        "--drop", "kill", "--restart-cmd", restart, "--rate", "10", "--settle", "0.5", "--timeout", "30",
    )
    assert report["killed_pids"] == [server.proc.pid]
    assert server.proc.wait(5) == -signal.SIGKILL
    assert report["clients"] == {**report["clients"], "requested": 20, "resumed": 20, "failed": 0}
    assert (report["lost"], report["duplicates"], report["reordered"]) == (0, 0, 0)
    # A request cut by the kill may still have committed its event: at least every
    # accepted one, each once.
    assert report["delivered"] >= 20 * report["published"]["accepted"] > 0
    # The tool stops the server it started: nothing listens on the port any more.
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", server.port)) != 0


def test_bench_refuses_what_is_not_loopback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "fanout", "--url", "http://example.com:8000"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "loopback" in proc.stderr


def test_the_analysis_counts_loss_duplicates_and_order() -> None:
    class Fake:
        def __init__(self, bns: list[int], seqs: list[int]) -> None:
            self.bns, self.seqs = bns, seqs
            self.times = [10.0 + 0.001 * i for i in range(len(bns))]

    sent = {0: 10.0, 1: 10.0, 2: 10.0}
    clients: list[Any] = [
        Fake([0, 1, 2], [1, 2, 3]),  # all, in order
        Fake([0, 2, 2], [1, 3, 3]),  # lost 1, duplicated 2
        Fake([1, 0, 2], [2, 1, 3]),  # all, out of order
    ]
    stats = by_bn(clients, {0: {0, 1, 2}}, sent, [0, 0, 0])
    assert (stats["delivered"], stats["lost"], stats["duplicates"], stats["reordered"]) == (8, 1, 1, 1)
    assert count_reordered([1, 2, 3]) == 0 and count_reordered([3, 1, 2]) == 2
    assert percentiles([0.001 * i for i in range(1, 101)])["p99"] == 99.0


@pytest.mark.redis
def test_doc_scenario_types_into_one_document_across_two_processes(servers: Any, tmp_path: Path) -> None:
    server_a, server_b = servers(2, redis=True)
    report = run_bench(
        server_a.url, tmp_path, "doc", "--url2", server_b.url, "--clients", "4", "--rate", "10",
        "--duration", "1.5", "--settle", "0.2", "--drain", "20",
    )
    assert (report["editors"], report["processes"]) == (4, 2)
    assert report["updates"] > 0 and report["errors"] == []
    assert report["expected_deliveries"] == report["updates"] * 3
    assert report["delivered"] == report["expected_deliveries"] and report["lost"] == 0
    assert report["converged"] and report["stored_matches"]
    assert report["stored_version"] == report["updates"]
    latency = report["latency_ms"]
    assert latency["p50"] is not None and latency["p50"] <= latency["p99"] <= latency["max"]
    assert report["server"]["pids"] == [[server_a.proc.pid], [server_b.proc.pid]]
    assert all(c > 0 for c in report["server"]["cpu_seconds"])
