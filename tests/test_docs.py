"""README.md and docs/*.md: README stays a short map, links resolve, no development history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
ALL_DOCS = [README, *DOCS]
README_MAX_LINES = 250

# [text](target) or [text](target "title"); images too. Inline code is removed first.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
COMMIT_ID = re.compile(r"\b(?:at|commit|run at)\s+[0-9a-f]{7,40}\b")
ISSUE = re.compile(r"\bissues?\s+#?\d+\b|(?<![\w&/])#\d+\b", re.I)


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _prose(path: Path) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    return INLINE_CODE.sub("", CODE_BLOCK.sub("", path.read_text()))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = CODE_BLOCK.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_docs_exist() -> None:
    assert README.is_file()
    assert DOCS, "docs/*.md is empty"


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", ALL_DOCS, ids=_ids(ALL_DOCS))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("path", ALL_DOCS, ids=_ids(ALL_DOCS))
def test_no_development_history(path: Path) -> None:
    text = path.read_text()
    found = [m.group(0) for m in COMMIT_ID.finditer(text)]
    found += [m.group(0) for m in ISSUE.finditer(text)]
    assert not found, f"{path.relative_to(ROOT)} names commits or issues: {found}"


def test_the_checks_catch_what_they_should() -> None:
    assert COMMIT_ID.search("measured at 1a2b3c4 on")
    assert COMMIT_ID.search("commit 9d4a8fd0")
    assert not COMMIT_ID.search("VtepMAC 0e:66:78:00:00:01 at 0xCAFE4A11")
    assert not COMMIT_ID.search("look at deadline")  # not hex
    assert ISSUE.search("see issue 6") and ISSUE.search("fixed in #12")
    assert not ISSUE.search("`-n<i>` with <i+1> and 1 & 2")
    assert _slug("How the packet path works") == "how-the-packet-path-works"
    assert _slug("`flannel-xdp agent` flags") == "flannel-xdp-agent-flags"
    assert LINK.findall('[a](docs/x.md#y) and [b](http://e) [c](p.md "t")') == [
        "docs/x.md#y",
        "http://e",
        "p.md",
    ]
