"""The benchmark entry point in --quick mode (tiny model): it runs every hot path next to its
reference and writes the documented JSON rows. No timing is asserted, only the schema and
that the fast paths agree with their references. The FLOP counts behind the rows' limits
(benchmarks/flops.py) are checked against hand counts on a tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from benchmarks.flops import (
    DecoderShape,
    covariance_flops,
    layer_flops,
    peak_matmul_flops,
    target_optimisation_flops,
)
from pmetlab.editing.rows import KIND_BARE, KIND_KL, Rows

REPO = Path(__file__).resolve().parent.parent
REQUIRED = {"z_opt_seconds_per_edit", "covariance_tokens_per_s", "eval_prompts_per_s", "peak_rss_mb"}


def _shared_data() -> Path | None:
    for cand in (os.environ.get("PMETLAB_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "counterfact").is_dir() and (Path(cand) / "corpus").is_dir():
            return Path(cand)
    return None


@pytest.mark.skipif(_shared_data() is None, reason="the benchmarks read CounterFact and the corpus (../shared/data)")
def test_quick_benchmark_writes_the_documented_rows(tmp_path):
    out = tmp_path / "latest.json"
    env = {**os.environ, "PMETLAB_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    names = {r["name"] for r in rows}
    assert REQUIRED <= names, names
    for r in rows:
        assert {"name", "unit", "pmetlab", "reference", "ratio", "limit"} <= set(r)
        assert r["pmetlab"] is not None and r["pmetlab"] > 0
        if r["reference"] is not None:
            assert r["ratio"] is not None and r["ratio"] > 0
    z = next(r for r in rows if r["name"] == "z_opt_seconds_per_edit")
    assert z["max_rel_diff_v"] < 1e-3  # the fast targets equal the reference's
    rss = next(r for r in rows if r["name"] == "peak_rss_mb")
    assert rss["limit"] == 2000.0
    full = json.loads(out.with_suffix(".full.json").read_text())
    assert full["info"]["quick"] is True and "versions" in full
    assert "z_opt_seconds_per_edit" in res.stdout  # the printed table


# --- FLOP counts of the limits (benchmarks/flops.py): hand computations on a tiny LLaMA config ---
def _tiny_shape() -> DecoderShape:
    cfg = tf.LlamaConfig(
        vocab_size=211,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return DecoderShape.from_config(cfg)


def test_layer_flops_match_a_hand_count():
    shape = _tiny_shape()
    assert (shape.head_dim, shape.n_kv_heads, shape.gated) == (12, 2, True)
    # q and o: 2·48·48 each; k and v (2 heads of 12 = 24 wide): 2·48·24 each; gate, up, down: 2·48·80 each
    dense = 2 * (4608 + 2304) + 3 * 7680
    assert dense == 36864
    # 5 tokens at positions 0..4 attend to 1+2+3+4+5 = 15 keys: q·kᵀ and the values, 2·2·15·48
    assert layer_flops(shape, 5, 15) == 5 * 36864 + 2880
    assert layer_flops(shape, 5, 15, with_ffn_out=False) == 5 * (36864 - 7680) + 2880


def test_target_optimisation_flops_match_a_hand_count():
    L = torch.tensor
    # one request: a rewrite row of 5 tokens (subject ends at 2, targets read at 3 and 4) and a KL row of 3
    rows = Rows(
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=L([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        req=L([0, 0]),
        lookup=L([2, 2]),
        kind=L([KIND_BARE, KIND_KL]),
        t_row=L([0, 0]),
        t_pos=L([3, 4]),
        t_tok=L([5, 6]),
        n_requests=1,
    )
    shape = _tiny_shape()
    # layers 1 and 2 at positions 2, 3, 4 (contexts 3+4+5) and 2 (context 3): 4 tokens, 15 keys
    per_layer = 4 * 36864 + 4 * 15 * 48
    unembed = 3 * 2 * 48 * 211  # two target positions and the KL position
    forward = 2 * per_layer + unembed
    # 3 steps: 3 forwards and 2 backwards (none after the last step), each backward 1x a forward
    assert target_optimisation_flops(shape, rows, 1, [3]) == 5 * forward


def test_covariance_flops_match_a_hand_count():
    shape = _tiny_shape()
    # one chunk of 4 tokens (contexts 1+2+3+4 = 10), keys of layers 0 and 1
    forward = (4 * 36864 + 4 * 10 * 48) + (4 * (36864 - 7680) + 4 * 10 * 48)
    assert covariance_flops(shape, (0, 1), [4]) == forward + 2 * 4 * 80 * 81
    assert covariance_flops(shape, (0, 1), [4], symmetric=False) == forward + 2 * 4 * 2 * 80 * 80


def test_flop_counts_refuse_an_unknown_architecture():
    with pytest.raises(ValueError, match="gpt2"):
        DecoderShape.from_config(tf.GPT2Config())


def test_gptj_config_gives_a_plain_mlp_shape():
    cfg = tf.GPTJConfig(n_embd=64, n_head=4, n_layer=3, n_inner=None, vocab_size=100, rotary_dim=8)
    shape = DecoderShape.from_config(cfg)
    assert (shape.d_model, shape.d_ff, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (64, 256, 4, 4, 16)
    assert (shape.vocab, shape.n_layers, shape.gated) == (100, 3, False)


def test_peak_matmul_rate_is_positive():
    assert peak_matmul_flops(sizes=(64,), repeats=2) > 0


def test_gpu_benchmark_configs_build_the_published_shapes():
    from benchmarks.gpu import build_model

    small = build_model("smollm2-135m", torch.device("meta"))
    assert sum(p.numel() for p in small.parameters()) == 134_515_008  # the converted SmolLM2-135M's count
    gptj = build_model("gpt-j-6b", torch.device("meta"))
    shape = DecoderShape.from_config(gptj.config)
    assert (shape.d_model, shape.d_ff, shape.n_layers, shape.vocab) == (4096, 16384, 28, 50400)
