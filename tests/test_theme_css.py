"""The stylesheet themes through custom properties only: every literal colour is in the
``:root`` (light) or ``:root[data-theme="dark"]`` block, and each property of one has a
value in the other, so a rule added anywhere (by any page) follows the theme."""
from __future__ import annotations

import re
from pathlib import Path

CSS = (Path(__file__).resolve().parent.parent / "static" / "css" / "tandem.css").read_text()
COLOUR = re.compile(r"#[0-9a-fA-F]{3,8}\b|\brgba?\(|\bhsla?\(|(?<![\w-])(white|black)(?![\w-])")


def block(selector: str) -> str:
    match = re.search(re.escape(selector) + r"\s*\{(.*?)\n\}", CSS, re.S)
    assert match, f"no {selector} block"
    return match.group(1)


def properties(body: str) -> set[str]:
    return set(re.findall(r"(--[\w-]+)\s*:", body))


def test_literal_colours_live_only_in_the_theme_blocks() -> None:
    rest = CSS.replace(block(":root"), "").replace(block(':root[data-theme="dark"]'), "")
    rest = re.sub(r"/\*.*?\*/", "", rest, flags=re.S)
    assert COLOUR.findall(rest) == []


def test_every_colour_property_has_a_dark_value() -> None:
    light = {p for p in properties(block(":root")) if COLOUR.search(block(":root").split(p + ":", 1)[1].split(";", 1)[0])}
    missing = light - properties(block(':root[data-theme="dark"]')) - {"--avatar-text"}
    assert missing == set()
