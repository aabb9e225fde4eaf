"""Where ``tandem login`` keeps the server URL, the username and the refresh token."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    url: str
    username: str
    refresh: str


def config_dir() -> Path:
    """``$TANDEM_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/tandem``, else ``~/.config/tandem``."""
    if os.environ.get("TANDEM_CONFIG_DIR"):
        return Path(os.environ["TANDEM_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tandem"


def config_path() -> Path:
    return config_dir() / "config.json"


def load() -> Config | None:
    """The saved login, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(config_path().read_text())
        return Config(url=str(data["url"]), username=str(data["username"]), refresh=str(data["refresh"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(config: Config) -> Path:
    """Write atomically with mode 0600: the refresh token is a 7-day credential."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")  # created 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(config), handle, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
