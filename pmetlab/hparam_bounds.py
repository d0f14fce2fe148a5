"""Upper bounds of the numeric hyperparameters: finite values far beyond any tuned or published one
(method.md §4: v_lr ≤ 1, clamp factors ≤ 1, λ ≤ 15,000, 30 steps) only wreck the model or the run, so
they are refused with one line naming the field, the value and the bound (issue #27)."""

from __future__ import annotations

from typing import Any

__all__ = ["UPPER_BOUNDS", "check_upper_bounds"]

#: Field -> the largest accepted value (each at least ~100x what any preset uses).
UPPER_BOUNDS: dict[str, float] = {
    "v_lr": 100.0,
    "clamp_norm_factor": 100.0,
    "v_num_grad_steps": 10_000,
    "kl_factor": 1e4,
    "v_weight_decay": 1e4,
    "mom2_update_weight": 1e12,
    "spread_exponent": 10.0,
    "n_prefixes": 100,
    "prefix_tokens": 1024,
    "null_space_threshold": 1e6,
    "null_space_ridge": 1e6,
}


def check_upper_bounds(hp: Any) -> None:
    """Raise ValueError for the first field of ``hp`` above its bound in :data:`UPPER_BOUNDS`."""
    for name, bound in UPPER_BOUNDS.items():
        value = getattr(hp, name, None)
        if value is not None and value > bound:
            raise ValueError(
                f"{type(hp).__name__}.{name}={value!r} is beyond its bound {bound:g}; such values only wreck "
                f"the model or the run (presets and published values are far smaller). Use a value <= {bound:g}"
            )
