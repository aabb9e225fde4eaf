"""A small, fast run of the load tool (``python -m bench``) against a real server, so the
benchmark cannot rot. Speed is the benchmark's business (docs/PERFORMANCE.md): these
tests check that it connects, counts and reports correctly, never how fast anything is."""
from __future__ import annotations

import json
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
    assert gauges["tandem_hub_groups"]["after"] == 0
    assert gauges["tandem_hub_listeners"]["after"] == 0


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
