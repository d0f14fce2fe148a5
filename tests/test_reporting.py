"""Generated Markdown sections: rendering, staleness, tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pmetlab.reporting import format_ci, markdown_table, render_sections, section_names, stale_sections

DOC = """# Title
intro
<!-- pmetlab:begin table -->
| old | typed |
<!-- pmetlab:end table -->
middle
<!-- pmetlab:begin other -->
kept as is
<!-- pmetlab:end other -->
end
"""


def test_render_replaces_only_the_named_section_body():
    out = render_sections(DOC, {"table": lambda: "| a |\n|---|\n| 1 |"})
    assert "| old | typed |" not in out and "| a |\n|---|\n| 1 |\n<!-- pmetlab:end table -->" in out
    assert "kept as is" in out and out.startswith("# Title\nintro\n") and out.endswith("end\n")
    assert section_names(out) == ["table", "other"]
    # idempotent, and a rendered document is not stale
    assert render_sections(out, {"table": lambda: "| a |\n|---|\n| 1 |"}) == out
    assert stale_sections(out, {"table": lambda: "| a |\n|---|\n| 1 |"}) == []


def test_a_hand_edited_section_is_reported_stale():
    out = render_sections(DOC, {"table": lambda: "generated"})
    edited = out.replace("generated", "typed by hand")
    assert stale_sections(edited, {"table": lambda: "generated"}) == ["table"]


def test_a_builder_without_a_section_is_an_error():
    with pytest.raises(KeyError, match=r"no section\(s\) \['missing'\].*sections found: \['table', 'other'\]"):
        render_sections(DOC, {"missing": lambda: "x"})


def test_markdown_table_formats_floats_nan_bold_and_pipes():
    df = pd.DataFrame({"method": ["PMET", "a|b"], "ES": [0.91234, math.nan]})
    text = markdown_table(df, floatfmt=".2f", bold={(0, "ES"): True})
    assert text.splitlines() == ["| method | ES |", "|---|---|", "| PMET | **0.91** |", "| a\\|b | – |"]
    with pytest.raises(ValueError, match="without columns"):
        markdown_table(pd.DataFrame())


def test_format_ci():
    assert format_ci(81.54, 77.81, 84.76) == "81.5 [77.8, 84.8]"
    assert format_ci(81.54, math.nan, math.nan) == "81.5"
    assert format_ci(math.nan, 1.0, 2.0) == "–"
