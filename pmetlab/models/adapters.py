"""Architecture adapters: one declarative record per model family, chosen by the model class.

Solvers never touch module paths; they ask a :class:`ModelAdapter` (an :class:`ArchSpec`
bound to a model) for the name of layer ``l``, its MHSA output projection, its FFN output
projection (whose *input* is the FFN key), the final norm and the unembedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..tracing import get_module
from .postnorm import PostNorm, read_post_norm

logger = logging.getLogger(__name__)

__all__ = [
    "ArchSpec",
    "ModelAdapter",
    "register_adapter",
    "get_adapter",
    "supported_architectures",
    "UnsupportedArchitectureError",
]


class UnsupportedArchitectureError(LookupError):
    """The model's class has no registered adapter."""


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family (dotted names; ``{}`` is the layer index).

    Attributes:
        family: short family name ("llama", "gpt2", ...).
        model_classes: class names of the causal-LM wrappers this record covers.
        layers: dotted name of the ModuleList of decoder layers.
        attn: MHSA module inside a layer; ``attn_out``: its output projection.
        mlp: FFN module inside a layer; ``ffn_out``: its output projection (input = the key).
        final_norm: the norm before the unembedding; ``unembed``: the LM head.
        transposed: the FFN/attention output weights are stored (in, out) (GPT-2's Conv1D).
        parallel: attention and FFN read the same residual stream h^{l-1} (GPT-J, GPT-NeoX, Phi).
        parallel_config_attr: config attribute that overrides ``parallel`` when the model's
            config has it (GPT-NeoX's ``use_parallel_residual``), or None.
        ffn_flat: the FFN runs on tokens flattened to (batch·seq, d) (OPT), so traced FFN inputs
            and outputs are 2-D; :meth:`ModelAdapter.unflatten` gives the (batch, seq, d) view.
        attn_post_norm / ffn_post_norm: norms applied to a component's output before it joins
            the residual stream (Gemma 2/3), or None.
        post_norm_offset: the post-norms are RMSNorms with gain g = post_norm_offset + weight
            (Gemma's store w with g = 1 + w; a plain RMSNorm's g is its weight: 0.0).
        attn_input: module inside a layer whose *first input* is what MHSA reads (its normed
            input); None means ``attn`` itself. Read by the paper protocol of method.md §5, whose
            MHSA output is the output of ``attn`` (for Gemma 2/3 before ``attn_post_norm``).
        ffn_input: module inside a layer whose *first input* is what the FFN reads; None means
            ``mlp`` itself. OPT has no FFN module (``mlp`` is ``fc2``), so its FFN reads the input
            of ``fc1``. The paper protocol's FFN output is the output of ``mlp`` (OPT: ``fc2``;
            Gemma 2/3: before ``ffn_post_norm``, i.e. what the module computes).
        n_layers_attr: config attribute(s) holding the number of layers.
    """

    family: str
    model_classes: tuple[str, ...]
    layers: str
    attn: str
    attn_out: str
    mlp: str
    ffn_out: str
    final_norm: str
    unembed: str = "lm_head"
    transposed: bool = False
    parallel: bool = False
    parallel_config_attr: str | None = None
    ffn_flat: bool = False
    attn_post_norm: str | None = None
    ffn_post_norm: str | None = None
    post_norm_offset: float = 0.0
    attn_input: str | None = None
    ffn_input: str | None = None
    n_layers_attr: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers")


_REGISTRY: dict[str, ArchSpec] = {}


def register_adapter(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Register an adapter for the classes named in ``spec.model_classes``.

    Example::

        pmetlab.models.register_adapter(pmetlab.models.ArchSpec(
            family="mymodel", model_classes=("MyModelForCausalLM",), layers="model.layers",
            attn="self_attn", attn_out="self_attn.o_proj", mlp="mlp", ffn_out="mlp.down_proj",
            final_norm="model.norm"))
    """
    for cls in spec.model_classes:
        if cls in _REGISTRY and not overwrite and _REGISTRY[cls] != spec:
            raise ValueError(
                f"an adapter for {cls!r} is already registered (family "
                f"{_REGISTRY[cls].family!r}); pass overwrite=True to replace it"
            )
        _REGISTRY[cls] = spec
    return spec


def supported_architectures() -> list[str]:
    """The model classes that have an adapter, sorted."""
    return sorted(_REGISTRY)


def _weight_of(module: nn.Module) -> torch.Tensor:
    if not hasattr(module, "weight"):
        raise TypeError(f"{type(module).__name__} has no weight")
    return module.weight


@dataclass
class ModelAdapter:
    """An :class:`ArchSpec` bound to one model instance."""

    model: nn.Module
    spec: ArchSpec
    _n_layers: int = field(init=False)

    def __post_init__(self) -> None:
        # Resolve every name once, so a variant the record does not fit (e.g. OPT-350m, which has
        # no final norm) fails here with one clear message rather than deep inside a solver.
        try:
            self._n_layers = len(get_module(self.model, self.spec.layers))
            names = [self.spec.final_norm, self.spec.unembed]
            if self._n_layers:
                names += [
                    n
                    for n in (
                        self.attn_name(0),
                        self.attn_out_name(0),
                        self.mlp_name(0),
                        self.ffn_out_name(0),
                        self.attn_post_norm_name(0),
                        self.ffn_post_norm_name(0),
                        self.attn_input_name(0),
                        self.ffn_input_name(0),
                    )
                    if n is not None
                ]
            for n in names:
                get_module(self.model, n)
        except LookupError as exc:
            raise UnsupportedArchitectureError(
                f"the {self.spec.family!r} adapter does not fit this {type(self.model).__name__}: {exc}. "
                f"Register a matching ArchSpec with pmetlab.models.register_adapter(..., overwrite=True)"
            ) from None

    # --- sizes -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def d_model(self) -> int:
        w = self.ffn_out_weight(0)
        return int(w.shape[0])

    @property
    def d_ff(self) -> int:
        """Size of the FFN key (the input of the FFN output projection)."""
        return int(self.ffn_out_weight(0).shape[1])

    @property
    def d_attn(self) -> int:
        """Size of the MHSA output projection's input (heads × head_dim)."""
        return int(self.attn_out_weight(0).shape[1])

    @property
    def parallel(self) -> bool:
        """Whether attention and FFN of a layer read the same residual stream h^{l-1}."""
        attr = self.spec.parallel_config_attr
        cfg = getattr(self.model, "config", None)
        if attr is not None and cfg is not None and hasattr(cfg, attr):
            return bool(getattr(cfg, attr))
        return self.spec.parallel

    def unflatten(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """A traced tensor as ``(batch, seq, d)``: OPT's FFN sees ``(batch·seq, d)``; 3-D tensors
        pass through. The result is a view, so in-place edits reach the model's tensor."""
        if x.dim() == 2:
            if x.shape[0] % batch_size:
                raise ValueError(f"cannot split {x.shape[0]} flattened tokens into {batch_size} sequences")
            return x.view(batch_size, -1, x.shape[-1])
        return x

    # --- names -----------------------------------------------------------------------------
    def _check(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not -self.n_layers <= layer < self.n_layers:
            raise ValueError(
                f"layer {layer} is out of range for a model with {self.n_layers} layers (valid: 0..{self.n_layers - 1})"
            )
        return layer % self.n_layers

    def layer_name(self, layer: int) -> str:
        return f"{self.spec.layers}.{self._check(layer)}"

    def attn_name(self, layer: int) -> str:
        return f"{self.layer_name(layer)}.{self.spec.attn}"

    def mlp_name(self, layer: int) -> str:
        return f"{self.layer_name(layer)}.{self.spec.mlp}"

    def attn_out_name(self, layer: int) -> str:
        """MHSA output projection W_O (its output is a^l; its input is the MHSA key)."""
        return f"{self.layer_name(layer)}.{self.spec.attn_out}"

    def ffn_out_name(self, layer: int) -> str:
        """FFN output projection W_out (its input is the FFN key k^l; its output is m^l)."""
        return f"{self.layer_name(layer)}.{self.spec.ffn_out}"

    def attn_post_norm_name(self, layer: int) -> str | None:
        p = self.spec.attn_post_norm
        return None if p is None else f"{self.layer_name(layer)}.{p}"

    def ffn_post_norm_name(self, layer: int) -> str | None:
        p = self.spec.ffn_post_norm
        return None if p is None else f"{self.layer_name(layer)}.{p}"

    def ffn_post_norm(self, layer: int) -> PostNorm | None:
        """The norm on layer ``layer``'s FFN output before the residual stream (Gemma 2/3's
        ``post_feedforward_layernorm``) with its gain read from the model, or None (no post-norm)."""
        name = self.ffn_post_norm_name(layer)
        return None if name is None else read_post_norm(self.module(name), self.spec.post_norm_offset, name)

    def attn_input_name(self, layer: int) -> str:
        """Module whose first input is what MHSA reads at ``layer`` (its normed input)."""
        return f"{self.layer_name(layer)}.{self.spec.attn_input or self.spec.attn}"

    def ffn_input_name(self, layer: int) -> str:
        """Module whose first input is what the FFN reads at ``layer`` (its normed input)."""
        return f"{self.layer_name(layer)}.{self.spec.ffn_input or self.spec.mlp}"

    @property
    def final_norm_name(self) -> str:
        return self.spec.final_norm

    @property
    def unembed_name(self) -> str:
        return self.spec.unembed

    # --- modules and weights ---------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        return get_module(self.model, name)

    def layers(self) -> nn.ModuleList:
        return get_module(self.model, self.spec.layers)  # type: ignore[return-value]

    def ffn_out_weight(self, layer: int) -> torch.Tensor:
        """W_out of layer ``layer`` as a (d_model, d_ff) view (transposed for Conv1D)."""
        w = _weight_of(self.module(self.ffn_out_name(layer)))
        return w.t() if self.spec.transposed else w

    def attn_out_weight(self, layer: int) -> torch.Tensor:
        """W_O of layer ``layer`` as a (d_model, d_attn) view."""
        w = _weight_of(self.module(self.attn_out_name(layer)))
        return w.t() if self.spec.transposed else w

    def weight_param_name(self, module_name: str) -> str:
        return f"{module_name}.weight"

    @property
    def unembed_weight(self) -> torch.Tensor:
        """The unembedding, (vocab, d_model); tied embeddings are read through the LM head."""
        return _weight_of(self.module(self.unembed_name))

    @property
    def input_embed_weight(self) -> torch.Tensor:
        """The input embedding matrix ``get_input_embeddings().weight``, (vocab, d_model)."""
        emb = self.model.get_input_embeddings()
        if emb is None:
            raise UnsupportedArchitectureError(f"{type(self.model).__name__} has no input embeddings")
        return _weight_of(emb)

    @property
    def unembed_bias(self) -> torch.Tensor | None:
        return getattr(self.module(self.unembed_name), "bias", None)

    @property
    def logit_softcap(self) -> float | None:
        cfg = getattr(self.model, "config", None)
        cap = getattr(cfg, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def logits_from_normed(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final-normed hidden states ``(..., d_model) -> (..., vocab)``, exactly as
        the model's LM head computes them (bias and soft-capping included)."""
        w = self.unembed_weight
        logits = torch.nn.functional.linear(h.to(w.device), w, self.unembed_bias)
        cap = self.logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def describe(self) -> dict:
        return {
            "family": self.spec.family,
            "class": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "parallel": self.parallel,
            "transposed": self.spec.transposed,
        }


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, looked up by its class (and base classes), never by name."""
    for cls in type(model).__mro__:
        spec = _REGISTRY.get(cls.__name__)
        if spec is not None:
            return ModelAdapter(model, spec)
    raise UnsupportedArchitectureError(
        f"no pmetlab adapter for model class {type(model).__name__!r}. Supported classes: "
        f"{', '.join(supported_architectures())}. Register one with "
        f"pmetlab.models.register_adapter(pmetlab.models.ArchSpec(family=..., model_classes="
        f"({type(model).__name__!r},), layers=..., attn=..., attn_out=..., mlp=..., ffn_out=..., "
        f"final_norm=...))."
    )
