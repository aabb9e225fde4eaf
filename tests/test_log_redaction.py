"""The formatters of Django's LOGGING (project/logfilters.py), record by record: every
credential is redacted wherever it sits in a record, and JSON lines stay valid JSON."""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from project.logfilters import JsonFormatter, PlainFormatter, RedactSecrets

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoxfQ.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
TICKET = "5:1wXyZq:Ab-Cd_Ef12345678"


@pytest.fixture(params=["plain", "json"])
def output(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO, str]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter() if request.param == "json" else PlainFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"tests.redaction.{request.param}")
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.DEBUG
    yield logger, stream, request.param
    logger.handlers = []


def written(stream: io.StringIO, kind: str) -> str:
    text = stream.getvalue()
    if kind == "json":
        for line in text.splitlines():
            json.loads(line)  # each line one valid JSON object
    return text


def test_a_credential_in_arguments_message_extra_or_traceback_is_redacted(
    output: tuple[logging.Logger, io.StringIO, str],
) -> None:
    logger, stream, kind = output
    logger.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5", f"/ws/stream/?ticket={TICKET}")
    logger.info("scope %s", {"query_string": f"token={JWT}".encode(), "headers": [(b"authorization", f"Bearer {JWT}".encode())]})
    logger.info("GET /api/stream/?types=a.*&token=%s\"", JWT, extra={"path": f"/x?ticket={TICKET}", "note": JWT})
    logger.info("cookie: sessionid=abcdef0123456789; csrftoken=x")
    try:
        raise ValueError(f"bad URL /api/stream/?token={JWT}")
    except ValueError:
        logger.exception("failed")
    text = written(stream, kind)
    for secret in (JWT, TICKET, "abcdef0123456789", *JWT.split(".")[1:]):
        assert secret not in text, text
    assert text.count("[redacted]") >= 6, text


def test_json_access_records_keep_separate_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("uvicorn.access")
    saved = access.handlers, access.propagate, access.level
    access.handlers, access.propagate, access.level = [handler], False, logging.INFO
    try:
        access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.1:4", "GET", f"/api/stream/?token={JWT}", "1.1", 200)
    finally:
        access.handlers, access.propagate, access.level = saved
    record = json.loads(stream.getvalue())
    assert record["logger"] == "uvicorn.access" and record["level"] == "INFO"
    assert (record["client"], record["method"], record["status"]) == ("10.0.0.1:4", "GET", 200)
    assert record["path"] == "/api/stream/?token=[redacted]"
    assert record["time"].endswith("Z")


def test_python_warnings_are_json_lines_with_secrets_redacted() -> None:
    # Django does not route warnings into logging; they were raw text on stderr in the
    # middle of a JSON log (seen: StreamingHttpResponse's warning under uvicorn).
    import os
    import subprocess
    import sys

    code = (
        "import django, warnings; django.setup(); "
        f"warnings.warn('fetched /ws/stream/?ticket={TICKET}')"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "TANDEM_LOG_FORMAT": "json"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, proc.stderr
    records = [json.loads(line) for line in lines]
    assert records[-1]["logger"] == "py.warnings"
    assert TICKET not in proc.stderr
