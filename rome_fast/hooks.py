"""Forward hooks on named submodules, with the reference's `nethook` names, signatures and defaults.

`Trace` keeps a module's input and/or output during a forward pass, may rewrite its output, and
may stop the forward right after it (or, with our `before=True`, right before it). `TraceDict`
does the same for several modules. Both are context managers that remove their hooks on exit.

As the reference: a module's output is kept and edited as the module returns it, so a module that
returns a tuple (attention, some transformer blocks) yields the tuple, whose first element is the
hidden tensor (`first_tensor` picks it); `edit_output` is called with the arguments it is written
to accept among `output` and `layer` (`invoke_with_optional_args`): `fn(output)` and
`fn(output, layer)` both work, the usual forms for `Trace` and `TraceDict`. Unlike the reference,
`clone` / `detach` reach the tensors inside a tuple too, and non-tensor items (None) pass through.

In the package's layers (docs/architecture.md) this module sits above `models/` and below `trace/`
and `edit/`, which both use it."""
from __future__ import annotations

import copy
import inspect
from collections import OrderedDict

import torch
from torch import nn

from .models import adapter_for, first_tensor

__all__ = ["StopForward", "Trace", "TraceDict", "first_tensor", "get_module", "get_parameter",
           "hierarchical_subsequence", "in_execution_order", "invoke_with_optional_args",
           "module_input_size", "recursive_copy", "replace_module", "set_requires_grad", "subsequence"]


class StopForward(Exception):
    """Raised by a hook with stop=True to cut the forward pass short at the traced module; the
    `with` block of the Trace or TraceDict that asked for it ends quietly."""


