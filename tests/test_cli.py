"""The ``pmetlab`` command line: help at every level, one-line errors with exit status 2 and no
traceback, and the subcommands end to end on a tiny model saved to disk."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from pmetlab.cli import main, parse_key_value, parse_layers
from tests.test_experiments import tiny_env, tiny_hparams  # noqa: F401  (fixture)
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["run", "stats", "summarize", "notebooks", "demo"]


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A tiny Llama and its tokenizer saved with save_pretrained (loadable by ``--model PATH``)."""
    d = tmp_path / "tiny-llama"
    make_tiny_model("LlamaForCausalLM").save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    return d


def _hp_args(data_dir: Path) -> list[str]:
    out = []
    for k, v in tiny_hparams(data_dir).items():
        out += ["--hparams", f"{k}={'-'.join(map(str, (v[0], v[-1]))) if k == 'layers' else v}"]
    return out


def _one_line_error(err: str) -> str:
    """The error line; besides it stderr may hold only log records ("HH:MM:SS LEVEL name: ...")."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", ln)]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("pmetlab") and "error:" in lines[0]
    return lines[0]


@pytest.mark.parametrize("sub", [None] + SUBCOMMANDS)
def test_help_at_every_level(sub, capsys):
    argv = ([sub] if sub else []) + ["--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pmetlab{' ' + sub if sub else ''}")
    if sub is None:
        assert all(s in out for s in SUBCOMMANDS)
    if sub == "run":
        assert "--hparams KEY=VALUE" in out and "--no-generation" in out and "sequential" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["run", "--method", "rome"], "invalid choice: 'rome'"),
        (["run", "--hparams", "v_lr"], "expected KEY=VALUE"),
        (["run", "--n-edits", "0"], "positive integer"),
        (["run", "--hparams", "bogus_key=1"], "unknown hyperparameter(s) ['bogus_key']"),
        (["run", "--hparams", "v_lr=fast"], "v_lr must be a number"),
        (["stats", "--layers", "3-x"], "bad layer list"),
        (["summarize", "no/such/run"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that wrongly started would write here
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert message in line
    assert not (tmp_path / "runs").exists()


def test_value_parsing():
    assert parse_layers("3-8") == [3, 4, 5, 6, 7, 8]
    assert parse_layers("3,4,5") == [3, 4, 5] and parse_layers("2,5-6") == [2, 5, 6]
    for bad in ("", "x", "8-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_layers(bad)
    assert parse_key_value("v_lr=0.5") == ("v_lr", 0.5)
    assert parse_key_value("optimize_attn=false") == ("optimize_attn", False)
    assert parse_key_value("layers=[1, 2]") == ("layers", [1, 2])
    assert parse_key_value("layers=1-3") == ("layers", [1, 2, 3])
    assert parse_key_value("cov_corpus=a=b.txt") == ("cov_corpus", "a=b.txt")


def test_run_and_summarize(tiny_env, tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = [
        "run",
        "--model",
        str(tiny_dir),
        "--n-edits",
        "2",
        "--no-generation",
        "--out",
        str(out),
        "--no-progress",
        "--label",
        "cli",
        *_hp_args(tiny_env),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"run directory: {out}" in printed and "efficacy_score" in printed and "cli" in printed
    assert (out / "run.json").is_file() and (out / "deltas.safetensors").is_file()

    csv = tmp_path / "tables" / "summary.csv"
    assert main(["summarize", str(out), "--out", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df["phase"]) == ["pre", "post"] and set(df["label"]) == {"cli"}
    assert "run" in capsys.readouterr().out

    # the same directory with other parameters: a one-line error that says what to do
    argv[argv.index("--n-edits") + 1] = "3"
    assert main(argv) == 2
    assert "resume" in _one_line_error(capsys.readouterr().err)
    assert main(argv + ["--no-resume"]) == 0


def test_stats_prints_where_it_cached(tiny_env, tiny_dir, capsys):  # noqa: F811
    rc = main(
        [
            "stats",
            "--model",
            str(tiny_dir),
            "--layers",
            "0-1",
            "--corpus",
            str(tiny_env / "corpus.txt"),
            "--tokens",
            "300",
            "--seq-len",
            "32",
            "--no-progress",
        ]
    )
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("layer")]
    assert len(lines) == 2
    for ln in lines:
        path = Path(ln.rsplit("-> ", 1)[1])
        assert path.is_file() and path.suffix == ".safetensors" and "ffn" in path.name


def test_notebooks_delegates_and_reports(monkeypatch, capsys):
    calls = []
    results = [
        {
            "name": "01_component_similarity",
            "status": "ok",
            "seconds": 3.21,
            "error": None,
            "cell": None,
            "missing": [],
        },
        {
            "name": "02_edit_walkthrough",
            "status": "failed",
            "seconds": 1.0,
            "error": "ZeroDivisionError: division by zero\nmore",
            "cell": 4,
            "missing": ["02_checks.csv"],
        },
    ]

    def fake(out_dir, names=None, parameters=None, smoke=False):
        calls.append((out_dir, names, parameters, smoke))
        return results if names is None else results[:1]

    monkeypatch.setitem(sys.modules, "pmetlab.notebooks", types.SimpleNamespace(run_notebooks=fake))
    assert main(["notebooks", "--smoke", "-p", "N_EDITS=5", "-p", "MODEL=smollm2-135m"]) == 1
    out = capsys.readouterr().out
    assert calls[-1] == ("figures", None, {"N_EDITS": 5, "MODEL": "smollm2-135m"}, True)
    assert "02_edit_walkthrough" in out and "failed" in out and "cell 4: ZeroDivisionError" in out
    assert "02_checks.csv" in out and "1/2 notebooks ok" in out
    assert main(["notebooks", "--out", "o", "--only", "01", "--only", "03"]) == 0
    assert calls[-1] == ("o", ["01", "03"], None, False)


def test_demo_on_a_tiny_model(tiny_env, tiny_dir, capsys):  # noqa: F811
    rc = main(
        [
            "demo",
            "--model",
            str(tiny_dir),
            "--prompt",
            "{} plays the",
            "--subject",
            "danny miles",
            "--target",
            "piano",
            "--true",
            "guitar",
            "--no-progress",
            *_hp_args(tiny_env),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "before the edit" in out and "after the PMET edit" in out and "P(piano)=" in out


def test_module_and_console_script_entry_points(monkeypatch, capsys):
    # python -m pmetlab (in-process: the same code path, without another interpreter start)
    import runpy

    monkeypatch.setattr(sys, "argv", ["pmetlab", "summarize", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("pmetlab", run_name="__main__")
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: pmetlab summarize")
    # the console script (or python -m pmetlab.cli where it is not installed), in a fresh process
    script = Path(sys.executable).parent / "pmetlab"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pmetlab.cli"]
    r = subprocess.run(cmd + ["run", "--method", "rome"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid choice: 'rome'" in r.stderr
