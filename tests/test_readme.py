"""The README is an entrance (at most 10,000 bytes) and every generated section, in the README and in
the docs pages, matches the committed results (docs/build_readme.py --check)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from pmetlab.reporting import section_names, stale_sections

REPO = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 10_000


def _builder():
    spec = importlib.util.spec_from_file_location("build_readme", REPO / "docs" / "build_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_stays_an_entrance():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size:,} bytes (limit {README_MAX_BYTES:,}): move the detail to a page under docs/ and link it"
    )


def test_every_section_has_a_place_in_some_document():
    mod = _builder()
    assert mod.unplaced_builders() == [], "add the marker pair of each of these sections to a page in DOCUMENTS"


@pytest.mark.parametrize("name", ["README.md", "docs/index.md", "docs/results.md", "docs/performance.md"])
def test_generated_sections_are_current(name):
    mod = _builder()
    doc = REPO / name
    assert doc in mod.DOCUMENTS, f"{name} is not among the documents build_readme.py keeps current"
    text = doc.read_text()
    assert section_names(text), f"{name} holds no generated section"
    assert stale_sections(text, mod.builders_of(text)) == [], f"run `make readme` and commit {name}"


def test_the_readme_keeps_the_headline_and_points_at_the_docs_pages():
    text = (REPO / "README.md").read_text()
    assert "headline" in section_names(text)
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / target).is_file(), f"README.md links to {target}, which does not exist"
