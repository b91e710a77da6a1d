"""Model loading and one adapter per architecture family (docs/architecture.md)."""
from __future__ import annotations

from .base import BlockContext, ModelAdapter, first_tensor
from .families import (ADAPTERS, SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError, adapter_class_for,
                       adapter_for)
from .loading import ModelAndTokenizer, embedded_model_path, load_model, load_model_spec

__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "BlockContext", "ModelAdapter", "ModelAndTokenizer",
           "UnsupportedArchitectureError", "adapter_class_for", "adapter_for", "embedded_model_path",
           "first_tensor", "load_model", "load_model_spec"]
