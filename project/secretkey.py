"""The quick start's SECRET_KEY: random per installation, made on first run and kept
outside the repository, so no key that signs sessions, JWTs and stream tickets is ever
published with the code. Production sets SECRET_KEY or SECRET_KEY_FILE instead (the
settings refuse to start without one when DEBUG is off, and never come here).

The settings module imports it, so nothing here reads Django settings."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

PATH_VARIABLE = "TANDEM_SECRET_KEY_PATH"


def quickstart_key_path() -> Path:
    """``$TANDEM_SECRET_KEY_PATH``, else ``$XDG_STATE_HOME/tandem/secret_key``, else
    ``~/.local/state/tandem/secret_key``."""
    explicit = os.environ.get(PATH_VARIABLE, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME", "").strip()
    base = Path(state) if state else Path.home() / ".local" / "state"
    return base / "tandem" / "secret_key"


def quickstart_key() -> str:
    """The key at ``quickstart_key_path()``, created (mode 0600) if there is none yet."""
    path = quickstart_key_path()
    try:
        try:
            return _read(path)
        except FileNotFoundError:
            return _create(path)
    except OSError as exc:
        raise ImproperlyConfigured(
            f"Cannot read or create the quick start's secret key at {path} ({exc.strerror}): "
            f"set SECRET_KEY, SECRET_KEY_FILE or {PATH_VARIABLE}"
        ) from None


def _read(path: Path) -> str:
    key = path.read_text().strip()
    if len(key) < 32:
        raise ImproperlyConfigured(f"{path} holds no usable secret key: delete it to make a new one")
    return key


def _create(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(50) + "\n")
        try:
            # link() never replaces: of several processes starting at once (a test run,
            # two servers) the first one's key wins and every one reads that.
            os.link(temp, path)
        except FileExistsError:
            pass
    finally:
        temp.unlink(missing_ok=True)
    return _read(path)
