"""Step 1: optimise the target hidden states at the last critical layer L (method.md §2).

Free vectors δ (one row per request, starting at 0) are added at the subject's last token of
every prompt to the hidden states named by ``hp.optimized_spaces``: the MHSA output a^L
("attn") and the FFN output m^L ("ffn") for PMET, the layer output h^L ("layer") for MEMIT.
Each step minimises, per request,

    loss = w · NLL + KL + decay                      (method.md §2, "Loss")

with Adam, then projects each δ into its norm ball; :func:`stop_decision` ends a request's
optimisation by ``hp.stop_rule``. Requests do not interact: each has its own δ rows and loss.

Read top to bottom: the loss terms (:func:`nll_term`, :func:`kl_term`, :func:`decay_term`, in :mod:`.loss`),
the projection (:func:`project_to_ball`), the stopping rules (:func:`stop_decision`) and the
loop that composes them (:func:`optimize_targets`). The rest lives next door:

* :mod:`.rows` builds the prompts (teacher-forced rows, KL rows) as token ids;
* :mod:`.stepper` runs the forward of one step (reference, layer replay or cached prefix);
* :mod:`.target_result` holds :class:`TargetResult`;
* :mod:`.target_cache` splits many requests into chunks (:func:`plan_chunks`) and caches each
  request's targets on disk; :func:`optimize_targets_chunked` and :func:`optimize_targets_cached`
  at the end of this module bind it to :func:`optimize_targets`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import torch

from ..devices import model_device
from ..hparams import EditHyperParams
from ..models.adapters import ModelAdapter, get_adapter
from ..progress import tqdm
from ..requests import EditRequest
from .delivery import delivery
from .loss import LossLayout, LossTerms, NLLTerm, decay_term, kl_term, nll_term, project_to_ball, stop_decision
from .rows import KIND_BARE, KL_TEMPLATE, Rows, build_rows
from .stepper import ForwardChecks, Stepper, StepSetup, initial_pass
from .target_cache import CHUNK_SIZE, CHUNK_TOKENS, fill_cache_sharded, plan_chunks, run_cached, run_chunked
from .target_result import TargetResult

logger = logging.getLogger(__name__)

__all__ = [
    "TargetResult",
    "NLLTerm",
    "nll_term",
    "kl_term",
    "decay_term",
    "project_to_ball",
    "stop_decision",
    "optimize_targets",
    "final_p_target",
    "optimize_targets_chunked",
    "optimize_targets_cached",
    "fill_targets_sharded",
    "ForwardChecks",
    # re-exported from .rows and .target_cache
    "build_rows",
    "Rows",
    "KL_TEMPLATE",
    "plan_chunks",
    "CHUNK_SIZE",
    "CHUNK_TOKENS",
]


# --- the loss terms (method.md §2, "Loss") --------------------------------------------------------
def optimize_targets(
    model,
    tok,
    requests: Sequence[EditRequest],
    hp: EditHyperParams,
    templates: Sequence[str],
    *,
    reference: bool = False,
    strategy: str = "auto",
    progress: bool = True,
    checks: ForwardChecks | None = None,
) -> TargetResult:
    """Optimise the targets of ``requests`` at layer L = hp.layers[-1] (method.md §2 step 1).

    Args:
        templates: context templates (``"{}"`` first), from :func:`context_templates`.
        reference: full recompute of every layer and full logits each step (slow; for tests
            and benchmarks). Results agree with the fast path up to float rounding.
        strategy: "auto" (= "prefix" when the model's cache reproduces the uncached logits,
            else "replay"), "prefix" or "replay"; ignored when ``reference``.
        checks: keeps the "auto" check's verdict; pass one object to several calls on the same
            model to check once (None: checked in this call).

    Returns:
        :class:`TargetResult` with (N, d_model) values, inits and deltas per value space.
    """
    if strategy not in ("auto", "prefix", "replay"):
        raise ValueError(f"strategy must be 'auto', 'prefix' or 'replay', got {strategy!r}")
    t0 = time.perf_counter()
    setup, inits = _start(model, tok, requests, hp, templates)
    rows, N = setup.rows, len(requests)
    # δ lives on layer L's device; the loss is computed where the logits are (the two differ
    # when the model is spread with device_map)
    ldev = setup.adapter.unembed_weight.device
    deltas = {
        s: torch.zeros(
            N, inits[s].shape[1], device=inits[next(iter(setup.names))].device, dtype=torch.float32, requires_grad=True
        )
        for s in setup.names
    }
    init_norm = {s: inits[s].norm(dim=1).to(torch.float32) for s in deltas}
    radius = _radius(hp, init_norm, inits)
    stepper = Stepper(setup, _forward_mode(setup, deltas, reference, strategy, checks or ForwardChecks()))
    opt = torch.optim.Adam(list(deltas.values()), lr=hp.v_lr)
    layout = LossLayout.of(rows, ldev)
    active, nll_weight = torch.ones(N, dtype=torch.bool), torch.ones(N, device=ldev)  # requests still optimised
    logp_init: torch.Tensor | None = None
    trace: list[dict] = []
    bar = tqdm(range(hp.v_num_grad_steps), disable=not progress, desc=f"{hp.method} targets (N={N})")
    for step in bar:
        act_idx = active.nonzero().squeeze(1)
        with torch.enable_grad():
            out = stepper.run(deltas, torch.isin(rows.req, act_idx).nonzero().squeeze(1))
            k_logp, k_req = torch.log_softmax(out.k_logits.float(), -1), rows.req[out.k_rows].to(ldev)
            if logp_init is None:  # the first step runs every request at δ = 0
                logp_init = torch.zeros(N, k_logp.shape[1], device=ldev).index_put((k_req,), k_logp.detach())
            terms = LossTerms(
                nll_term(out.t_logits, rows.t_row[out.t_idx].to(ldev), rows.t_tok[out.t_idx].to(ldev), layout),
                kl_term(k_logp, k_req, logp_init, hp.kl_factor),
                decay_term(deltas, init_norm, hp.v_weight_decay, ldev),
            )
            loss_each = terms.total(nll_weight)
            loss = loss_each[active.clone().to(ldev)].sum()  # requests stopping now are frozen in _update
            rows_now, stop, next_weight = _decide(hp, step, act_idx, loss_each, terms, nll_weight)
            trace += rows_now
            if progress:
                bar.set_postfix(
                    loss=f"{_mean(rows_now, 'loss'):.3f}", p=f"{_mean(rows_now, 'p_target'):.3f}", active=len(rows_now)
                )
            active &= ~stop
            if not active.any() or step == hp.v_num_grad_steps - 1:
                break  # at most v_num_grad_steps − 1 updates, as released
            _update(opt, deltas, loss, active, radius, step)
        nll_weight = next_weight
    bar.close()
    p_opt = torch.tensor(final_p_target(trace, N))
    delivered, observed = delivery(stepper, deltas, inits, radius, p_opt, hp, layout)
    return _result(setup.layer, hp, inits, deltas, trace, N, time.perf_counter() - t0, delivered, observed)


def _radius(
    hp: EditHyperParams, init_norm: Mapping[str, torch.Tensor], inits: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each δ's ball radius (N,): clamp_norm_factor × ‖its own init‖ ("component", released) or
    × ‖h^L_init‖ of the request ("residual", MEMIT's reference; issue #21)."""
    if hp.clamp_reference == "residual":
        ref = inits["layer"].norm(dim=1).to(torch.float32)
        return {s: hp.clamp_norm_factor * ref.to(n.device) for s, n in init_norm.items()}
    return {s: hp.clamp_norm_factor * n for s, n in init_norm.items()}


