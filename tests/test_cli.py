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
    line = _one_line_error(capsys.readouterr().err)
    assert "--no-resume" in line and "resume=False" not in line and "out_dir" not in line  # the CLI's words
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


# --- hardening: paths, OS errors, devices, the CLI's own words -------------------------------


@pytest.mark.parametrize("sub", [None] + SUBCOMMANDS)
def test_help_states_each_default_once(sub, capsys):
    """argparse's "(default: X)" is not added where the help text speaks of the default already,
    nor for None, flags and counters (they said "(default: None)", "(default: False)")."""
    from pmetlab.cli.parser import build_parser

    parser = build_parser()
    if sub is not None:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[sub]
    formatter = parser._get_formatter()
    for action in (a for a in parser._actions if a.help):
        text = formatter._expand_help(action).lower()
        assert text.count("(default") <= 1, (action.option_strings, text)
    assert main(([sub] if sub else []) + ["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: False)" not in out


def test_help_keeps_informative_defaults(capsys):
    assert main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: pmet)" in out and "(default: 10)" in out and "(default: all at once)" in out
    assert "(default: runs/<model>_<method>_..._seed<seed>)" in out


@pytest.fixture
def paths(tmp_path) -> dict[str, Path]:
    """A file, a directory and a finished-looking run directory (run.json) under tmp_path."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-run").mkdir()
    (tmp_path / "a-run" / "run.json").write_text("{}")
    return {"file": tmp_path / "a-file", "dir": tmp_path / "a-dir", "run": tmp_path / "a-run"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--out", "{file}"], "argument --out: '{file}' is a file, not a directory; give a directory"),
        (["run", "--out", "{file}/sub"], "'{file}/sub' cannot be created: '{file}' is a file, not a directory"),
        (["notebooks", "--out", "{file}"], "argument --out: '{file}' is a file, not a directory"),
        (["summarize", "{file}"], "argument RUN_DIR: '{file}' is a file, not a run directory; give a run directory"),
        (
            ["summarize", "{run}/run.json"],
            "'{run}/run.json' is a file, not a run directory; give its directory '{run}'",
        ),
        (["summarize", "{run}", "--out", "{dir}"], "argument --out: '{dir}' is a directory; give a file path"),
        (["summarize", "{run}", "--out", "{file}/t.csv"], "'{file}' is a file, not a directory"),
        (["run", "--out", "~no-such-user-x/run"], "cannot expand the '~' in '~no-such-user-x/run'"),
    ],
)
def test_unusable_paths_are_refused_before_any_work(argv, expected, paths, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    fill = {k: str(v) for k, v in paths.items()}
    assert main([a.format(**fill) for a in argv]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert expected.format(**fill) in line
    assert not (tmp_path / "runs").exists()  # nothing started


def test_seq_len_below_the_minimum_is_refused_with_the_reason(capsys):
    assert main(["stats", "--seq-len", "8"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "--seq-len" in line and "at least 16 tokens, got '8'" in line and "pieces under 8 tokens" in line


def _raising(exc: BaseException):
    def command(args):
        raise exc

    return command


@pytest.mark.parametrize(
    "sub, exc, expected",
    [
        (
            "run",
            PermissionError(13, "Permission denied", "/ro/run"),
            "permission denied: '/ro/run' (PermissionError); choose another --out (one you can write to)",
        ),
        (
            "notebooks",
            OSError(30, "Read-only file system", "/mnt/ro/figures"),
            "read-only file system: '/mnt/ro/figures' (OSError); choose another --out",
        ),
        (
            "summarize",
            IsADirectoryError(21, "Is a directory", "tables"),
            "is a directory: 'tables' (IsADirectoryError); a file path is expected there",
        ),
        (
            "run",
            OSError(28, "No space left on device", "/full/run/records.parquet"),
            "no space left on device: '/full/run/records.parquet' (OSError); free some space",
        ),
        (
            "run",
            NotADirectoryError(20, "Not a directory", "f/sub"),
            "not a directory: 'f/sub' (NotADirectoryError); a part of that path is a file",
        ),
        ("demo", FileExistsError(17, "File exists", ".tmp", None, "x"), "file exists: 'x' (FileExistsError)"),
        ("stats", OSError("cannot save the deltas to 'x': reason; do this"), "cannot save the deltas to 'x'"),
    ],
)
def test_os_errors_are_one_line_with_exit_2(sub, exc, expected, capsys, monkeypatch):
    monkeypatch.setattr(f"pmetlab.cli.parser.cmd_{sub}", _raising(exc))
    argv = [sub] + (["some-run"] if sub == "summarize" else [])
    assert main(argv) == 2
    assert expected in _one_line_error(capsys.readouterr().err)
    assert main([*argv, "-v"]) == 2  # -v: the traceback too, in the log
    assert "Traceback" in capsys.readouterr().err


def test_permission_error_in_the_cache_points_at_the_cache_dir(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    exc = PermissionError(13, "Permission denied", str(tmp_path / "cache" / "stats" / "x.tmp"))
    monkeypatch.setattr("pmetlab.cli.parser.cmd_stats", _raising(exc))
    assert main(["stats"]) == 2
    assert "point PMETLAB_CACHE_DIR at a directory you can write to" in _one_line_error(capsys.readouterr().err)


def test_unwritable_run_directory_is_one_line(tiny_env, tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A real run whose --out cannot be created (root ignores chmod, so mkdir is made to fail as
    on a read-only directory)."""
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(ro)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    argv = ["run", "--model", str(tiny_dir), "--n-edits", "1", "--no-generation", "--out", str(ro / "run")]
    assert main([*argv, "--no-progress", *_hp_args(tiny_env)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"permission denied: '{ro / 'run'}'" in line and "choose another --out" in line


def test_unavailable_device_names_what_is_available(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["stats", "--device", "cuda"]) == 2  # refused before the model is loaded
    line = _one_line_error(capsys.readouterr().err)
    assert "--device 'cuda' is not available" in line and "available here: cpu" in line and "'auto'" in line


@pytest.mark.parametrize(
    "command, message, expected",
    [
        (
            "run",
            "run.json is unreadable (x); pass resume=False to start the run over",
            "run.json is unreadable (x); pass --no-resume to start the run over",
        ),
        (
            "run",
            "its parameters differ (n_edits); use another out_dir, or resume=False to start over",
            "its parameters differ (n_edits); use another --out, or --no-resume to start over",
        ),
        (
            "run",
            "cannot select n=12 records from 10; pass n <= 10 or n=None",
            "cannot select 12 records (--n-edits 12) from 10; pass --n-edits 10 or less",
        ),
        (
            "run",
            "n_tokens=5 is fewer than the key dimension 80 of m; use n_tokens >= 80 (more)",
            "--hparams cov_tokens=5 is fewer than the key dimension 80 of m; "
            "use --hparams cov_tokens=80 or more (more)",
        ),
        (
            "stats",
            "n_tokens=5 is fewer than the key dimension 80 of m; use n_tokens >= 80 (more)",
            "--tokens 5 is fewer than the key dimension 80 of m; use --tokens 80 or more (more)",
        ),
        (
            "stats",
            "corpus 'c' yields only 9 usable tokens (n_tokens=600 asked); chunks of seq_len=32 tokens",
            "corpus 'c' yields only 9 usable tokens (--tokens 600 asked); chunks of --seq-len 32 tokens",
        ),
        ("stats", "device 'cuda' is not available", "--device 'cuda' is not available"),
        ("summarize", "pass resume=False", "pass resume=False"),  # no such flag there: left alone
    ],
)
def test_library_spellings_become_flags(command, message, expected):
    from pmetlab.cli.messages import error_line

    assert error_line(ValueError(message), command) == expected


def test_a_real_library_error_speaks_flags(tiny_env, tiny_dir, capsys, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # the run directory is recorded (as failed) under ./runs
    assert main(["run", "--model", str(tiny_dir), "--n-edits", "100000", "--no-generation", "--no-progress"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "(--n-edits 100000)" in line and "n=None" not in line and "n <=" not in line


def test_stats_refuses_fewer_tokens_than_the_key_dimension(tiny_env, tiny_dir, capsys):  # noqa: F811
    from tests.tiny_models import TINY_D_FF

    argv = ["stats", "--model", str(tiny_dir), "--layers", "0", "--corpus", str(tiny_env / "corpus.txt")]
    assert main([*argv, "--tokens", str(TINY_D_FF - 1), "--no-progress"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--tokens {TINY_D_FF - 1} is fewer than the key dimension {TINY_D_FF}" in line
    assert f"use --tokens {TINY_D_FF} or more" in line and "n_tokens" not in line


def test_control_characters_in_a_value_do_not_break_the_one_line_error(capsys):
    from pmetlab.cli import main

    assert main(["run", "--method", "pm\ret\n"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err and "pm\\ret\\n" in err
