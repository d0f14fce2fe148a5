"""compute_deltas: the one pipeline every method composes (method.md §2).

1. context prefixes (cached, seeded); 2. targets at layer L (:mod:`.targets`);
3. per critical layer: keys on the partially edited model, residual, spread, float64 solve
   (:mod:`.solve`), the update applied temporarily so the next layer's keys see it;
4. the model is restored bit-exactly (always, also on errors) and the updates returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..hparams import EditHyperParams, check_layer_indices
from ..models.adapters import get_adapter
from ..progress import tqdm
from ..requests import EditRequest, conflict_free_batches, find_conflicts
from ..stats import SecondMoment, layer_covariances
from ..store import KeyedStore
from ..tokens import check_context_length, encode_prompt_target, short_text, subject_last_index
from ..tracing import get_parameter
from ..types import Model, Tokenizer
from .deltas import Deltas, deltas_meta, param_fingerprint
from .nullspace import NullSpaceSolve, PreservedKeys, null_space_meta
from .postnorm_write import post_norm_diag, post_norm_modules, resolve_post_norm_write, through_post_norm
from .prefixes import context_templates
from .solve import keys_and_outputs, solve_update, spread_residual
from .targets import final_p_target, optimize_targets_cached

logger = logging.getLogger(__name__)

__all__ = ["compute_deltas", "validate_requests"]


#: A target-optimisation row (context prefix + prompt + target) longer than this draws a cost warning.
LONG_ROW_TOKENS = 256
#: The measurement the warning's estimate is scaled from (a new-user trial): one request with a
#: 2,000-token prompt and 5 context prefixes (6 rows of ~2,000 tokens) took 489 s and ~15 GB for
#: three optimisation steps, i.e. ~160 s and ~15 GB per step for ~12,000 row tokens.
_TRIAL_ROW_TOKENS, _TRIAL_S_PER_STEP, _TRIAL_GB = 12_000, 163.0, 15.0


def validate_requests(tok, requests: Sequence[EditRequest]) -> list[EditRequest]:
    """Check every request before anything runs (clear message naming the bad one): each must be
    an :class:`EditRequest` whose subject and target the tokenizer can place, and no two may ask
    for different objects of the same subject and prompt (:func:`~pmetlab.requests.find_conflicts`)."""
    requests = _as_requests(requests)
    _encoded_lengths(tok, requests)
    _check_conflicts(requests)
    return requests


def _as_requests(requests) -> list[EditRequest]:
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise ValueError("no edit requests given; expected a non-empty list of EditRequest")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise TypeError(
                f"request {i} is a {type(r).__name__}, expected EditRequest "
                f"(build one with EditRequest(prompt=..., subject=..., target_new=...))"
            )
    return requests


def _encoded_lengths(tok, requests: Sequence[EditRequest]) -> list[int]:
    """Tokens of each request's prompt + target (special tokens included); a request the
    tokenizer cannot place raises a ValueError naming it."""
    out = []
    for i, r in enumerate(requests):
        try:
            subject_last_index(tok, r.prompt, r.subject)
            p_ids, t_ids = encode_prompt_target(tok, r.text, r.target_new)
        except ValueError as exc:
            raise ValueError(f"request {i} ({r.subject!r} -> {r.target_new!r}): {exc}") from None
        out.append(len(p_ids) + len(t_ids))
    return out


def _check_conflicts(requests: Sequence[EditRequest]) -> None:
    """One least-squares solve would average two targets of one fact and write neither."""
    conflicts = find_conflicts(requests)
    if not conflicts:
        return
    i, j = conflicts[0]
    a, b = requests[i], requests[j]
    more = f" ({len(conflicts) - 1} more conflicting pair(s) in this batch)" if len(conflicts) > 1 else ""
    raise ValueError(
        f"requests {i} and {j} ask for different objects of the same fact {a.prompt!r} with subject "
        f"{a.subject!r}: request {i} -> {a.target_new!r}, request {j} -> {b.target_new!r}{more}. One "
        f"least-squares solve would average their targets and write neither. Put them in separate "
        f"compute_deltas calls: pmetlab.requests.conflict_free_batches(requests) splits the list into "
        f"{len(conflict_free_batches(requests))} conflict-free batches; or drop one (CounterFact records: "
        f"pmetlab.drop_conflicting, or dataset 'counterfact+conflict_filter' in a run)"
    )


def _check_lengths(model: Model, requests: Sequence[EditRequest], lengths: Sequence[int], hp: EditHyperParams) -> None:
    """Every target-optimisation row must fit the model's context; long rows draw a warning with
    the expected cost. A row is a context prefix (about ``prefix_tokens`` + 2 tokens with ". ")
    + the prompt + the target without its last token (teacher forcing)."""
    extra = hp.prefix_tokens + 2 if hp.n_prefixes else 0
    rows = [n - 1 + extra for n in lengths]

    def describe(i: int) -> str:
        return f"request {i}: {short_text(requests[i].text)} -> {requests[i].target_new!r}"

    fix = "shorten the prompt or the target" + (f", or lower prefix_tokens={hp.prefix_tokens}" if extra else "")
    check_context_length(
        model,
        rows,
        what="the longest target-optimisation row (context prefix + prompt + target)",
        fix=fix,
        describe=describe,
    )
    i = max(range(len(rows)), key=rows.__getitem__)
    if rows[i] > LONG_ROW_TOKENS:
        per_request = 1 + hp.n_prefixes  # rows per request
        logger.warning(
            "%s makes rows of %d tokens (over %d; CounterFact prompts are under 30 tokens). Expect roughly "
            "%.0f s per optimisation step for these %d request(s), up to v_num_grad_steps=%d steps, and "
            "%.1f GB or more for this request's rows (scaled linearly from a trial: ~%.0f s and ~%.0f GB "
            "per step for one 2,000-token prompt; the device changes both). Shorten the prompt unless "
            "this is intended.",
            describe(i),
            rows[i],
            LONG_ROW_TOKENS,
            _TRIAL_S_PER_STEP * sum(rows) * per_request / _TRIAL_ROW_TOKENS,
            len(requests),
            hp.v_num_grad_steps,
            _TRIAL_GB * rows[i] * per_request / _TRIAL_ROW_TOKENS,
            _TRIAL_S_PER_STEP,
            _TRIAL_GB,
        )


def _delta_in_param_layout(adapter, delta: torch.Tensor) -> torch.Tensor:
    """(d_out, d_in) update -> the stored weight's layout (transposed for Conv1D)."""
    return delta.T if adapter.spec.transposed else delta