def final_p_target(trace: list[dict], n: int) -> list[float]:
    """Each request's p(o*) at its final δ (its last trace row: a request's δ is frozen when it stops)."""
    last: dict[int, float] = {}
    for row in trace:
        last[row["request"]] = row["p_target"]
    return [last.get(i, float("nan")) for i in range(n)]


def optimize_targets_chunked(
    model,
    tok,
    requests: Sequence[EditRequest],
    hp: EditHyperParams,
    templates: Sequence[str],
    *,
    chunk_size: int | None = None,
    reference: bool = False,
    progress: bool = True,
) -> TargetResult:
    """:func:`optimize_targets` over the chunks of :func:`plan_chunks` (requests do not interact,
    so chunking only bounds the memory of the backward pass); see :func:`.target_cache.run_chunked`."""
    # optimize_targets is looked up here at call time, so tests can count the chunks it runs
    return run_chunked(
        optimize_targets,
        model,
        tok,
        requests,
        hp,
        templates,
        chunk_size=chunk_size,
        reference=reference,
        progress=progress,
    )


def optimize_targets_cached(
    model,
    tok,
    requests: Sequence[EditRequest],
    hp: EditHyperParams,
    templates: Sequence[str],
    *,
    reference: bool = False,
    progress: bool = True,
    use_cache: bool = True,
    chunk_size: int | None = None,
) -> TargetResult:
    """:func:`optimize_targets` with a per-request disk cache, chunk by chunk (an interrupted run
    resumes after the last finished chunk); see :func:`.target_cache.run_cached`."""
    return run_cached(
        optimize_targets,
        model,
        tok,
        requests,
        hp,
        templates,
        reference=reference,
        progress=progress,
        use_cache=use_cache,
        chunk_size=chunk_size,
    )


def fill_targets_sharded(
    model,
    tok,
    requests: Sequence[EditRequest],
    hp: EditHyperParams,
    templates: Sequence[str],
    *,
    rank: int,
    world: int,
    barrier,
    progress: bool = True,
    chunk_size: int | None = None,
) -> int:
    """This worker's share of the per-request target cache of ``requests`` (chunks dealt
    round-robin over ``world`` workers; see :func:`.target_cache.fill_cache_sharded`)."""
    return fill_cache_sharded(
        optimize_targets,
        model,
        tok,
        requests,
        hp,
        templates,
        rank=rank,
        world=world,
        barrier=barrier,
        progress=progress,
        chunk_size=chunk_size,
    )


