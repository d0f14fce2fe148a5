"""Hyperparameters for PMET and MEMIT: frozen dataclasses, presets shipped as package data.

The ablations of the PMET paper are fields, not separate methods:

* ``spread_exponent`` p: the residual at the i-th critical layer is divided by (n - i)^p
  (PMET: p = 0.5, "square-root spread"; MEMIT: p = 1, "even spread");
* ``optimize_attn``: optimise δ^a on the MHSA output as well as δ^m (False = "w/o δ^a");
* ``update_attn_weights``: also update the MHSA output projection from v^a;
* ``null_space``: null-space preservation (AlphaEdit) in place of the λ C_l term, on either method.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .covspec import CovarianceSpec
from .hparam_bounds import check_upper_bounds
from .hparam_types import check_field_types
from .preset_tables import dataset_family, fields_of, list_presets, load_presets, tuned_entry

__all__ = [
    "EditHyperParams",
    "PMETHyperParams",
    "MEMITHyperParams",
    "hparams_from_dict",
    "list_presets",
    "check_layer_indices",
    "dataset_family",
    "tuned_entry",
    "load_presets",
]

DEFAULT_PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
#: Early-stopping rules of the target optimisation (method.md §2).
STOP_RULES = ("loss", "pmet")
#: Orders of the MHSA and FFN updates at a critical layer when both are updated (method.md §3).
ATTN_UPDATE_ORDERS = ("attn_first", "simultaneous")
#: What PMET writes into the FFN output at layer L (method.md §1, "δ^a"): the released target
#: m^L_init + δ^m, the FFN output observed in the optimised pass m^L(δ^a) + δ^m, or that plus δ^a
#: (the whole change of the block at L).
FFN_TARGETS = ("released", "observed", "block")
#: The norm each δ's ball is relative to: its own component's initial value (released) or the
#: layer output h^L per request (MEMIT's reference).
CLAMP_REFERENCES = ("component", "residual")
#: How the null space's rank is chosen (method.md §8): "threshold" (eigenvalues of C_l below an
#: absolute cut, AlphaEdit's rule) or "energy" (the smallest eigenvalues whose sum is at most a share
#: of C_l's trace: the projector lets through at most that share of the preserved keys' energy).
NULL_SPACE_RULES = ("threshold", "energy")
#: Writes through the FFN's post-norm (Gemma 2/3; docs/method_notes.md): "auto" = on where the model's
#: adapter names an FFN post-norm, "on", "off" (the residual written as a change of the FFN output).
POST_NORM_WRITES = ("auto", "on", "off")


def _check_keys(cls: type, given: Mapping[str, Any], names: set[str]) -> None:
    """KeyError naming the unknown keys, their close matches and the valid keys."""
    unknown = sorted((k for k in given if k not in names), key=repr)
    if not unknown:
        return
    close = {k: difflib.get_close_matches(str(k).strip().lower(), names, n=1) for k in unknown}
    hints = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m)
    method = " (the method is set by the class: PMETHyperParams or MEMITHyperParams)" if "method" in unknown else ""
    raise KeyError(
        f"unknown {cls.__name__} keys {unknown}{method}{'; ' + hints if hints else ''}; valid keys: {sorted(names)}"
    )


def layers_from_text(text: str) -> tuple[int, ...]:
    """'3-8' -> (3, 4, 5, 6, 7, 8); '3,4,5' -> (3, 4, 5); '2,5-7' -> (2, 5, 6, 7) (notebook and CLI form)."""
    out: list[int] = []
    try:
        for part in (p.strip() for p in str(text).split(",")):
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1)) if not part.startswith("-") else (int(part), None)
                if hi is None or hi < lo:
                    raise ValueError
                out += list(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        out = []
    if not out:
        raise ValueError(f"bad layer list {text!r}; expected e.g. '3-8' or '3,4,5'")
    return tuple(out)


def check_layer_indices(layers: tuple[int, ...], n_layers: int | None = None, *, owner: str = "the model") -> None:
    """Critical layers are absolute indices 0..n_layers-1 on every surface that takes them
    (hyperparameters, ``compute_deltas``, run overrides), strictly increasing: they name cache
    entries and result rows, so "-1" and "n_layers-1" must not be two names of one layer.
    With ``n_layers`` they are also checked against the model's depth.

    Raises:
        ValueError: naming the offending indices, the valid range and how to fix them.
    """
    valid = f"0..{n_layers - 1}" if n_layers is not None else "0..n_layers-1"
    negative = [l for l in layers if l < 0]
    if negative:
        hint = f" (layer {n_layers + negative[0]} here)" if n_layers is not None and n_layers + negative[0] >= 0 else ""
        raise ValueError(
            f"layers {tuple(layers)} contain negative indices {negative}; critical layers are absolute "
            f"indices {valid}, counted from the input: write n_layers-1 for the last layer{hint}, not -1"
        )
    if n_layers is not None and layers and max(layers) >= n_layers:
        raise ValueError(
            f"critical layers {tuple(layers)} exceed the {n_layers} layers of {owner} (valid: {valid}); "
            f"use layers within {valid}"
        )


@dataclass(frozen=True)
class EditHyperParams:
    """Fields shared by every locate-then-edit method in pmetlab."""

    method: ClassVar[str] = "base"
    #: Space of the hidden state whose target drives the weight update and where the residual
    #: R = V - M is measured (method.md §2 step 3): "layer" (h^L, MEMIT) or "ffn" (m^L, PMET).
    residual_space: ClassVar[str] = "layer"
    #: Critical layers R = (l_0, ..., l_{n-1}), absolute indices 0..n_layers-1 (no negative
    #: "from the end" indices); the target is optimised at the last one.
    layers: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    #: Adam learning rate of the target optimisation.
    v_lr: float = 0.5
    #: Maximum number of optimisation steps (at most steps - 1 updates, as released).
    v_num_grad_steps: int = 25
    #: Each δ is projected into a ball of this factor times the norm of its initial value.
    clamp_norm_factor: float = 0.75
    #: Weight of KL(p_current || p_initial) on the "{subject} is a" prompt.
    kl_factor: float = 0.0625
    #: Weight of the ‖δ‖ / ‖init‖² decay term.
    v_weight_decay: float = 0.5
    #: λ: weight of the key covariance in the least-squares update (mom2_update_weight).
    mom2_update_weight: float = 15000.0
    #: Residual at layer i divided by (n - i) ** spread_exponent.
    spread_exponent: float = 1.0
    #: Optimise δ^a on the MHSA output (PMET only).
    optimize_attn: bool = False
    #: Also update the MHSA output projection from v^a (PMET only).
    update_attn_weights: bool = False
    #: Number of generated context prefixes (the bare prompt is always used as well).
    n_prefixes: int = 5
    #: Length of each generated prefix in tokens.
    prefix_tokens: int = 10
    #: First words the prefixes are generated from (cycled).
    prefix_starts: tuple[str, ...] = DEFAULT_PREFIX_STARTS
    #: Early stopping of the target optimisation: "loss" (MEMIT's released rule: stop when the loss
    #: < loss_stop, else run to v_num_grad_steps) or "pmet" (PMET's: also, once o* is the arg-max
    #: everywhere, scale the NLL by argmax_nll_scale and stop when the KL term <= kl_stop).
    stop_rule: str = "loss"
    #: Stop a request's optimisation when its total loss falls below this (both rules).
    loss_stop: float = 0.05
    #: "pmet" rule: when the target is the arg-max everywhere, stop if the KL term is at most this...
    kl_stop: float = 0.01
    #: ...else multiply the NLL weight by this for the next step.
    argmax_nll_scale: float = 0.1
    #: With update_attn_weights, per critical layer: "attn_first" (released PMET code: update W_O, then
    #: read the FFN keys and residual on that model) or "simultaneous" (both read before either update).
    attn_update_order: str = "attn_first"
    #: Covariance statistics: corpus ("default" = the English text in the data dir), token budget,
    #: sequence length of the chunks and accumulation dtype.
    cov_corpus: str = "default"
    cov_tokens: int = 100_000
    cov_seq_len: int = 256
    cov_dtype: str = "float32"
    #: Seed for everything random in an edit (context prefixes).
    seed: int = 0
    #: Null-space preservation (AlphaEdit, arXiv 2410.02355): project each ΔW_l onto the null space of
    #: the preserved keys (P_l from C_l) and solve against earlier edits' keys instead of λ C_l.
    null_space: bool = False
    #: Eigenvalues of C_l below this span P_l's null space; the scale is the covariance's, E[k kᵀ].
    null_space_threshold: float = 1e-2
    #: PMET: the FFN-output target written at L: "released" (m^L_init + δ^m), "observed" (the FFN
    #: output in the optimised pass, m^L(δ^a) + δ^m) or "block" (observed + δ^a). Only what is
    #: written changes; the optimisation (and its cached targets) is shared.
    ffn_target: str = "released"
    #: PMET: each δ's ball radius is clamp_norm_factor × the norm of "component" (its own initial
    #: value, released) or "residual" (h^L_init of the request, MEMIT's reference).
    clamp_reference: str = "component"
    #: How P_l's rank is chosen: "threshold" (null_space_threshold; the default, so existing runs are
    #: unchanged) or "energy" (null_space_energy). Only read with null_space=True.
    null_space_rule: str = "threshold"
    #: "energy" rule: the largest share of trace(C_l) that P_l may let through (its measured leakage).
    null_space_energy: float = 0.005
    #: Weight of ‖ΔW P‖² in the null-space solve (1: an identity ridge; AlphaEdit's released configs: 10).
    null_space_ridge: float = 1.0
    #: Norm-anchor scaling (arXiv 2602.02543 as described in method_notes.md): before the solve, each
    #: written target v is rescaled to the norm of the unedited state there, v ← v · ‖init‖ / ‖v‖.
    norm_anchor: bool = False
    #: Residuals meant for a post-normed FFN output are written as the pre-image m* − m of the norm
    #: (POST_NORM_WRITES; resolved per model, recorded in the deltas' meta). No-op without a post-norm.
    post_norm_write: str = "auto"
    #: Which output the post-norm write aims at: "ray" (N(m*) ∝ y*, as issue #24 states) or "nearest".
    post_norm_preimage: str = "ray"

    def __post_init__(self) -> None:
        self._check_types()
        layers = self.layers
        if not layers:
            raise ValueError("layers must name at least one critical layer, got ()")
        check_layer_indices(layers)
        if list(layers) != sorted(set(layers)):
            raise ValueError(
                f"layers must be strictly increasing (each critical layer once), got {layers}; "
                f"e.g. {tuple(sorted(set(layers)))}"
            )
        for name in ("v_lr", "mom2_update_weight", "clamp_norm_factor", "null_space_threshold", "null_space_ridge"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_factor", "v_weight_decay", "spread_exponent", "loss_stop", "kl_stop", "argmax_nll_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.v_num_grad_steps < 1:
            raise ValueError(f"v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        check_upper_bounds(self)
        if self.n_prefixes < 0 or self.prefix_tokens < 1:
            raise ValueError(
                f"need n_prefixes >= 0 and prefix_tokens >= 1, got {self.n_prefixes}, {self.prefix_tokens}"
            )
        for name, allowed in (
            ("stop_rule", STOP_RULES),
            ("attn_update_order", ATTN_UPDATE_ORDERS),
            ("ffn_target", FFN_TARGETS),
            ("clamp_reference", CLAMP_REFERENCES),
            ("null_space_rule", NULL_SPACE_RULES),
            ("post_norm_write", POST_NORM_WRITES),
            ("post_norm_preimage", ("ray", "nearest")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not 0 < self.null_space_energy < 1:
            raise ValueError(
                f"null_space_energy is a share of trace(C_l) in (0, 1), got {self.null_space_energy} (e.g. 0.005)"
            )
        if self.cov_dtype not in ("float32", "float64"):
            raise ValueError(f"cov_dtype must be 'float32' or 'float64', got {self.cov_dtype!r}")
        if self.cov_tokens < 1:
            raise ValueError(f"cov_tokens must be positive, got {self.cov_tokens}")
        if self.cov_seq_len < 16:
            raise ValueError(f"cov_seq_len must be >= 16 (shorter chunks are skipped), got {self.cov_seq_len}")
        if self.n_prefixes > 0 and not self.prefix_starts:
            raise ValueError(f"n_prefixes={self.n_prefixes} needs at least one prefix start word, got prefix_starts=()")

    def _check_types(self) -> None:
        """Coerce JSON-ish values and reject wrong types (:func:`~pmetlab.hparam_types.check_field_types`)."""
        check_field_types(self)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditHyperParams:
        names = {f.name for f in fields(cls)}
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"hyperparameters are for method {method!r}, not {cls.method!r}")
        _check_keys(cls, d, names)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["prefix_starts"] = list(self.prefix_starts)
        return {"method": self.method, **d}

    def replace(self, **changes: Any) -> EditHyperParams:
        _check_keys(type(self), changes, {f.name for f in fields(self)})
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, dataset: str | None = None) -> EditHyperParams:
        """A preset shipped in ``pmetlab/presets/<method>.json`` (keys: model names). With ``dataset``,
        the entry's ``by_dataset`` fields for that dataset's family (:func:`dataset_family`; written
        by ``pmetlab tune``) replace the model's."""
        table = load_presets(cls.method)
        key = str(name).lower()
        if key not in table:
            raise KeyError(
                f"no {cls.method} preset for {name!r}; available: {sorted(table)}. Use "
                f"{cls.__name__}(...) or {cls.__name__}.preset(<one of them>).replace(...)"
            )
        entry = fields_of(table[key])
        entry.update(fields_of(tuned_entry(table[key], dataset) or {}))
        return cls.from_dict(entry)

    @property
    def uses_attn(self) -> bool:
        return False

    @property
    def covariance(self) -> CovarianceSpec:
        """The covariance statistics these hyperparameters were set against (the one place the
        ``cov_*`` fields and the seed are assembled)."""
        return CovarianceSpec(
            corpus=self.cov_corpus,
            n_tokens=self.cov_tokens,
            seq_len=self.cov_seq_len,
            dtype=self.cov_dtype,
            seed=self.seed,
        )

    @property
    def optimized_spaces(self) -> tuple[str, ...]:
        """Hidden states at layer L that get a free δ (method.md §2 step 1)."""
        return (self.residual_space,)

    @property
    def value_spaces(self) -> tuple[str, ...]:
        """Hidden states whose targets v = init + δ the solver may read (δ = 0 where not optimised)."""
        return (self.residual_space,)


