"""From what the clients read to the report: loss, duplicates, order, latency."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from bench.clients import StreamClient


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """Milliseconds, nearest-rank."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)
    n = len(ordered)

    def at(p: float) -> float:
        return round(ordered[min(n - 1, max(0, int(p * n + 0.5) - 1))] * 1000, 2)

    return {
        "p50": at(0.50), "p90": at(0.90), "p99": at(0.99),
        "max": round(ordered[-1] * 1000, 2), "mean": round(sum(ordered) / n * 1000, 2),
    }


def count_reordered(keys: Iterable[int]) -> int:
    """How many frames came with a key below one already read."""
    highest = -1
    out = 0
    for key in keys:
        if key < highest:
            out += 1
        else:
            highest = key
    return out


def by_bn(
    clients: list[StreamClient], expected: dict[int, set[int]], sent: dict[int, float],
    session_of: list[int],
) -> dict[str, Any]:
    """Custom-event runs. ``expected[s]``: the bns published to session index ``s``;
    ``sent[bn]``: when the publishing request started; ``session_of[i]``: client i's session."""
    latencies: list[float] = []
    by_second: dict[int, list[float]] = {}
    start = min(sent.values()) if sent else 0.0
    delivered = lost = duplicates = reordered = 0
    first = last = None
    wanted = set().union(*expected.values()) if expected else set()
    for i, client in enumerate(clients):
        want = expected.get(session_of[i], set())
        seen: set[int] = set()
        seqs: list[int] = []
        for j, bn in enumerate(client.bns):
            if bn not in wanted:
                continue
            t = client.times[j]
            if bn in seen:
                duplicates += 1
                continue
            seen.add(bn)
            delivered += 1
            latency = max(0.0, t - sent[bn])
            latencies.append(latency)
            by_second.setdefault(int(sent[bn] - start), []).append(latency)
            first = t if first is None or t < first else first
            last = t if last is None or t > last else last
            if client.seqs[j] >= 0:
                seqs.append(client.seqs[j])
        lost += len(want - seen)
        reordered += count_reordered(seqs)
    return {
        "delivered": delivered, "lost": lost, "duplicates": duplicates, "reordered": reordered,
        "latency_ms": percentiles(latencies), "last_delivery": last,
        # Per second of publishing: where in the run the slow deliveries were.
        "p99_ms_by_second": [percentiles(v)["p99"] for _, v in sorted(by_second.items())],
    }


def _parse_time(raw: bytes) -> float:
    return datetime.fromisoformat(raw.decode().replace("Z", "+00:00")).timestamp()


def by_seq(clients: list[StreamClient], heads: list[int]) -> dict[str, Any]:
    """Persisted-event runs (echo replies, message posts): each client must have read
    exactly the seqs after the head it connected at, up to the session's final head
    (``heads[i]`` for client i). Latency runs from the event's own ``time`` (stamped by
    the server when it made the event) to the client reading it."""
    latencies: list[float] = []
    delivered = lost = duplicates = reordered = 0
    for client, final in zip(clients, heads, strict=True):
        start = client.head or 0
        seen: set[int] = set()
        keys: list[int] = []
        for j, seq in enumerate(client.seqs):
            if seq < 0:
                continue
            keys.append(seq)
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            if start < seq <= final:
                delivered += 1
                if client.keep_time and client.event_times[j]:
                    latencies.append(max(0.0, client.times[j] - _parse_time(client.event_times[j])))
        lost += len(set(range(start + 1, final + 1)) - seen)
        reordered += count_reordered(keys)
    return {
        "delivered": delivered, "lost": lost, "duplicates": duplicates, "reordered": reordered,
        "latency_ms": percentiles(latencies),
    }


def connect_summary(clients: list[StreamClient], seconds: float) -> dict[str, Any]:
    ok = [c for c in clients if c.connected_at and not c.error]
    errors: dict[str, int] = {}
    for c in clients:
        if c.error:
            key = c.error.split(":", 1)[0] if not c.error.startswith("HTTP") else c.error[:40]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requested": len(clients), "connected": len(ok), "failed": len(clients) - len(ok),
        "errors": errors, "seconds": round(seconds, 2),
        "handshake_ms": percentiles([c.connect_seconds for c in ok]),
    }


def table(report: dict[str, Any]) -> str:
    """The report as aligned ``key  value`` lines, nested keys joined with dots."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            if value and all(not isinstance(v, (dict, list)) for v in value.values()) and len(value) <= 6:
                rows.append((prefix, "  ".join(f"{k}={_fmt(v)}" for k, v in value.items())))
                return
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                walk(f"{prefix}[{i}]", item)
        else:
            rows.append((prefix, _fmt(value)))

    walk("", report)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
