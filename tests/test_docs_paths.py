"""Every file README.md and docs/*.md cite exists in this repository, and none of them
points outside it (issue 10, item 25): a reader of a checkout has nothing else."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\n]+)`")
# A repository path in a code span: no spaces, not a URL or an absolute path.
PATHLIKE = re.compile(r"(?:\.{1,2}/)?[\w.*-]+(?:/[\w.*{}-]+)*/?")
DOC_NAME = re.compile(r"[\w-]+\.md")


def top_level() -> set[str]:
    return {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}


def _exists(path: Path) -> bool:
    return path.exists() or bool(glob.glob(str(path)))


def cited_paths(doc: Path) -> list[tuple[str, Path]]:
    """(as written, resolved) for every link target and every code span that names a
    file or folder of the repository."""
    text = doc.read_text()
    found: list[tuple[str, Path]] = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, mailto:, or an anchor on the same page
        target = target.split("#", 1)[0]
        base = ROOT if target.startswith("/") else doc.parent
        found.append((target, (base / target.lstrip("/")).resolve()))
    roots = top_level()
    for span in CODE.findall(text):
        span = span.split("::", 1)[0].strip()
        if not PATHLIKE.fullmatch(span):
            continue
        if span.startswith("../"):
            found.append((span, (doc.parent / span).resolve()))
        elif span.split("/", 1)[0] in roots and ("/" in span or "." in span):
            found.append((span, ROOT / span))
        elif DOC_NAME.fullmatch(span):  # a page named on its own: beside this one, or at the top
            beside = doc.parent / span
            found.append((span, beside if beside.exists() else ROOT / span))
    return found


def plain_mentions(doc: Path) -> list[str]:
    """Outside code spans too: a path into the shared folder outside the repository, or
    a page name (``X.md``) that is no file of the repository."""
    text = doc.read_text()
    names = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts and "node_modules" not in p.parts}
    bad = re.findall(r"\bshared/(?:spec|bench)\b[\w./-]*", text)
    bad += [name for name in set(re.findall(r"\b[A-Z][A-Z0-9_-]+\.md\b", text)) if name not in names]
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_doc_cites_exists_inside_the_repository(doc: Path) -> None:
    problems = []
    for written, resolved in cited_paths(doc):
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{written!r} points outside the repository")
        elif not _exists(resolved):
            problems.append(f"{written!r} does not exist")
    problems += [f"{name!r} is not in the repository" for name in plain_mentions(doc)]
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(sorted(set(problems)))


def test_the_scanner_sees_links_and_code_spans() -> None:
    """Not vacuous: both ways of citing a file are found."""
    assert "docs/API.md" in {written for written, _ in cited_paths(ROOT / "README.md")}  # a link
    cited = {written for written, _ in cited_paths(ROOT / "docs" / "API.md")}
    assert any(w.startswith(("project/", "events_app/", "sessions_app/")) for w in cited), cited  # code spans
