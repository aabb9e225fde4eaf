"""Log hygiene: stream URLs carry ``?token=`` and ``?ticket=`` (browsers cannot send
headers), and proxies and servers log URLs. Every record passes through this filter."""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone

import orjson

_SECRET_PARAM = re.compile(r"((?:^|[?&\s])(?:token|ticket|access|refresh)=)[^&\s\"']+", re.IGNORECASE)


def redact(text: str) -> str:
    return _SECRET_PARAM.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``TANDEM_LOG_FORMAT=json``), for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()
