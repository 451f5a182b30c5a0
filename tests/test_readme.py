"""README.md and images/README.md: the generated config table, make targets, links and anchors."""

import re
from pathlib import Path

import pytest

from facenet_kfp.config import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "images/README.md"]
TABLE_START, TABLE_END = "<!-- config-table:start -->\n", "<!-- config-table:end -->"
# Text that points outside the repository, or describes the machine a document was written on.
FOREIGN = ["REFERENCE.md", "../shared", "/work/", "these development machines", "development machine",
           "these machines"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """`text` without its fenced code blocks (where `# comment` lines are not headings)."""
    return FENCE.sub("", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    found: set[str] = set()
    for line in prose(path.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            candidate, n = slug, 0
            while candidate in found:
                n += 1
                candidate = f"{slug}-{n}"
            found.add(candidate)
    return found


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", (ROOT / "Makefile").read_text(), re.M))


def test_config_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1, "config-table markers missing or repeated"
    table = text[text.index(TABLE_START) + len(TABLE_START):text.index(TABLE_END)]
    assert table == markdown_table(), ("README.md's configuration table is stale: put the output of "
                                       "`.venv/bin/python -m facenet_kfp.config` between the config-table markers")


def test_anchor_slugs_follow_github():
    assert {"operators-guide", "make-test-containers", "for-users"} <= anchors(ROOT / "README.md") | anchors(
        ROOT / "images/README.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_target_mentioned_exists(doc):
    mentioned = set(re.findall(r"\bmake ([a-z][a-z0-9-]*)", doc.read_text()))
    assert mentioned, f"{doc.name} mentions no make target"
    missing = sorted(mentioned - make_targets())
    assert not missing, f"{doc.relative_to(ROOT)} mentions make targets the Makefile lacks: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_outside_the_repository(doc):
    text = doc.read_text()
    found = [phrase for phrase in FOREIGN if phrase.lower() in text.lower()]
    assert not found, f"{doc.relative_to(ROOT)} refers to {found}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve_inside_the_repository(doc):
    links = LINK.findall(prose(doc.read_text()))
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.is_relative_to(ROOT), f"{doc.name}: link {link!r} leaves the repository"
        assert path.exists(), f"{doc.name}: link {link!r}: {path.relative_to(ROOT)} does not exist"
        if anchor:
            assert anchor in anchors(path), f"{doc.name}: link {link!r}: no heading with anchor #{anchor}"
