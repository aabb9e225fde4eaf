"""``constraints.txt`` (README, "Both scripts install with -c constraints.txt") pins every
package a fresh clone installs. pip ignores a constraint it is not asked for and installs
an unlisted package unpinned, so a requirement added to pyproject.toml without
regenerating the file would silently install whatever is newest: each package the
project needs, directly or through another, must be pinned there, to a version
pyproject.toml allows."""
from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = {str(key): str(value) for key, value in default_environment().items()}
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in extras or {""})


def _needed() -> dict[str, list[Requirement]]:
    """Every package tandem[test] needs on this Python, with the requirements naming it:
    pyproject.toml's own, then those of the installed packages, transitively."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    needed: dict[str, list[Requirement]] = {}
    walked: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        needed.setdefault(name, []).append(req)
        key = (name, frozenset(req.extras))
        if key in walked:
            continue
        walked.add(key)
        for line in importlib.metadata.distribution(req.name).requires or []:
            sub = Requirement(line)
            if _applies(sub, set(req.extras)):
                todo.append(sub)
    return needed


def test_every_package_the_project_needs_is_pinned_to_a_version_it_allows() -> None:
    pins = _pins()
    needed = _needed()
    assert "tandem" not in pins  # the project itself is installed from the clone
    missing = sorted(set(needed) - set(pins))
    assert not missing, f"not in constraints.txt (regenerate it, README): {missing}"
    refused = {
        name: (str(pins[name]), [str(r) for r in reqs if not r.specifier.contains(pins[name], prereleases=True)])
        for name, reqs in needed.items()
    }
    assert {k: v for k, v in refused.items() if v[1]} == {}


def test_the_pins_are_what_the_suite_runs_with() -> None:
    # The file is a freeze of the environment the suite passed in; a pin that differs from
    # what is installed here was not tested.
    pins = _pins()
    installed = {
        name: Version(importlib.metadata.version(name)) for name in _needed()
    }
    assert {n: str(v) for n, v in installed.items() if pins.get(n) != v} == {}
