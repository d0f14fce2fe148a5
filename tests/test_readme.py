"""The README's generated sections match the committed results (docs/build_readme.py --check)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _builder():
    spec = importlib.util.spec_from_file_location("build_readme", REPO / "docs" / "build_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_are_generated_from_the_committed_results():
    mod = _builder()
    from pmetlab.reporting import stale_sections

    text = (REPO / "README.md").read_text()
    assert set(mod.BUILDERS) <= set(__import__("pmetlab.reporting").reporting.section_names(text))
    assert stale_sections(text, mod.BUILDERS) == [], "run `python docs/build_readme.py` and commit README.md"
