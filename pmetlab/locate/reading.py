"""A short paragraph, generated from the numbers, on where facts live in a model."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .facts import LayerWindow, best_window

__all__ = ["locate_reading"]


def _peak(summary: pd.DataFrame, kind: str, role: str) -> pd.Series:
    sel = summary[(summary["kind"].astype(str) == kind) & (summary["token_role"].astype(str) == role)]
    if sel.empty:
        raise ValueError(f"the summary has no rows for kind={kind!r} at {role!r}; trace with kinds including it")
    return sel.loc[sel["mean"].idxmax()]


def locate_reading(
    summary: pd.DataFrame,
    *,
    width: int,
    preset_layers: Sequence[int] | None = None,
    model_name: str = "this model",
    role: str = "last_subject",
) -> tuple[str, LayerWindow]:
    """The located MLP window and whether attention carries a factual effect at ``role``.

    Test applied (stated in the text): the window is the ``width`` contiguous layers with the
    largest mean MLP indirect effect at the subject's last token; attention "carries a factual
    effect" there when its peak mean IE has a 95% interval above zero and is at least half the
    MLP peak. Returns the text and the window.
    """
    win = best_window(summary, kind="mlp", width=width, token_role=role)
    mlp, attn = _peak(summary, "mlp", role), _peak(summary, "attn", role)
    n = int(mlp.get("n", 0))
    mlp_above, attn_above = bool(mlp["ci_low"] > 0), bool(attn["ci_low"] > 0)
    text = (
        f"On {model_name} ({n} known facts, indirect effect at the subject's last token), MLP restoration "
        f"has its largest average effect over layers {win.start}–{win.stop - 1} (mean IE {win.mean_ie:.3f}; "
        f"peak {mlp['mean']:.3f} [{mlp['ci_low']:.3f}, {mlp['ci_high']:.3f}] at layer {int(mlp['layer'])}"
    )
    text += "). " if mlp_above else f"; its interval includes zero with {n} facts, so the window is a weak estimate). "
    peak = f"{attn['mean']:.3f} [{attn['ci_low']:.3f}, {attn['ci_high']:.3f}]"
    text += f"Attention peaks at {peak} (layer {int(attn['layer'])}): "
    if attn_above and attn["mean"] >= 0.5 * mlp["mean"]:
        text += "attention **does carry** a factual effect there, against the paper's claim about MHSA. "
    elif attn_above:
        text += "above zero but under half the MLP peak, a **small** factual effect, as the paper claims for MHSA. "
    else:
        text += "not distinguishable from zero, **little** factual effect, as the paper claims for MHSA. "
    text += (
        "Test: attention carries an effect when its peak's 95% interval is above zero and it is at least "
        "half the MLP peak."
    )
    if preset_layers:
        overlap = sorted(set(win.layers) & set(preset_layers))
        text += (
            f" The preset edits layers {min(preset_layers)}–{max(preset_layers)}; the located window shares "
            f"{len(overlap)} of its {len(win.layers)} layers with it."
        )
    return text, win
