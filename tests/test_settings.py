from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from project.settings import env_bool, env_float, env_int, env_list

ROOT = Path(__file__).resolve().parent.parent


def test_env_bool_reads_the_usual_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, expected in [("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False)]:
        monkeypatch.setenv("X_FLAG", raw)
        assert env_bool("X_FLAG", not expected) is expected
    monkeypatch.delenv("X_FLAG")
    assert env_bool("X_FLAG", True) is True


def test_env_bool_refuses_a_typo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_FLAG", "ture")
    with pytest.raises(ImproperlyConfigured, match="X_FLAG"):
        env_bool("X_FLAG", False)


def test_env_int_refuses_non_numbers_and_values_below_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_NUM", "12s")
    with pytest.raises(ImproperlyConfigured, match="not an integer"):
        env_int("X_NUM", 1)
    monkeypatch.setenv("X_NUM", "0")
    with pytest.raises(ImproperlyConfigured, match="minimum"):
        env_int("X_NUM", 1, minimum=1)
    monkeypatch.setenv("X_NUM", "42")
    assert env_int("X_NUM", 1, minimum=1) == 42


def test_env_float_and_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_F", "abc")
    with pytest.raises(ImproperlyConfigured):
        env_float("X_F", 1.0)
    monkeypatch.setenv("X_L", " a.example , ,b.example ")
    assert env_list("X_L", []) == ["a.example", "b.example"]


def _load_settings(
    env: dict[str, str],
    show: str = "settings.CHANNEL_LAYERS['default']['BACKEND'], settings.DATABASES['default']['ENGINE']",
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); from django.conf import settings; print({show})"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "project.settings", **env},
    )


def test_bad_environment_stops_the_process_with_a_clear_message() -> None:
    result = _load_settings({"TANDEM_HEARTBEAT_SECONDS": "soon"})
    assert result.returncode != 0
    assert "TANDEM_HEARTBEAT_SECONDS" in result.stderr


@pytest.mark.parametrize(
    "name, value",
    [("TANDEM_RATE_WRITE", "lots"), ("TANDEM_RATE_WRITE", "0/min"), ("TANDEM_AGENT_MODE", "both"),
     ("TANDEM_MAX_CONNECTIONS_PER_USER", "0"), ("TANDEM_RATE_AUTH_IP", "fast"),
     ("TANDEM_RATE_AUTH_USER", "10/day"), ("TANDEM_TRUSTED_PROXIES", "nginx.local"),
     ("TANDEM_RATE_TICKET", "many"), ("TANDEM_MAX_QUEUED", "-1"), ("TANDEM_MAX_QUEUED", "twenty")],
)
def test_bad_limits_and_modes_stop_the_process(name: str, value: str) -> None:
    result = _load_settings({name: value})
    assert result.returncode != 0
    assert name in result.stderr


def test_production_without_secret_key_is_refused() -> None:
    result = _load_settings({"DEBUG": "0"})
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


def test_defaults_need_no_services_and_redis_url_selects_the_pubsub_layer() -> None:
    plain = _load_settings({})
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split() == ["channels.layers.InMemoryChannelLayer", "django.db.backends.sqlite3"]
    with_services = _load_settings(
        {"REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test"}
    )
    assert with_services.returncode == 0, with_services.stderr
    assert with_services.stdout.split() == [
        "channels_redis.pubsub.RedisPubSubChannelLayer", "django.db.backends.postgresql",
    ]


def test_log_records_never_carry_stream_tokens_or_tickets() -> None:
    import logging

    from project.logfilters import RedactSecrets

    record = logging.LogRecord(
        "django.channels.server", logging.WARNING, __file__, 1,
        "HTTP GET %s 401", ("/api/stream/?types=a.*&token=eyJhbGciOi.abc.def&ticket=1:x:y",), None,
    )
    RedactSecrets().filter(record)
    text = record.getMessage()
    assert "eyJhbGciOi" not in text and "1:x:y" not in text
    assert "token=[redacted]" in text and "types=a.*" in text


def test_production_settings_pass_the_deploy_check() -> None:
    import secrets

    env = {
        "DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(50), "ALLOWED_HOSTS": "tandem.example.com",
        "DJANGO_SETTINGS_MODULE": "project.settings", "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db
def test_without_debug_http_is_redirected_but_health_checks_are_not(settings: Any) -> None:
    from django.test import Client

    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    client = Client()
    assert client.get("/api/sessions/").status_code == 301
    assert client.get("/healthz").status_code == 200
    secure = client.get("/api/sessions/", HTTP_X_FORWARDED_PROTO="https", secure=True)
    assert secure.status_code == 401


def test_json_logs_are_one_object_per_line_and_redacted() -> None:
    import json
    import logging

    from project.logfilters import JsonFormatter, RedactSecrets

    record = logging.LogRecord("tandem.access", logging.INFO, __file__, 1, '"GET /s/?ticket=%s"', ("abc",), None)
    RedactSecrets().filter(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "INFO" and entry["logger"] == "tandem.access"
    assert entry["message"] == '"GET /s/?ticket=[redacted]"' and entry["time"].endswith("Z")
    result = _load_settings({"TANDEM_LOG_FORMAT": "xml"})
    assert result.returncode != 0 and "TANDEM_LOG_FORMAT" in result.stderr


def _database_settings(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    d = "settings.DATABASES['default']"
    return _load_settings(env, f"{d}['CONN_MAX_AGE'], {d}.get('OPTIONS', {{}}).get('pool')")


def test_postgresql_gets_a_pool_and_no_persistent_connections() -> None:
    pg = "postgres://u@127.0.0.1:5432/x"
    pooled = _database_settings({"DATABASE_URL": pg, "TANDEM_DB_POOL_SIZE": "7"})
    assert pooled.returncode == 0, pooled.stderr
    assert pooled.stdout.split(" ", 1) == ["0", "{'min_size': 2, 'max_size': 7, 'timeout': 10}\n"]
    # A pool and persistent connections exclude each other; asking for the latter drops it.
    kept = _database_settings({"DATABASE_URL": pg, "TANDEM_DB_CONN_MAX_AGE": "30"})
    assert kept.stdout.split() == ["30", "None"]
    assert _database_settings({"DATABASE_URL": pg, "TANDEM_DB_POOL_SIZE": "0"}).stdout.split() == ["0", "None"]
    assert _database_settings({"TANDEM_DB_POOL_SIZE": "-1"}).returncode != 0


def test_gc_threshold_refuses_values_that_would_switch_collection_off() -> None:
    result = _load_settings({"TANDEM_GC_THRESHOLD": "0"})
    assert result.returncode != 0
    assert "TANDEM_GC_THRESHOLD" in result.stderr


def test_signup_is_open_on_the_quick_start_and_closed_in_production() -> None:
    show = "settings.TANDEM_ALLOW_SIGNUP"
    production = {"DEBUG": "0", "SECRET_KEY": "x" * 50}
    assert _load_settings({}, show).stdout.split() == ["True"]
    assert _load_settings(production, show).stdout.split() == ["False"]
    opened = _load_settings({**production, "TANDEM_ALLOW_SIGNUP": "1"}, show)
    assert opened.stdout.split() == ["True"], opened.stderr


def test_hsts_preload_is_an_explicit_opt_in() -> None:
    show = "settings.SECURE_HSTS_SECONDS, settings.SECURE_HSTS_PRELOAD"
    production = {"DEBUG": "0", "SECRET_KEY": "x" * 50}
    assert _load_settings(production, show).stdout.split() == ["31536000", "False"]
    opted_in = _load_settings({**production, "TANDEM_HSTS_PRELOAD": "1"}, show)
    assert opted_in.stdout.split() == ["31536000", "True"], opted_in.stderr


@pytest.mark.parametrize(
    "value",
    [
        "https://x   # comment",
        "https://app.example.com/",
        "https://app.example.com/path",
        "app.example.com",
        "ftp://app.example.com",
        "https://user@app.example.com",
        "https://app.example.com?x=1",
        "*",
        "https://ok.example.com, https://bad example.com",
    ],
)
def test_allowed_origins_must_be_bare_origins(value: str) -> None:
    result = _load_settings({"TANDEM_ALLOWED_ORIGINS": value})
    assert result.returncode != 0
    assert "TANDEM_ALLOWED_ORIGINS" in result.stderr and "is not an origin" in result.stderr


def test_allowed_origins_accept_scheme_host_and_port() -> None:
    value = "https://App.Example.com, http://127.0.0.1:8080,http://[::1]:3000"
    result = _load_settings({"TANDEM_ALLOWED_ORIGINS": value}, "settings.TANDEM_ALLOWED_ORIGINS, settings.CSRF_TRUSTED_ORIGINS")
    assert result.returncode == 0, result.stderr
    expected = ["https://app.example.com", "http://127.0.0.1:8080", "http://[::1]:3000"]
    assert result.stdout.strip() == f"{expected} {expected}"


def test_sign_in_is_throttled_by_default() -> None:
    result = _load_settings({}, "settings.TANDEM_RATE_AUTH_IP, settings.TANDEM_RATE_AUTH_USER, settings.TANDEM_RATE_TICKET")
    assert result.stdout.split() == ["60/min", "10/min", "120/min"], result.stderr


_EMAIL_SHOW = "settings.EMAIL_BACKEND.rsplit('.', 2)[1], settings.TANDEM_EMAIL_BACKEND"
_SMTP = {
    "TANDEM_EMAIL_BACKEND": "smtp", "TANDEM_EMAIL_HOST": "mail.example.org",
    "TANDEM_EMAIL_FROM": "Tandem <tandem@example.org>",
}


def test_email_is_printed_on_the_quick_start_and_off_where_logs_are_production_style() -> None:
    production = {"DEBUG": "0", "SECRET_KEY": "x" * 50}
    assert _load_settings({}, _EMAIL_SHOW).stdout.split() == ["console", "console"]
    assert _load_settings(production, _EMAIL_SHOW).stdout.split() == ["dummy", "none"]
    json_logs = _load_settings({"TANDEM_LOG_FORMAT": "json"}, _EMAIL_SHOW)
    assert json_logs.stdout.split() == ["dummy", "none"], json_logs.stderr


@pytest.mark.parametrize("env", [
    {"DEBUG": "0", "SECRET_KEY": "x" * 50, "TANDEM_EMAIL_BACKEND": "console"},
    {"TANDEM_LOG_FORMAT": "json", "TANDEM_EMAIL_BACKEND": "console"},
])
def test_printing_reset_links_into_production_logs_is_refused(env: dict[str, str]) -> None:
    result = _load_settings(env, _EMAIL_SHOW)
    assert result.returncode != 0
    assert "TANDEM_EMAIL_BACKEND=console" in result.stderr and "quick start" in result.stderr


def test_smtp_reads_host_port_login_security_sender_and_timeout(tmp_path: Path) -> None:
    secret = tmp_path / "mail-password"
    secret.write_text("s3cret\n")
    show = (
        "settings.EMAIL_BACKEND, settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_HOST_USER, "
        "settings.EMAIL_HOST_PASSWORD, settings.EMAIL_USE_TLS, settings.EMAIL_USE_SSL, settings.EMAIL_TIMEOUT, "
        "repr(settings.DEFAULT_FROM_EMAIL)"
    )
    result = _load_settings({
        **_SMTP, "DEBUG": "0", "SECRET_KEY": "x" * 50, "TANDEM_EMAIL_PORT": "465",
        "TANDEM_EMAIL_SECURITY": "tls", "TANDEM_EMAIL_USER": "tandem",
        "TANDEM_EMAIL_PASSWORD_FILE": str(secret), "TANDEM_EMAIL_TIMEOUT": "4",
    }, show)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(maxsplit=8) == [
        "django.core.mail.backends.smtp.EmailBackend", "mail.example.org", "465", "tandem", "s3cret",
        "False", "True", "4.0", "'Tandem <tandem@example.org>'\n",
    ]
    # STARTTLS on 587 unless told otherwise, and a timeout even when none is given.
    defaults = _load_settings(_SMTP, "settings.EMAIL_PORT, settings.EMAIL_USE_TLS, settings.EMAIL_USE_SSL, settings.EMAIL_TIMEOUT")
    assert defaults.stdout.split() == ["587", "True", "False", "10.0"], defaults.stderr


@pytest.mark.parametrize("env, named", [
    ({"TANDEM_EMAIL_BACKEND": "sendmail"}, "TANDEM_EMAIL_BACKEND"),
    ({"TANDEM_EMAIL_BACKEND": "smtp", "TANDEM_EMAIL_FROM": "t@example.org"}, "TANDEM_EMAIL_HOST"),
    ({"TANDEM_EMAIL_BACKEND": "smtp", "TANDEM_EMAIL_HOST": "mail.example.org"}, "TANDEM_EMAIL_FROM"),
    ({**_SMTP, "TANDEM_EMAIL_PORT": "smtp"}, "TANDEM_EMAIL_PORT"),
    ({**_SMTP, "TANDEM_EMAIL_PORT": "0"}, "TANDEM_EMAIL_PORT"),
    ({**_SMTP, "TANDEM_EMAIL_PORT": "70000"}, "TANDEM_EMAIL_PORT"),
    ({**_SMTP, "TANDEM_EMAIL_SECURITY": "ssl"}, "TANDEM_EMAIL_SECURITY"),
    ({**_SMTP, "TANDEM_EMAIL_TIMEOUT": "0"}, "TANDEM_EMAIL_TIMEOUT"),
    ({**_SMTP, "TANDEM_EMAIL_FROM": "tandem"}, "TANDEM_EMAIL_FROM"),
    ({**_SMTP, "TANDEM_EMAIL_PASSWORD": "s3cret"}, "TANDEM_EMAIL_USER"),
    ({**_SMTP, "TANDEM_EMAIL_PASSWORD": "a", "TANDEM_EMAIL_PASSWORD_FILE": "/etc/x"}, "TANDEM_EMAIL_PASSWORD"),
    ({**_SMTP, "TANDEM_EMAIL_PASSWORD_FILE": "/nonexistent/mail-password"}, "TANDEM_EMAIL_PASSWORD_FILE"),
])
def test_bad_email_settings_stop_the_process(env: dict[str, str], named: str) -> None:
    result = _load_settings(env, _EMAIL_SHOW)
    assert result.returncode != 0
    assert named in result.stderr and "ImproperlyConfigured" in result.stderr


def test_log_lines_never_carry_a_password_reset_token() -> None:
    from project.logfilters import redact

    line = "GET /accounts/reset/MQ/cz9k1a-4f1d2b3c4d5e6f708192a3b4c5d6e7f8/ 302 3ms"
    assert redact(line) == "GET /accounts/reset/MQ/[redacted]/ 302 3ms"
    # Django's next step holds no secret and stays readable.
    assert redact("GET /accounts/reset/MQ/set-password/ 200") == "GET /accounts/reset/MQ/set-password/ 200"
