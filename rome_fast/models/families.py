"""The supported families, one adapter each, and the choice of a model's adapter by its
`config.model_type`."""
from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .gpt2 import GPT2Adapter
from .gptj import GPTJAdapter
from .llama import LlamaAdapter
from .neox import GPTNeoXAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (GPT2Adapter, GPTJAdapter, GPTNeoXAdapter, LlamaAdapter)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


class UnsupportedArchitectureError(ValueError):
    pass


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    families = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}; rome_fast supports the families {families}")


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a transformers causal LM, chosen by `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return adapter_class_for(model_type)(model)
