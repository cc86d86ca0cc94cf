"""The documentation holds together: every relative link and #anchor in README.md,
CHANGELOG.md and docs/*.md resolves, and the changelog's newest version is the one
pyproject.toml declares (the one `execq --version` prints)."""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target), with an optional "title"; not inside inline code.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped
    (hyphens and underscores kept), spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page has: its headings' slugs (repeats get -1, -2, …) and HTML ids."""
    seen: Counter[str] = Counter()
    found: set[str] = set()
    for line in prose_lines(page.read_text()):
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(page: Path) -> list[str]:
    """The link targets of a page's prose (code blocks and inline code left out)."""
    targets: list[str] = []
    for line in prose_lines(page.read_text()):
        targets.extend(LINK.findall(INLINE_CODE.sub("", line)))
    return targets


def test_slugs_are_githubs() -> None:
    assert slug("Compensation, rollback and sagas") == "compensation-rollback-and-sagas"
    assert slug("`disk_mb`: all a command may write") == "disk_mb-all-a-command-may-write"
    assert slug("Do not set `min-replicas-to-write` on the broker") == (
        "do-not-set-min-replicas-to-write-on-the-broker"
    )
    assert slug("[0.7.0] - Unreleased") == "070---unreleased"
    assert slug("The JSON-lines file: heads, checkpoints and rotation") == (
        "the-json-lines-file-heads-checkpoints-and-rotation"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken: list[str] = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …
            continue
        path_part, _, fragment = target.partition("#")
        linked = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: {linked.relative_to(ROOT)} does not exist")
            continue
        if fragment and linked.suffix == ".md" and unquote(fragment) not in anchors(linked):
            broken.append(f"{target}: no heading with the anchor #{fragment} in {linked.name}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {
        (ROOT / t.partition("#")[0]).resolve()
        for t in links(ROOT / "README.md")
        if not t.startswith("#")
    }
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p not in linked]
    assert not missing, f"docs pages the README's list does not link: {missing}"


def test_changelog_newest_version_is_the_one_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    versions = re.findall(
        r"^## \[(\d+\.\d+\.\d+[^\]]*)\]", (ROOT / "CHANGELOG.md").read_text(), re.M
    )
    assert versions, "CHANGELOG.md has no `## [X.Y.Z]` heading"
    assert versions[0] == declared, (
        f"CHANGELOG.md's newest entry is {versions[0]}, pyproject.toml declares {declared}"
    )
