"""Model loading and architecture adapters."""

from . import families  # noqa: F401  (registers the built-in adapters)
from .adapters import (
    ArchSpec,
    ModelAdapter,
    UnsupportedArchitectureError,
    get_adapter,
    register_adapter,
    supported_architectures,
)
from .loading import ModelLoadError, embedded_models, load_model, model_identity

__all__ = [
    "ArchSpec",
    "ModelAdapter",
    "UnsupportedArchitectureError",
    "get_adapter",
    "register_adapter",
    "supported_architectures",
    "ModelLoadError",
    "embedded_models",
    "load_model",
    "model_identity",
]