def compute_deltas(
    model: Model,
    tok: Tokenizer,
    requests: Sequence[EditRequest],
    hparams: EditHyperParams,
    *,
    progress: bool = True,
    use_cache: bool = True,
    reference: bool = False,
    diagnostics: bool = True,
    covariances: Mapping[int, SecondMoment] | None = None,
    attn_covariances: Mapping[int, SecondMoment] | None = None,
    cache_targets: bool = True,
    chunk_size: int | None = None,
    preserved: PreservedKeys | None = None,
) -> Deltas:
    """Compute the weight updates that write ``requests`` into ``model``; the model is left
    bit-identical (the updates are applied temporarily while later layers' keys are read).

    Args:
        hparams: :class:`PMETHyperParams` or :class:`MEMITHyperParams` (ablations are fields).
        use_cache: reuse cached covariance statistics, context prefixes and (with
            ``cache_targets``) optimised targets of identical requests.
        reference: run the slow full-recompute target optimisation (for tests/benchmarks).
        chunk_size: requests optimised together (None: the device's budget, :func:`.chunking.chunk_budget`;
            they do not interact, so this only bounds the memory of the backward pass).
        covariances / attn_covariances: precomputed statistics per layer (e.g. those of the
            unedited model, for sequential editing); by default computed or read from the cache.
        preserved: with ``hparams.null_space``, the keys of earlier edits to keep (read, never
            added to: add ``Deltas.keys`` with ``preserved.add_round(deltas)`` when the round is kept).

    Returns:
        :class:`Deltas` with one update per edited weight and metadata (hparams, requests,
        model identity, per-layer diagnostics, timings) and the optimisation trace.
    """
    hp = hparams
    requests, adapter = _check_inputs(model, tok, requests, hp)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    templates = context_templates(model, tok, hp, use_cache=use_cache)
    timings["prefixes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    covs, attn_covs = _statistics(model, tok, hp, covariances, attn_covariances, use_cache, progress)
    timings["covariance"] = time.perf_counter() - t0
    param_names = [adapter.weight_param_name(m) for m in _edited_modules(adapter, hp)]
    params = {n: get_parameter(model, n) for n in param_names}
    base_fp = param_fingerprint(model, param_names)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    layer_diag: list[dict] = []
    try:
        t0 = time.perf_counter()
        targets = optimize_targets_cached(
            model,
            tok,
            requests,
            hp,
            templates,
            reference=reference,
            progress=progress,
            use_cache=use_cache and cache_targets,
            chunk_size=chunk_size,
        )
        timings["targets"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        null_space = _null_space(model, hp, preserved, use_cache)
        solver = _Solver(
            model, tok, adapter, requests, templates, hp, targets, covs, attn_covs, diagnostics, null_space
        )
        out = _update_layers(solver, params, layer_diag, progress)
        timings["keys_solve"] = time.perf_counter() - t0
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(snapshot[name])
    meta = deltas_meta(
        model,
        hp.method,
        hp.to_dict(),
        [r.to_dict() for r in requests],
        base_fp,
        layers=list(hp.layers),
        diagnostics=layer_diag,
        timings=timings,
        targets=_target_meta(targets, hp),
        templates=templates,
        null_space=null_space_meta(null_space),
    )
    logger.info(
        "%s: %d requests, targets %.1fs, keys+solve %.1fs",
        hp.method,
        len(requests),
        timings["targets"],
        timings["keys_solve"],
    )
    return Deltas(out, meta, targets.trace, keys=null_space.keys if null_space is not None else {})


def _check_inputs(model: Model, tok: Tokenizer, requests, hp) -> tuple[list[EditRequest], Any]:
    """Validated requests and the model's adapter; clear errors before any work."""
    if not isinstance(hp, EditHyperParams):
        raise TypeError(f"hparams must be PMETHyperParams or MEMITHyperParams, got {type(hp).__name__}")
    requests = _as_requests(requests)
    lengths = _encoded_lengths(tok, requests)
    _check_conflicts(requests)
    adapter = get_adapter(model)
    check_layer_indices(hp.layers, adapter.n_layers, owner=type(model).__name__)
    _check_lengths(model, requests, lengths, hp)
    return requests, adapter


def _statistics(
    model, tok, hp: EditHyperParams, covariances, attn_covariances, use_cache: bool, progress: bool
) -> tuple[dict, dict]:
    """C_l for the FFN (and, with update_attn_weights, the MHSA projection) of every critical
    layer: the ones given, else computed or read from the cache (method.md §2 step 4)."""
    kw = dict(spec=hp.covariance, use_cache=use_cache, progress=progress)
    covs = dict(covariances) if covariances is not None else layer_covariances(model, tok, hp.layers, kind="ffn", **kw)
    attn_covs: dict = {}
    if hp.update_attn_weights:
        attn_covs = (
            dict(attn_covariances)
            if attn_covariances is not None
            else layer_covariances(model, tok, hp.layers, kind="attn", **kw)
        )
    for l in hp.layers:
        if l not in covs or (hp.update_attn_weights and l not in attn_covs):
            raise KeyError(f"no covariance statistics for critical layer {l}; provided layers {sorted(covs)}")
    return covs, attn_covs


def _null_space(model, hp: EditHyperParams, preserved: PreservedKeys | None, use_cache: bool) -> NullSpaceSolve | None:
    """The null-space solves of this call (None with ``hp.null_space`` off: the λ C_l solve)."""
    if not hp.null_space:
        if preserved is not None and len(preserved):
            logger.warning("preserved keys were given but hparams.null_space is False: they are ignored")
        return None
    store = KeyedStore("projectors", type(model).__name__) if use_cache else None
    energy = hp.null_space_energy if hp.null_space_rule == "energy" else None
    return NullSpaceSolve(hp.null_space_threshold, preserved, store, energy=energy, ridge=hp.null_space_ridge)


def _edited_modules(adapter, hp: EditHyperParams) -> list[str]:
    mods = [adapter.ffn_out_name(l) for l in hp.layers]
    if hp.update_attn_weights:
        mods += [adapter.attn_out_name(l) for l in hp.layers]
    return mods


def _update_layers(
    solver: _Solver, params: dict[str, torch.Tensor], layer_diag: list[dict], progress: bool
) -> dict[str, torch.Tensor]:
    """Steps 2-3 over the critical layers in order; each ΔW_l is added to the model at once, so
    the keys of later layers (and later stages of this layer) see it. Returns the summed updates."""
    out: dict[str, torch.Tensor] = {}
    n = len(solver.hp.layers)
    for i in tqdm(range(n), disable=not progress, desc="keys + solve"):
        for stage in _layer_stages(solver.hp):
            updates = [solver.solve(kind, i, layer_diag) for kind in stage]
            with torch.no_grad():
                for pname, d in updates:
                    params[pname].add_(d.to(params[pname].dtype))
                    out[pname] = out.get(pname, 0) + d.float().cpu()
    return out


def _target_meta(targets, hp: EditHyperParams) -> dict:
    """Per request: steps, final p(o*), norms, and the delivery diagnostics, with ``p_written`` the
    p(o*) of what this call writes (PMET: its ``ffn_target``; MEMIT: its δ itself)."""
    dl = {k: v.tolist() for k, v in targets.delivery.items()}
    written = dl.get(f"p_written_{hp.ffn_target}") if hp.residual_space == "ffn" else dl.get("p_optimised")
    return {
        "n_steps": targets.n_steps,
        "final_p_target": final_p_target(targets.trace, len(targets.n_steps)),
        "delta_norms": {k: v.norm(dim=1).tolist() for k, v in targets.deltas.items()},
        "init_norms": {k: v.norm(dim=1).tolist() for k, v in targets.inits.items()},
        "delivery": dl,
        "p_written": written,
    }


def _layer_stages(hp: EditHyperParams) -> list[tuple[str, ...]]:
    """Components updated at each critical layer, in order; the components of one stage read
    their keys and residuals on the same model (method.md §3: the released code updates W_O
    first and reads the FFN residual on that model)."""
    if not hp.update_attn_weights:
        return [("ffn",)]
    if hp.attn_update_order == "attn_first":
        return [("attn",), ("ffn",)]
    return [("attn", "ffn")]


@dataclass
class _Solver:
    """Everything one call's solves share (the model is read as it is at each call of solve)."""

    model: Any
    tok: Any
    adapter: Any
    requests: Sequence[EditRequest]
    templates: Sequence[str]
    hp: EditHyperParams
    targets: Any
    covs: Mapping[int, SecondMoment]
    attn_covs: Mapping[int, SecondMoment]
    diagnostics: bool
    null_space: NullSpaceSolve | None = None
    post_norm: bool = field(init=False)  # FFN residuals go through the FFN post-norm (post_norm_write resolved)

    def __post_init__(self) -> None:
        self.post_norm = resolve_post_norm_write(self.hp.post_norm_write, self.adapter)

    def solve(self, kind: str, i: int, layer_diag: list[dict]) -> tuple[str, torch.Tensor]:
        """Keys at the i-th critical layer l and residual at layer L, read on the model as it is
        now, for one component ("ffn": W_out from v^m or v; "attn": W_O from v^a); returns the
        parameter name and ΔW_l in the stored layout, and appends the solve's diagnostics."""
        hp, adapter = self.hp, self.adapter
        l, L, n = hp.layers[i], hp.layers[-1], len(hp.layers)
        if kind == "ffn":
            space, module, cov = hp.residual_space, adapter.ffn_out_name(l), self.covs[l]
            out_mod = adapter.layer_name(L) if space == "layer" else adapter.ffn_out_name(L)
        else:
            space, module, cov = "attn", adapter.attn_out_name(l), self.attn_covs[l]
            out_mod = adapter.attn_out_name(L)
        post = self.post_norm and kind == "ffn"  # the residual is meant for N_l's output (.postnorm_write)
        outs = post_norm_modules(adapter, space, (l, L), out_mod) if post else [out_mod]
        keys, cur = keys_and_outputs(self.model, self.tok, adapter, self.requests, self.templates, [module], outs)
        target = self.targets.written(space, hp.ffn_target, hp.norm_anchor)
        resid = target - cur[out_mod]
        sp = (i, n, hp.spread_exponent)
        pre = through_post_norm(adapter, space, (l, L), target, cur, sp, hp.post_norm_preimage) if post else None
        spread = pre.residual if pre is not None else spread_residual(resid, i, n, hp.spread_exponent)
        if self.null_space is None:
            res = solve_update(keys[module], spread, cov.mom2, hp.mom2_update_weight, diagnostics=self.diagnostics)
        else:
            res = self.null_space.solve(kind, l, keys[module], spread, cov.mom2, self.diagnostics)
        if not torch.isfinite(res.delta).all():
            raise FloatingPointError(f"non-finite update at layer {l} ({kind}); check λ and the covariance")
        layer_diag.append(
            {
                "layer": l,
                "component": kind,
                "condition_number": res.condition_number,
                "residual_norm_before": res.residual_norm_before,
                "residual_norm_after": res.residual_norm_after,
                "target_residual_norm": float(resid.norm()),
                "update_norm": res.update_norm,
                "post_norm_write": post,
                **(post_norm_diag(pre) if pre is not None else {}),
            }
        )
        return adapter.weight_param_name(module), _delta_in_param_layout(adapter, res.delta)