@dataclass(frozen=True)
class PMETHyperParams(EditHyperParams):
    """PMET (Li et al. 2024): δ^a and δ^m at the last critical layer, FFN-space residual,
    square-root spread. Defaults: the released GPT-J values."""

    method: ClassVar[str] = "pmet"
    residual_space: ClassVar[str] = "ffn"
    stop_rule: str = "pmet"
    v_lr: float = 0.2
    v_num_grad_steps: int = 30
    clamp_norm_factor: float = 0.75
    kl_factor: float = 1.0
    v_weight_decay: float = 0.5
    mom2_update_weight: float = 6000.0
    spread_exponent: float = 0.5
    optimize_attn: bool = True
    update_attn_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.update_attn_weights and not self.optimize_attn:
            raise ValueError(
                "update_attn_weights=True needs optimize_attn=True: without δ^a the MHSA target v^a "
                "is its initial value and the attention update would only undo drift"
            )

    @property
    def uses_attn(self) -> bool:
        return self.optimize_attn or self.update_attn_weights

    @property
    def optimized_spaces(self) -> tuple[str, ...]:
        return ("ffn", "attn") if self.optimize_attn else ("ffn",)

    @property
    def value_spaces(self) -> tuple[str, ...]:
        return ("ffn", "attn")


@dataclass(frozen=True)
class MEMITHyperParams(EditHyperParams):
    """MEMIT (Meng et al. 2023): one δ on the layer output, layer-space residual, even spread.
    Defaults: the released GPT-J values."""

    method: ClassVar[str] = "memit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimize_attn or self.update_attn_weights:
            raise ValueError(
                "optimize_attn / update_attn_weights are PMET switches; MEMIT optimises "
                "one δ on the layer output. Use PMETHyperParams for these ablations."
            )
        if self.ffn_target != "released" or self.clamp_reference != "component":
            raise ValueError(
                f"ffn_target / clamp_reference are PMET switches (got ffn_target={self.ffn_target!r}, "
                f"clamp_reference={self.clamp_reference!r}); MEMIT writes its one δ at h^L, whose own "
                f"norm is already the residual reference. Leave them at 'released' / 'component'."
            )


_METHODS: dict[str, type[EditHyperParams]] = {"pmet": PMETHyperParams, "memit": MEMITHyperParams}


def hparams_from_dict(d: Mapping[str, Any]) -> EditHyperParams:
    """Rebuild hyperparameters saved with ``to_dict()`` (the ``method`` key picks the class)."""
    method = d.get("method")
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(
            f"unknown method {method!r} in the hyperparameters' 'method' key; expected one of {sorted(_METHODS)}"
        )
    return _METHODS[method].from_dict(d)
