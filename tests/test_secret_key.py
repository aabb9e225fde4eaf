"""No SECRET_KEY is published with the code (issue 10, item 8): the quick start makes a
random key per installation on first run, outside the repository; production without a
key does not start."""
from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from django.core import signing
from rest_framework_simplejwt.tokens import AccessToken

from tests.conftest import PASSWORD, ROOT, start_server

pytestmark = [pytest.mark.slow]

# The key project/settings.py used when SECRET_KEY was unset, published in the repository
# until issue 10: every quick-start installation signed with it.
PUBLISHED_KEY = "dev-only-insecure-key-change-me-in-production-0123456789"


def _forged_jwt(user: Any) -> str:
    payload = dict(AccessToken.for_user(user).payload)
    return jwt.encode(payload, PUBLISHED_KEY, algorithm="HS256")


def _forged_ticket(user: Any) -> str:
    return signing.TimestampSigner(key=PUBLISHED_KEY, salt="tandem.stream-ticket").sign(str(user.pk))


def _quick_start(tmp_path: Path, key_path: Path) -> Any:
    # As scripts/run.sh runs it: DEBUG on, no SECRET_KEY anywhere in the environment.
    return start_server(
        {"DEBUG": "1", "SECRET_KEY": "", "SECRET_KEY_FILE": "", "TANDEM_SECRET_KEY_PATH": str(key_path)},
        tmp_path, name="quickstart",
    )


def test_quick_start_refuses_tokens_and_tickets_signed_with_the_published_key(
    transactional_db: None, alice: Any, tmp_path: Path
) -> None:
    key_path = tmp_path / "state" / "tandem" / "secret_key"
    server = _quick_start(tmp_path, key_path)
    try:
        bearer = {"Authorization": f"Bearer {_forged_jwt(alice)}"}
        refused = httpx.get(f"{server.url}/api/sessions/", headers=bearer, timeout=10)
        assert refused.status_code == 401, refused.text
        refused = httpx.get(f"{server.url}/api/stream/", params={"ticket": _forged_ticket(alice)}, timeout=10)
        assert refused.status_code == 401, refused.text

        # The installation's own key works, and it was made for this installation only.
        login = httpx.post(
            f"{server.url}/api/auth/token/", json={"username": "alice", "password": PASSWORD}, timeout=10
        )
        access = login.json()["access"]
        assert httpx.get(f"{server.url}/api/sessions/", headers={"Authorization": f"Bearer {access}"}).status_code == 200
        key = key_path.read_text().strip()
        assert len(key) >= 50 and key != PUBLISHED_KEY
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        assert not key_path.resolve().is_relative_to(ROOT)
    finally:
        server.stop()

    # The next start reads the same key: tokens issued before a restart stay valid.
    again = _quick_start(tmp_path, key_path)
    try:
        kept = httpx.get(f"{again.url}/api/sessions/", headers={"Authorization": f"Bearer {access}"}, timeout=10)
        assert kept.status_code == 200, kept.text
    finally:
        again.stop()


def _settings_process(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "project.settings", **env},
    )


def test_production_without_a_key_refuses_to_start_and_writes_nothing(tmp_path: Path) -> None:
    key_path = tmp_path / "secret_key"
    result = _settings_process({"DEBUG": "0", "TANDEM_SECRET_KEY_PATH": str(key_path), "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off" in result.stderr
    assert not key_path.exists() and not (tmp_path / ".local").exists()


def test_production_reads_the_key_from_secret_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k" * 60 + "\n")
    result = _settings_process({"DEBUG": "0", "SECRET_KEY_FILE": str(key_file)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "k" * 60
    missing = _settings_process({"DEBUG": "0", "SECRET_KEY_FILE": str(tmp_path / "nope")})
    assert missing.returncode != 0 and "SECRET_KEY_FILE" in missing.stderr


def test_quick_start_key_lives_under_xdg_state_home_by_default(tmp_path: Path) -> None:
    first = _settings_process({"XDG_STATE_HOME": str(tmp_path)})
    second = _settings_process({"XDG_STATE_HOME": str(tmp_path)})
    assert first.returncode == 0, first.stderr
    key = (tmp_path / "tandem" / "secret_key").read_text().strip()
    assert first.stdout.strip() == second.stdout.strip() == key
    other = _settings_process({"XDG_STATE_HOME": str(tmp_path / "elsewhere")})
    assert other.stdout.strip() != key  # per installation, not per release


def test_a_fresh_checkout_in_ci_gets_a_key_under_home(tmp_path: Path) -> None:
    # CI: a fresh clone, no XDG variables, only HOME (and CI=true).
    result = _settings_process({"HOME": str(tmp_path), "CI": "true"})
    assert result.returncode == 0, result.stderr
    key_path = tmp_path / ".local" / "state" / "tandem" / "secret_key"
    assert result.stdout.strip() == key_path.read_text().strip()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_an_unwritable_state_directory_stops_the_quick_start_with_a_clear_message(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    result = _settings_process({"TANDEM_SECRET_KEY_PATH": str(blocked / "secret_key")})
    assert result.returncode != 0
    assert "Cannot read or create the quick start's secret key" in result.stderr and "SECRET_KEY" in result.stderr
