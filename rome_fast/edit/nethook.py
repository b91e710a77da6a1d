"""Forward hooks on named submodules, in the spirit of the reference's `Trace`: keep a module's
input and/or output, optionally rewrite its output, optionally stop the forward right after it."""
from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook with stop=True to cut the forward pass short after the traced module."""


class Trace:
    """`with Trace(model, "model.layers.5.mlp.down_proj", retain_input=True, stop=True) as tr:
    model(**batch)` -> tr.input / tr.output. `edit_output(output, name) -> output` may replace the
    module's output (its hidden tensor, the first item when the module returns a tuple).
    before=True keeps the input (and stops) before the module runs: its output is never computed."""

    def __init__(self, model: nn.Module, layer: str, retain_input: bool = False,
                 retain_output: bool = False, edit_output=None, stop: bool = False,
                 detach: bool = True, before: bool = False):
        self.name, self.input, self.output = layer, None, None
        module = model.get_submodule(layer)
        if before:
            if retain_output or edit_output is not None:
                raise ValueError("a Trace before the module sees no output to keep or edit")

            def pre_hook(_module, args):
                if retain_input:
                    self.input = args[0].detach() if detach else args[0]
                if stop:
                    raise StopForward()

            self._handle = module.register_forward_pre_hook(pre_hook)
            return

        def hook(_module, args, output):
            if retain_input:
                x = args[0]
                self.input = x.detach() if detach else x
            if edit_output is not None:
                if isinstance(output, tuple):
                    output = (edit_output(output[0], layer),) + output[1:]
                else:
                    output = edit_output(output, layer)
            if retain_output:
                y = output[0] if isinstance(output, tuple) else output
                self.output = y.detach() if detach else y
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook)

    def close(self):
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        # a StopForward from our own hook ends the `with` block quietly, as the reference's does
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(dict):
    """Several `Trace`s at once: {name: Trace}. `stop=True` stops after (with before=True: at)
    the last name given."""

    def __init__(self, model: nn.Module, layers, retain_input=False, retain_output=False,
                 edit_output=None, stop=False, detach=True, before=False):
        super().__init__()
        layers = list(layers)
        for i, name in enumerate(layers):
            self[name] = Trace(model, name, retain_input, retain_output, edit_output,
                               stop=stop and i == len(layers) - 1, detach=detach, before=before)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for t in self.values():
            t.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def in_execution_order(model: nn.Module, names) -> list[str]:
    """`names` in the order their modules run (registration order, which the supported families
    follow), so a TraceDict with stop=True stops after the last of them to run."""
    wanted = set(names)
    order = [n for n, _ in model.named_modules() if n in wanted]
    if len(order) != len(wanted):
        raise ValueError(f"no module named {sorted(wanted - set(order))} in the model")
    return order


def set_requires_grad(requires_grad: bool, *models: nn.Module) -> None:
    for m in models:
        for p in m.parameters():
            p.requires_grad_(requires_grad)


def module_input_size(model: nn.Module, name: str) -> int:
    """Input width of a linear-like module: nn.Linear (out, in) or GPT-2 Conv1D (in, out)."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"no module named {name!r} in the model") from None
    for attr in ("in_features", "nx"):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        from ..models import adapter_for
        return w.shape[0] if adapter_for(model).weight_layout == "in_out" else w.shape[1]
    raise ValueError(f"module {name!r} is not a linear layer: cannot tell its input width")
