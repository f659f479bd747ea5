"""The repository's documentation stands on its own.

- No tracked text file cites the team's behaviour reference, a file outside the repository that a
  user's clone does not have: comments and pages cite ``docs/`` instead (docs/Method.md).
- Every relative link of README.md and the pages under docs/ reaches an existing file, and its
  ``#anchor``, when it names one, exists on that page (a heading's GitHub anchor or an explicit
  ``<a id="...">``).
- Every page of ``docs/`` (and its anchor) that a comment, docstring or script cites exists too.
- Every test a page names (``tests/x.py::test_y``, or ``::test_y`` after a file on the same line)
  exists, so the list of differences (docs/Differences.md) cannot point at a renamed test.
"""
from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Spelled in two pieces so that this file does not match its own pattern.
OUTSIDE_REFERENCE = re.compile(r"\b" + "SP" + r"EC\b")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CITED_TEST = re.compile(r"(tests/[A-Za-z0-9_/]+\.py)|::(\w+)")
CITED_PAGE = re.compile(r"\bdocs/([A-Za-z0-9_/.-]+\.md)(?:#([A-Za-z0-9_-]+))?")


def tracked_files() -> list[pathlib.Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    return [REPO / name for name in out.decode("utf-8").split("\0") if name]


def read_text(path: pathlib.Path) -> str | None:
    """The file's text, or None for a binary (or missing) file."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def prose_lines(text: str):
    """(line number, line) of a markdown text outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()            # inline HTML dropped
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    """Every anchor of a markdown page: its headings' (with GitHub's -1, -2 for repeats) and its
    explicit ``<a id>`` / ``<a name>`` ones."""
    text = read_text(page) or ""
    found: set[str] = set(EXPLICIT_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            k = seen.get(slug, 0)
            seen[slug] = k + 1
            found.add(slug if k == 0 else f"{slug}-{k}")
    return found


def doc_pages() -> list[pathlib.Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))


def test_no_tracked_file_cites_the_outside_reference():
    hits = []
    for path in tracked_files():
        text = read_text(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "cite docs/ (e.g. docs/Method.md#...) instead:\n" + "\n".join(hits)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_a_file_and_its_anchor(page):
    text = read_text(page)
    assert text is not None, f"{page} is not UTF-8 text"
    broken = []
    for n, line in prose_lines(text):
        line = re.sub(r"`[^`]*`", "", line)  # inline code holds no links
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"line {n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"line {n}: {target} (no anchor #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_cited_doc_pages_and_anchors_exist():
    broken = []
    for path in tracked_files():
        text = read_text(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for page, anchor in CITED_PAGE.findall(line):
                dest = REPO / "docs" / page
                if not dest.is_file():
                    broken.append(f"{path.relative_to(REPO)}:{n}: docs/{page} does not exist")
                elif anchor and anchor not in anchors(dest):
                    broken.append(f"{path.relative_to(REPO)}:{n}: docs/{page} has no anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_github_slug_examples():
    assert github_slug("Metrics (exact definitions)") == "metrics-exact-definitions"
    assert github_slug("Answering — `python -m stllava.eval.model_vqa`") == "answering--python--m-stllavaevalmodel_vqa"
    assert github_slug("Differences from the published training, and their switches") == \
        "differences-from-the-published-training-and-their-switches"


def test_tests_named_by_the_pages_exist():
    missing = []
    for page in doc_pages():
        for n, line in prose_lines(read_text(page) or ""):
            current = None
            for path, name in CITED_TEST.findall(line):
                if path:
                    current = REPO / path
                    if not current.is_file():
                        missing.append(f"{page.relative_to(REPO)}:{n}: {path} does not exist")
                        current = None
                elif current is not None and not re.search(rf"^\s*(async\s+)?def {name}\(",
                                                          current.read_text(encoding="utf-8"), re.M):
                    missing.append(f"{page.relative_to(REPO)}:{n}: {current.relative_to(REPO)} has no {name}")
    assert not missing, "\n".join(missing)