def _start(
    model, tok, requests: Sequence[EditRequest], hp: EditHyperParams, templates: Sequence[str]
) -> tuple[StepSetup, dict[str, torch.Tensor]]:
    """The rows, the forward setup and the initial values a^L, m^L, h^L (N, d_model) read at the
    subject's last token of the bare prompt (method.md §2, "Outputs")."""
    adapter, L = get_adapter(model), hp.layers[-1]
    adapter.layer_name(L)  # a layer the model lacks fails here, with the valid range
    rows = build_rows(tok, requests, templates)
    names = {s: _hooked_module(adapter, s, L) for s in hp.optimized_spaces}
    setup, at_lookup = initial_pass(model, adapter, rows, L, names, model_device(model))
    bare = (rows.kind == KIND_BARE).nonzero().squeeze(1)  # one bare row per request, in request order
    return setup, {k: x[bare.to(x.device)].clone() for k, x in at_lookup.items()}


def _mean(rows: list[dict], column: str) -> float:
    return sum(r[column] for r in rows) / len(rows)


def _hooked_module(adapter: ModelAdapter, space: str, L: int) -> str:
    """The module of layer L whose output holds the hidden state of ``space``."""
    return {"ffn": adapter.ffn_out_name(L), "attn": adapter.attn_out_name(L), "layer": adapter.layer_name(L)}[space]


def _forward_mode(
    setup: StepSetup, deltas: Mapping[str, torch.Tensor], reference: bool, strategy: str, checks: ForwardChecks
) -> str:
    """The :class:`Stepper` mode: "reference", the requested strategy, or for "auto" "prefix"
    when the cached prefix reproduces the uncached logits (``checks``), else "replay"."""
    if reference:
        return "reference"
    if strategy != "auto":
        return strategy
    if checks.prefix_ok(setup, deltas):
        return "prefix"
    logger.info(
        "cached-prefix optimisation does not reproduce the uncached logits for %s; using replay",
        type(setup.model).__name__,
    )
    return "replay"


def _decide(
    hp: EditHyperParams,
    step: int,
    act_idx: torch.Tensor,
    loss_each: torch.Tensor,
    terms: LossTerms,
    nll_weight: torch.Tensor,
) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """After one step: the trace rows of the active requests, which of them stop (N,) and the
    NLL weight (N,) for the next step (:func:`stop_decision`)."""
    stats = (
        torch.stack([loss_each, terms.nll.nll, terms.kl, terms.decay, terms.nll.p_target, terms.nll.n_wrong])
        .detach()
        .cpu()
        .tolist()
    )
    stop = torch.zeros(len(nll_weight), dtype=torch.bool)
    next_weight = nll_weight.clone()
    rows = []
    for i in act_idx.tolist():
        l_i, nll_i, kl_i, decay_i, p_i, wrong_i = (col[i] for col in stats)
        rows.append(
            {
                "request": i,
                "step": step,
                "loss": l_i,
                "nll": nll_i,
                "kl": kl_i,
                "decay": decay_i,
                "p_target": p_i,
                "nll_weight": float(nll_weight[i]),
                "argmax": wrong_i == 0,
            }
        )
        stop[i], next_weight[i] = stop_decision(hp, l_i, kl_i, wrong_i)
    return rows, stop, next_weight


def _update(
    opt: torch.optim.Optimizer,
    deltas: Mapping[str, torch.Tensor],
    loss: torch.Tensor,
    active: torch.Tensor,
    max_norm: Mapping[str, torch.Tensor],
    step: int,
) -> None:
    """One Adam step on ``loss``; stopped requests keep their δ, and every δ is projected into
    its ball of radius ``max_norm[s]`` (N,)."""
    stopped = ~active.to(next(iter(deltas.values())).device)
    frozen = {s: d.detach()[stopped].clone() for s, d in deltas.items()}
    params = list(deltas.values())
    # autograd.grad, not backward(): no .grad is left on model weights that require grad
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    opt.step()
    with torch.no_grad():
        for s, d in deltas.items():
            d[stopped] = frozen[s]
            project_to_ball(d, max_norm[s])
            if not torch.isfinite(d).all():
                raise FloatingPointError(f"non-finite δ in space {s!r} at step {step}; lower v_lr")


def _result(
    L: int,
    hp: EditHyperParams,
    inits: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    trace: list[dict],
    N: int,
    seconds: float,
    delivered: Mapping[str, torch.Tensor],
    observed: Mapping[str, torch.Tensor],
) -> TargetResult:
    """Targets v = init + δ for every value space (δ = 0 where the space was not optimised), the
    observed targets and the delivery diagnostics (:func:`.delivery.delivery`)."""
    keep = list(hp.value_spaces)
    out = {s: deltas[s].detach().clone() if s in deltas else torch.zeros_like(inits[s]) for s in keep}
    values = {s: inits[s] + out[s].to(inits[s].dtype) for s in keep}
    n_steps = [0] * N
    for row in trace:
        n_steps[row["request"]] = row["step"] + 1
    return TargetResult(
        layer=L,
        values=values,
        inits={s: inits[s] for s in keep},
        deltas=out,
        n_steps=n_steps,
        trace=trace,
        seconds=seconds,
        observed=dict(observed),
        delivery=dict(delivered),
    )
