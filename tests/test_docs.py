"""The docs hold together: links resolve, every ``serve`` flag and config key is documented as the
code declares it, the README stays short."""

from __future__ import annotations

import argparse
import difflib
import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from canary_proxy.cli.main import build_parser
from canary_proxy.config import reference_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOC_PAGES]
# The README is the front door; the reference is in docs/, one page per topic.
README_MAX_BYTES = 12_000

# [text](target) and ![alt](target), with an optional "title"; the text may hold `code`.
LINK = re.compile(r"!?\[(?:[^\[\]]|`[^`]*`)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def prose_lines(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a ``# comment`` in a block is no heading)."""
    lines, fence = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.lstrip()
        if fence:
            if stripped.startswith(fence):
                fence = ""
        elif stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        else:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            found.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return found


def relative_links(path: Path) -> list[str]:
    targets = []
    for line in prose_lines(path):
        targets += LINK.findall(CODE_SPAN.sub("``", line))
    return [t for t in targets if not urlsplit(t).scheme and not t.startswith("//")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        file_part, _, fragment = target.partition("#")
        resolved = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (resolved.suffix != ".md" or unquote(fragment) not in anchors(resolved)):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in relative_links(README)}
    missing = [p.name for p in DOC_PAGES if p.resolve() not in linked]
    assert not missing, f"docs pages the README's map does not link: {missing}"


def serve_flags() -> list[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    return sorted(flags - {"-h", "--help"})


@pytest.mark.parametrize("flag", serve_flags())
def test_every_serve_flag_is_documented(flag: str) -> None:
    docs = "\n".join(page.read_text(encoding="utf-8") for page in DOC_PAGES)
    whole_flag = rf"(?<![\w-]){re.escape(flag)}(?![\w-])"  # --config is not --configmap
    assert re.search(whole_flag, docs), f"serve {flag} appears in no docs/*.md page"


def table_at(path: Path, header: str) -> list[str]:
    """The rows of the table that starts with ``header``: up to the first line that is no row."""
    lines = prose_lines(path)
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_config_key_table_is_the_declared_keys() -> None:
    """Every key, its meaning and its default, in order, as canary_proxy/config.py declares them."""
    declared = reference_table().splitlines()
    documented = table_at(ROOT / "docs" / "configuration.md", declared[0])
    diff = "\n".join(difflib.unified_diff(documented, declared, "docs", "declared", lineterm=""))
    assert documented == declared, (
        "docs/configuration.md's key table differs from the keys declared in canary_proxy/config.py; "
        f"replace it with the output of canary_proxy.config.reference_table():\n{diff}"
    )


def test_readme_is_a_front_door() -> None:
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move reference text to docs/"
