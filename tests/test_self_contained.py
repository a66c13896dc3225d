"""The repository documents itself: no tracked file points at a document that is not in it, and every section that
code, tests and docs cite in the methods reference (``docs/methods.md`` followed by a section sign and a number)
is a heading there."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"

# Built from parts so that this file does not name them itself.
OUTSIDE = (*(stem + ".md" for stem in ("METHODS", "FINDINGS", "STYLE", "ASSETS")), "../" + "shared")

SECTION = r"§(\d+(?:\.\d+)*)"
# "docs/methods.md §3.4", "docs/methods.md §3.4–§3.7", "docs/methods.md §4.3, §5.6", "docs/methods.md §2.3 and §2.4"
CITATION = re.compile(r"docs/methods\.md((?:\s*(?:[,;–-]|and|or)?\s*" + SECTION + r")+)")
HEADING = re.compile(r"^#{1,6} " + SECTION.removeprefix("§") + r"\s", re.MULTILINE)


def _tracked_texts() -> dict[str, str]:
    """Every tracked file's text (undecodable bytes replaced), keyed by its path in the repository."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    texts = {}
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if path.is_file():
            texts[name] = path.read_bytes().decode("utf-8", errors="replace")
    return texts


def _headings() -> set[str]:
    return set(HEADING.findall(METHODS_DOC.read_text(encoding="utf-8")))


def test_no_tracked_file_names_a_document_outside_the_repository():
    hits = [f"{name}:{text.count(target)}× {target}" for name, text in _tracked_texts().items()
            for target in OUTSIDE if target in text]
    assert not hits, ("tracked files cite documents that are not in the repository; cite docs/methods.md, "
                      f"docs/data.md, docs/patches.md or ARCHITECTURE.md instead, or state the fact: {hits}")


def test_methods_reference_has_numbered_unique_sections():
    numbers = HEADING.findall(METHODS_DOC.read_text(encoding="utf-8"))
    assert len(numbers) == len(set(numbers)), f"duplicate section numbers in docs/methods.md: {sorted(numbers)}"
    assert {"2.1", "3.1", "3.8", "4.3", "5.8"} <= set(numbers)


def test_every_cited_methods_section_exists():
    headings = _headings()
    cited: dict[str, list[str]] = {}
    for name, text in _tracked_texts().items():
        for match in CITATION.finditer(text):
            for number in re.findall(SECTION, match.group(1)):
                cited.setdefault(number, []).append(name)
    assert cited, "no file cites docs/methods.md; the citation pattern no longer matches"
    missing = {number: sorted(set(names)) for number, names in cited.items() if number not in headings}
    assert not missing, f"sections cited but not headings of docs/methods.md {sorted(headings)}: {missing}"


def test_citation_pattern_reads_ranges_and_lists():
    text = "see docs/methods.md §3.4–§3.7 and docs/methods.md §4.3, §5.6; docs/methods.md §2"
    numbers = [n for m in CITATION.finditer(text) for n in re.findall(SECTION, m.group(1))]
    assert numbers == ["3.4", "3.7", "4.3", "5.6", "2"]
