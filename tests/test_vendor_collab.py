"""The shared document editor's bundle (static/vendor/collab/) is what its recorded build
makes: rebuilt from scripts/collab/package-lock.json, it is byte for byte the committed one."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "static" / "vendor" / "collab"
BUILD = ROOT / "scripts" / "collab"
OUTPUTS = ("collab.js", "VERSIONS.txt", "LICENSES.txt")


def test_rebuilding_the_bundle_gives_the_committed_files(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None or not (BUILD / "node_modules").is_dir():
        pytest.fail("Node and scripts/collab/node_modules are required (scripts/test.sh runs npm ci there)")
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-collab.sh"), str(tmp_path)],
        env={"PATH": str(Path(node).parent) + ":/usr/bin:/bin", "COLLAB_SKIP_NPM_CI": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in OUTPUTS:
        assert (tmp_path / name).read_bytes() == (VENDOR / name).read_bytes(), (
            f"static/vendor/collab/{name} is not what scripts/build-collab.sh makes: rebuild and commit it")


def test_the_installed_packages_are_the_locked_ones() -> None:
    # The rebuild above proves nothing if node_modules drifted from package-lock.json.
    lock = json.loads((BUILD / "package-lock.json").read_text())
    for path, entry in lock["packages"].items():
        if not path or entry.get("optional"):
            continue
        installed = json.loads((BUILD / path / "package.json").read_text())
        assert installed["version"] == entry["version"], path


def test_every_direct_dependency_is_pinned_exactly() -> None:
    package = json.loads((BUILD / "package.json").read_text())
    pins = {**package["dependencies"], **package["devDependencies"]}
    loose = {name: spec for name, spec in pins.items() if not spec[0].isdigit()}
    assert loose == {}


def test_the_bundle_names_each_library_the_editor_needs_with_its_licence() -> None:
    versions = {line.split()[0]: line.split()[1:] for line in (VENDOR / "VERSIONS.txt").read_text().splitlines()
                if line and not line.startswith("#")}
    licences = (VENDOR / "LICENSES.txt").read_text()
    for name in ("codemirror", "@codemirror/lang-markdown", "yjs", "y-codemirror.next", "y-websocket", "y-protocols"):
        assert name in versions
        assert f"{name} {versions[name][0]} (" in licences
    assert set(versions) == {line.split("\n")[0].split(" ")[0] for line in licences.split("=" * 72 + "\n")[1::2]}