def recursive_copy(x, clone=None, detach=None, retain_grad=None):
    """`x` (a tensor, or a tuple / list / dict of them) detached and/or cloned as asked; with
    `retain_grad`, tensors are made to keep their gradient instead of being detached."""
    if not clone and not detach and not retain_grad:
        return x
    if isinstance(x, torch.Tensor):
        if retain_grad:
            if not x.requires_grad:
                x.requires_grad = True
            x.retain_grad()
        elif detach:
            x = x.detach()
        return x.clone() if clone else x
    if isinstance(x, dict):
        return type(x)({k: recursive_copy(v, clone, detach, retain_grad) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return type(x)([recursive_copy(v, clone, detach, retain_grad) for v in x])
    return x  # None and other non-tensor items of a module's output


def _call_plan(fn, n_positional: int, names: tuple):
    """How to call `fn` with n positional values and keyword values called `names`, passing only
    what it accepts (see `invoke_with_optional_args`). Returns call(args, kwargs)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: give it the first value
        return lambda args, kwargs: fn(*(args[:1] or [kwargs[n] for n in names[:1]]))
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in params)
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
    # each positional parameter takes: the keyword value of its name, else the next positional
    # value, else the next keyword value no parameter asked for by name, else its default
    sources, used, pos = [], {p.name for p in positional if p.name in names}, 0
    spare = [n for n in names if n not in used and n not in keyword_only]
    for p in positional:
        if p.name in names:
            sources.append(("kw", p.name))
        elif pos < n_positional:
            sources.append(("pos", pos))
            pos += 1
        elif spare:
            name = spare.pop(0)
            used.add(name)
            sources.append(("kw", name))
        elif p.default is not p.empty:
            sources.append(("default", p.default))
        else:
            raise TypeError(f"{getattr(fn, '__name__', fn)}() needs an argument {p.name!r} that "
                            f"the caller does not provide (it passes {', '.join(names) or 'none'})")
    by_name = [n for n in names if n not in used and (n in keyword_only or var_keyword)]
    extra_from = pos if var_positional else None

    def call(args, kwargs):
        values = [args[s] if how == "pos" else kwargs[s] if how == "kw" else s for how, s in sources]
        if extra_from is not None:
            values += list(args[extra_from:])
        return fn(*values, **{n: kwargs[n] for n in by_name})

    return call


def invoke_with_optional_args(fn, *args, **kwargs):
    """Call `fn` with only the arguments it is written to accept: keyword values go to parameters
    of their name, the positional values to the remaining parameters in order, then unclaimed
    keyword values in order; what `fn` cannot accept is dropped, and a required parameter nobody
    fills raises TypeError."""
    return _call_plan(fn, len(args), tuple(kwargs))(args, kwargs)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` ("" is the model itself); LookupError if there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LookupError(name) from None


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter called `name`; LookupError if there is none."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise LookupError(name) from None


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put `new_module` in the place of the submodule called `name`."""
    parent, _, attr = name.rpartition(".")
    setattr(get_module(model, parent) if parent else model, attr, new_module)


def set_requires_grad(requires_grad: bool, *models) -> None:
    """Set `requires_grad` on every parameter of the given modules and on the given tensors."""
    for m in models:
        if isinstance(m, nn.Module):
            for p in m.parameters():
                p.requires_grad = requires_grad
        elif isinstance(m, torch.Tensor):
            m.requires_grad = requires_grad
        else:
            raise TypeError(f"set_requires_grad takes modules and tensors, not {type(m).__name__}")


def subsequence(sequential: nn.Module, first_layer=None, last_layer=None, after_layer=None,
                upto_layer=None, single_layer=None, share_weights: bool = False) -> nn.Sequential:
    """The run of an nn.Sequential's modules from `first_layer` (or just after `after_layer`)
    through `last_layer` (or up to, not including, `upto_layer`); `single_layer` is one module.
    Dotted names reach into nested Sequentials, keeping the part of each one that lies inside
    the bounds. The modules are deep copies unless `share_weights`."""
    if single_layer is not None:
        if any(b is not None for b in (first_layer, last_layer, after_layer, upto_layer)):
            raise ValueError("single_layer cannot be combined with first/last/after/upto_layer")
        first_layer = last_layer = single_layer
    split = [None if b is None else b.split(".") for b in (first_layer, last_layer, after_layer, upto_layer)]
    return hierarchical_subsequence(sequential, *split, share_weights=share_weights)


def hierarchical_subsequence(sequential: nn.Module, first, last, after, upto, share_weights: bool = False,
                             depth: int = 0):
    """`subsequence` on bounds given as lists of name components; `depth` is the component
    that names a child of `sequential`. Returns None for an empty part below the top level."""
    if first is not None and after is not None:
        raise ValueError("give first or after, not both")
    if last is not None and upto is not None:
        raise ValueError("give last or upto, not both")
    bounds = {"first": first, "last": last, "after": after, "upto": upto}
    if all(b is None for b in bounds.values()):
        return sequential if share_weights else copy.deepcopy(sequential)
    if not isinstance(sequential, nn.Sequential):
        where = next(".".join(b[:depth]) for b in bounds.values() if b is not None) or "the model"
        raise ValueError(f"{where} is not an nn.Sequential: a subsequence cannot reach into it")
    # per bound: its name at this depth, and whether it names a module deeper inside that child
    here = {k: (b[depth], len(b) > depth + 1) for k, b in bounds.items() if b is not None}
    found = set()
    inside = first is None and after is None
    kept = OrderedDict()
    for name, child in sequential.named_children():
        hits = {k for k, (n, _) in here.items() if n == name}
        found |= hits
        deeper = {k: bounds[k] for k in hits if here[k][1]}
        if "first" in hits or "after" in deeper:
            inside = True
        if "upto" in hits and "upto" not in deeper:
            inside = False
        if inside:
            part = hierarchical_subsequence(child, deeper.get("first"), deeper.get("last"), deeper.get("after"),
                                            deeper.get("upto"), share_weights, depth + 1)
            if part is not None:
                kept[name] = part
        if "last" in hits or "upto" in deeper:
            inside = False
        if "after" in hits and "after" not in deeper:
            inside = True
    missing = [".".join(bounds[k]) for k in here if k not in found]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} to bound the subsequence")
    if not kept and depth > 0:
        return None
    result = nn.Sequential(kept)
    result.training = sequential.training
    return result


def _retained_input(args: tuple):
    # as the reference: the one positional input itself, else the tuple of them
    return args[0] if len(args) == 1 else args


class Trace:
    """`with Trace(model, "model.layers.5.mlp.down_proj", retain_input=True) as tr: model(**batch)`
    → `tr.input`, `tr.output` (the module's raw output: a tuple stays a tuple).

    retain_output / retain_input: keep the output / the positional input(s). clone, detach: copy or
    detach what is kept. retain_grad: make the kept output keep its gradient (the forward then goes
    on with a copy, so in-place steps after the module do not clash). edit_output: a function of
    (output[, layer]) returning the output to use from here on. stop: raise StopForward after the
    module (ending the `with` block quietly). before (ours): keep the input and/or stop before the
    module runs, so its output is never computed."""

    def __init__(self, module: nn.Module, layer: str | None = None, retain_output: bool = True,
                 retain_input: bool = False, clone: bool = False, detach: bool = False,
                 retain_grad: bool = False, edit_output=None, stop: bool = False, before: bool = False):
        self.layer = layer
        self.input = None
        self.output = None
        self.stop = stop
        if layer is not None:
            module = get_module(module, layer)
        if before:
            if edit_output is not None:
                raise ValueError("a Trace before the module sees no output to edit")

            def pre_hook(_module, args):
                if retain_input:
                    self.input = recursive_copy(_retained_input(args), clone=clone, detach=detach)
                if stop:
                    raise StopForward()

            self._handle = module.register_forward_pre_hook(pre_hook)
            return

        edit = _call_plan(edit_output, 0, ("output", "layer")) if edit_output is not None else None

        def hook(_module, args, output):
            if retain_input:
                self.input = recursive_copy(_retained_input(args), clone=clone, detach=detach)
            if edit is not None:
                output = edit((), {"output": output, "layer": layer})
            if retain_output:
                self.output = recursive_copy(output, clone=clone, detach=detach, retain_grad=retain_grad)
                if retain_grad:  # the kept tensor stays a leaf of the graph the forward goes on with
                    output = recursive_copy(self.output, clone=True)
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook)

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return bool(self.stop and exc_type is not None and issubclass(exc_type, StopForward))


