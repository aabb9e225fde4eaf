"""Rate strings such as ``120/min``. No Django imports: the settings module uses it."""
from __future__ import annotations

import re
from functools import lru_cache

_RATE = re.compile(r"(\d+)/(s|sec|second|m|min|minute|h|hour)")  # fullmatch: "$" allows a final "\n"
_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


@lru_cache(maxsize=8)
def parse_rate(value: str) -> tuple[int, int] | None:
    """``"120/min"`` → (120, 60); ``"none"`` → None (no limit). ValueError otherwise."""
    text = value.strip().lower()
    if text in ("none", "off"):
        return None
    match = _RATE.fullmatch(text)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"{value!r} is not a rate: use N/s, N/min, N/hour or none")
    return int(match.group(1)), _PERIODS[match.group(2)]
