"""Log noise: what a run says once (consistency unavailable and why, records without snippets) and
what it no longer prints (kernel transport warnings, tqdm's ipywidgets warning)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pmetlab.datasets import ConsistencyReference, load_consistency_reference
from pmetlab.evaluation import evaluate_counterfact, evaluate_counterfact_reference
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer


# --- consistency unavailable: said once, short, with the reason -------------------------------------
@pytest.fixture
def no_reference(tmp_path: Path, monkeypatch):
    """No reference file anywhere pmetlab looks; nothing said yet in this process."""
    from pmetlab.datasets import files, reference

    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PMETLAB_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(files, "_PROJECT_DATA_DIR", tmp_path / "project" / "data")
    monkeypatch.setattr(reference, "_SAID", set())
    return tmp_path


@pytest.mark.parametrize(
    ("download", "offline", "reason"),
    [(False, None, "download=False"), (True, "PMETLAB_OFFLINE", "$PMETLAB_OFFLINE is set")],
)
def test_missing_reference_is_said_once_in_one_short_line_with_the_reason(
    no_reference, monkeypatch, caplog, download, offline, reason
) -> None:
    if offline:
        monkeypatch.setenv(offline, "1")
    with caplog.at_level(logging.INFO, logger="pmetlab.datasets"):
        for _ in range(3):  # e.g. a run's pre- and post-evaluation, a notebook cell run again
            assert load_consistency_reference(download=download) is None
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 1, said
    msg = said[0]
    assert "consistency (RS) is unavailable" in msg and "idf.npy" in msg and reason in msg
    assert "$PMETLAB_DATA_DIR" in msg and "download=True" in msg  # what to do
    assert str(no_reference) not in msg and "\n" not in msg  # no list of the places looked in


def test_where_pmetlab_looked_is_at_debug(no_reference, caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="pmetlab.datasets"):
        load_consistency_reference()
    assert any(str(no_reference / "idf.npy") in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


# --- records without snippets: one line per evaluation ------------------------------------------------
def _records(n: int) -> list[dict]:
    def rec(i: int, relation: str, target: str) -> dict:
        return {
            "case_id": i,
            "requested_rewrite": {
                "prompt": "{} is located in",
                "subject": f"place {i}",
                "target_new": {"str": "paris", "id": target},
                "target_true": {"str": "london", "id": "Q0"},
                "relation_id": relation,
            },
            "paraphrase_prompts": ["the city is located in"],
            "neighborhood_prompts": ["the river is located in"],
            "attribute_prompts": ["the town is located in"],
            "generation_prompts": ["the city is"],
        }

    return [rec(0, "P1", "Q1")] + [rec(i, "P2", "Q2") for i in range(1, n)]


@pytest.mark.parametrize("evaluate", [evaluate_counterfact, evaluate_counterfact_reference])
def test_records_without_snippets_are_summarised_once_per_evaluation(evaluate, caplog) -> None:
    model, tok = make_tiny_model("LlamaForCausalLM"), make_tiny_tokenizer()
    ref = ConsistencyReference(
        snippets={"P1": {"Q1": [{"name": "x", "text": "the city is paris"}]}},
        idf=np.ones(2),
        vocab={"city": 0, "paris": 1},
    )
    with caplog.at_level(logging.DEBUG, logger="pmetlab.evaluation"):
        df = evaluate(model, tok, _records(4), n_gen_tokens=2, reference=ref, progress=False)
    assert df.consistency.isna().sum() == 3
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(said) == 1 and "NaN for 3 of 4 record(s)" in said[0], said


# --- notebook runs: no kernel transport warning, no ipywidgets warning --------------------------------
@pytest.mark.notebooks
def test_notebook_runs_print_no_kernel_or_ipywidgets_warnings(tmp_path: Path, capfd) -> None:
    nbformat = pytest.importorskip("nbformat")
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    from pmetlab.notebooks import run_notebooks

    src = tmp_path / "nbs"
    src.mkdir()
    params = new_code_cell('SMOKE = False\nOUTPUT_DIR = "out"')
    params.metadata["tags"] = ["parameters"]
    code = new_code_cell("import tqdm.auto\nfor _ in tqdm.auto.tqdm(range(2), desc='useful bar'):\n    pass")
    nb = new_notebook(
        cells=[new_markdown_cell("# quiet"), params, code],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(nb, src / "01_quiet.ipynb")
    capfd.readouterr()
    (res,) = run_notebooks(str(tmp_path / "out"), notebooks_dir=str(src), timeout=120)
    assert res["status"] == "ok", res
    assert "without encryption" not in capfd.readouterr().err
    outputs = nbformat.read(res["notebook"], as_version=4).cells[-1].outputs
    text = "".join(o.get("text", "") for o in outputs)
    assert "IProgress not found" not in text
    assert "useful bar" in text  # the bars themselves stay
