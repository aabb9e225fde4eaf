"""Log hygiene: stream URLs carry ``?token=`` and ``?ticket=`` (browsers cannot send
headers), password reset links a token in their path, and proxies and servers log URLs.
Every record passes through this filter, and every line the JSON formatter writes is
redacted once more as a whole (extra fields, tracebacks)."""
from __future__ import annotations

import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from project import thirdparty

# A credential in a query string or a header as servers print them: `?token=…`,
# `&ticket=…`, uvicorn's trace scope (`b'token=…`), a cookie (`sessionid=…`), a bearer
# header, or a JWT wherever it stands.
_SECRET_PARAM = re.compile(
    r"((?:^|[?&\s'\";(,])(?:token|ticket|access|refresh|sessionid)=)[^&\s\"';,)\\]+", re.IGNORECASE
)
_BEARER = re.compile(r"(\bBearer\s+)[^\s\"',)\\]+", re.IGNORECASE)
_JWT = re.compile(r"\beyJ[\w-]*\.[\w-]+\.[\w-]+")
# A password reset link's token (``/accounts/reset/<uid>/<token>/``): whoever reads it can
# set the account's password until it is used. Django's next step, ``set-password``, is no
# secret.
_RESET_TOKEN = re.compile(r"(/accounts/reset/[\w-]+/)(?!set-password/)[\w-]+")


# What every pattern above needs to find somewhere in the text: one scan tells the lines
# with nothing to redact (most of them) from the rest.
_MAYBE_SECRET = re.compile(r"token|ticket|access|refresh|sessionid|bearer|eyJ|/accounts/reset/", re.IGNORECASE)


def redact(text: str) -> str:
    if not _MAYBE_SECRET.search(text):
        return text
    text = _SECRET_PARAM.sub(r"\1[redacted]", text)
    text = _BEARER.sub(r"\1[redacted]", text)
    text = _RESET_TOKEN.sub(r"\1[redacted]", text)
    return _JWT.sub("[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if redact(message) == message:
            return True
        # Redact the arguments one by one, so the JSON formatter can still take structured
        # fields from them (uvicorn's access log); flatten if that is not enough.
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
            record.msg = redact(str(record.msg))
            try:
                if redact(record.getMessage()) == record.getMessage():
                    return True
            except (TypeError, ValueError):
                pass
        record.msg, record.args = redact(message), ()
        return True


class QuietReadinessFailures(logging.Filter):
    """On ``django.request``: drops Django's own line for a failing ``/readyz``. Django logs
    every 5xx at ERROR, so a probe every second would log one a second; the view logs each
    change of state itself (``tandem.readiness``). Uses the ``status_code`` and ``request``
    Django documents on these records."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        return not (getattr(record, "status_code", None) == 503 and getattr(request, "path_info", None) == "/readyz")


class PlainFormatter(logging.Formatter):
    """The plain format, redacted as a whole: a traceback can quote a URL too."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(OrjsonFormatter):
    """One JSON object per line (``TANDEM_LOG_FORMAT=json``), for log shippers: ``time``,
    ``level``, ``logger``, ``message``, ``process``, any ``extra`` fields (the access log's
    ``method``, ``path``, ``status``, ``duration_ms``, ``client``), and ``exception``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s %(process)d",
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
            # uvicorn's colour template, and Django's request object (its repr is a URL).
            reserved_attrs=[*RESERVED_ATTRS, "taskName", "color_message", "request", "scope"],
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = (
            datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z")
        )
        super().add_fields(log_data, record, message_dict)
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn's access line: client, method, path with query, HTTP version, status.
            client, method, path, _, status = record.args
            log_data.update(client=client, method=method, path=path, status=status)

    def serialize_log_record(self, log_data: dict[str, Any]) -> str:
        return redact(super().serialize_log_record(log_data))


def configure(config: dict[str, Any]) -> None:
    """``LOGGING_CONFIG`` of every process (servers, ``run_agents``, ``manage.py``):
    Django's ``dictConfig``, and Python's warnings as records of ``py.warnings``, so they
    are redacted and JSON like every other line instead of raw text on stderr."""
    logging.config.dictConfig(config)
    logging.captureWarnings(True)


def adopt_server_loggers() -> None:
    """Route the ASGI server's own log lines through the handlers Django's ``LOGGING``
    gave the root logger (redaction, and JSON with ``TANDEM_LOG_FORMAT=json``). Called
    when the app is imported, which both servers do after setting up their logging.

    uvicorn gives its loggers handlers of its own (``propagate`` off): they get the root's
    handlers instead, keeping their levels, so ``--log-level`` and ``--no-access-log`` keep
    their meaning. daphne writes its access log (whole URLs, tokens included) straight to
    stdout: its entries become records of the ``daphne.access`` logger."""
    root_handlers = list(logging.getLogger().handlers)
    if not root_handlers:  # a LOGGING without root handlers: leave the servers' own
        return
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        if logger.handlers:
            logger.handlers = list(root_handlers)
    thirdparty.daphne_access_log_to_logging()