class TraceDict(OrderedDict):
    """Several Traces at once, {name: Trace}, with the arguments of `Trace`. A name given twice is
    traced once; with stop=True the forward stops at the last distinct name given (order the
    names with `in_execution_order` to stop after the last one to run)."""

    def __init__(self, module: nn.Module, layers=None, retain_output: bool = True,
                 retain_input: bool = False, clone: bool = False, detach: bool = False,
                 retain_grad: bool = False, edit_output=None, stop: bool = False, before: bool = False):
        super().__init__()
        self.stop = stop
        names = list(dict.fromkeys(layers or ()))
        try:
            for i, name in enumerate(names):
                self[name] = Trace(module, name, retain_output=retain_output, retain_input=retain_input,
                                   clone=clone, detach=detach, retain_grad=retain_grad,
                                   edit_output=edit_output, stop=stop and i == len(names) - 1,
                                   before=before)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for trace in reversed(self.values()):
            trace.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return bool(self.stop and exc_type is not None and issubclass(exc_type, StopForward))


def in_execution_order(model: nn.Module, names) -> list[str]:
    """`names` in the order their modules run (registration order, which the supported families
    follow), so a TraceDict with stop=True stops after the last of them to run."""
    wanted = set(names)
    order = [n for n, _ in model.named_modules() if n in wanted]
    if len(order) != len(wanted):
        raise ValueError(f"no module named {sorted(wanted - set(order))} in the model")
    return order


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
        return w.shape[0] if adapter_for(model).weight_layout == "in_out" else w.shape[1]
    raise ValueError(f"module {name!r} is not a linear layer: cannot tell its input width")
