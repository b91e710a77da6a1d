"""Reference causal tracing: one forward pass per (token, layer) cell, as the reference does
(docs/tracing.md). Slow by design; it is the test oracle of the fast engine, so it shares nothing
with the engine or the hooks layer: its hooks are written out here.

Names and signatures are the reference's, so scripts written against it work unchanged. The model
argument is a bare transformers model; its family adapter supplies the module names, so every
supported family works (the reference knew only GPT-2/J and NeoX)."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch

from ..models import adapter_for, first_tensor
from ..tokens import make_inputs
from .kinds import get_kind
from .noise import NoiseSpec, draw_noise, noise_draws


def layername(model, num: int, kind: str | None = None) -> str:
    """Dotted name of block `num` (kind None), the module a kind restores in it ('mlp', 'attn'),
    or the word embedding ('embed')."""
    adapter = adapter_for(model)
    return adapter.embed_name if kind == "embed" else get_kind(kind).module_name(adapter, num)


@contextlib.contextmanager
def _edit_outputs(model, names: Iterable[str], edit: Callable):
    """Forward hooks on the named modules calling edit(output, name); removed on exit."""
    handles = []
    try:
        for name in dict.fromkeys(names):  # unique, in order
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(
                lambda _m, _inp, out, _name=name: edit(out, _name)))
        yield
    finally:
        for h in handles:
            h.remove()


def window_layers(center: int, window: int, num_layers: int) -> range:
    """Layers restored for a window plotted at `center`: [center − ⌊w/2⌋, center + ⌈w/2⌉) clipped
    to the model, i.e. L−5…L+4 for w = 10 (the paper writes L−4…L+5; the code is shifted by one)."""
    return range(max(0, center - window // 2), min(num_layers, center - (-window // 2)))


def answer_probability(logits: torch.Tensor, answers_t, whole_answer: bool = False) -> torch.Tensor:
    """From the logits of a batch (row 0 clean), the mean over rows 1.. of the softmax probability
    of `answers_t` at the last position (the reference). With `whole_answer`, answers_t holds the
    n tokens of an answer whose first n − 1 close the input (teacher forcing), and the score is
    the mean over rows 1.. of the product of the n tokens' probabilities, token j read at
    position −n + j."""
    if not whole_answer:
        return torch.softmax(logits[1:, -1, :], dim=1).mean(dim=0)[answers_t]
    answer = torch.as_tensor(answers_t, device=logits.device).reshape(-1)
    n = answer.numel()
    logp = torch.log_softmax(logits[1:, -n:, :].float(), dim=-1)
    per_row = logp.gather(2, answer.view(1, n, 1).expand(logp.shape[0], n, 1)).sum(dim=(1, 2))
    return per_row.exp().mean(dim=0)


def trace_with_patch(model, inp: dict, states_to_patch: Sequence[tuple[int, str]], answers_t,
                     tokens_to_mix: tuple[int, int] | None, noise: NoiseSpec = 0.1,
                     uniform_noise: bool = False, replace: bool = False,
                     trace_layers: Sequence[str] | None = None, *, whole_answer: bool = False):
    """One causal trace: a single forward of the batch `inp` (row 0 clean, rows 1.. corrupted).

    Noise is added to (with `replace`, written over) the word embeddings of tokens
    [tokens_to_mix[0], tokens_to_mix[1]) in rows 1..; every (token, module name) in
    `states_to_patch` is restored in rows 1.. to row 0's value as the forward reaches that module.
    Returns the mean over rows 1.. of softmax p(answers_t) at the last position (a tensor; see
    `answer_probability` for `whole_answer`), and with `trace_layers` also the stacked outputs of
    those modules (batch, tokens, layer, hidden)."""
    adapter = adapter_for(model)
    embed_name = adapter.embed_name
    patch_spec: dict[str, list[int]] = defaultdict(list)
    for t, name in states_to_patch:
        patch_spec[name].append(t)
    traced: dict[str, torch.Tensor] = {}
    trace_layers = list(trace_layers or [])

    def edit(output, name):
        if name == embed_name:
            _corrupt(output, tokens_to_mix, noise, uniform_noise, replace)
        elif name in patch_spec:
            h = first_tensor(output)  # blocks and attention may return tuples
            for t in patch_spec[name]:
                h[1:, t] = h[0, t]
        if name in trace_layers:
            traced[name] = first_tensor(output)
        return output

    with torch.no_grad(), _edit_outputs(model, [embed_name, *patch_spec, *trace_layers], edit):
        logits = model(**inp).logits
    probs = answer_probability(logits, answers_t, whole_answer)
    if trace_layers:
        stacked = torch.stack([traced[n].detach().cpu() for n in trace_layers], dim=2)
        return probs, stacked
    return probs


def _corrupt(x: torch.Tensor, tokens_to_mix, noise, uniform_noise: bool, replace: bool,
             noise_data: torch.Tensor | None = None) -> None:
    """Noise onto (or over) the word embeddings of tokens [b, e) in rows 1.. of `x`, in place."""
    if tokens_to_mix is None:
        return
    b, e = tokens_to_mix
    if noise_data is None:
        noise_data = draw_noise(x.shape[0] - 1, e - b, x.shape[2], noise, uniform_noise)
    noise_data = noise_data.to(x.device)
    if replace:
        x[1:, b:e] = noise_data
    else:
        # float64 noise onto the float32 embeddings, as the reference (+= casts back)
        x[1:, b:e] += noise_data


def trace_with_repatch(model, inp: dict, states_to_patch: Sequence[tuple[int, str]],
                       states_to_unpatch: Sequence[tuple[int, str]], answers_t,
                       tokens_to_mix: tuple[int, int] | None, noise: NoiseSpec = 0.1,
                       uniform_noise: bool = False, *, whole_answer: bool = False):
    """The severed-path trace (the paper's Fig. 3): `trace_with_patch` whose (token, module)
    states in `states_to_unpatch` stay at their values in a corrupted run.

    Two forwards, as the reference: the first corrupts rows 1.. and records the outputs of the
    modules to unpatch; the second corrupts them again, restores `states_to_patch` from row 0
    and writes the first pass's rows 1.. values over the unpatched states (after any restore of
    the same module). One RandomState(1) serves both passes, so the second pass's noise is the
    generator's second draw, not the first pass's noise. Without states to unpatch it is one
    forward, exactly `trace_with_patch`."""
    adapter = adapter_for(model)
    embed_name = adapter.embed_name
    patch_spec: dict[str, list[int]] = defaultdict(list)
    for t, name in states_to_patch:
        patch_spec[name].append(t)
    unpatch_spec: dict[str, list[int]] = defaultdict(list)
    for t, name in states_to_unpatch:
        unpatch_spec[name].append(t)
    passes = 2 if unpatch_spec else 1
    draws = None
    if tokens_to_mix is not None:
        b, e = tokens_to_mix
        rows, width = inp["input_ids"].shape[0] - 1, adapter.hidden_size
        draws = noise_draws(rows, e - b, width, noise, uniform_noise, count=passes)
    first_pass: dict[str, torch.Tensor] = {}
    logits = None
    for pass_no in range(passes):
        recording = pass_no == 0 and passes == 2

        def edit(output, name, _pass=pass_no, _recording=recording):
            if name == embed_name:
                _corrupt(output, tokens_to_mix, noise, uniform_noise, False,
                         None if draws is None else draws[_pass])
                return output
            h = first_tensor(output)
            if _recording:
                if name in unpatch_spec:
                    first_pass[name] = h.detach().clone()
                return output
            for t in patch_spec.get(name, ()):
                h[1:, t] = h[0, t]
            for t in unpatch_spec.get(name, ()):
                h[1:, t] = first_pass[name][1:, t]
            return output

        with torch.no_grad(), _edit_outputs(model, [embed_name, *patch_spec, *unpatch_spec], edit):
            logits = model(**inp).logits
    return answer_probability(logits, answers_t, whole_answer)


def _token_rows(inp: dict, token_range) -> list[int]:
    ntoks = inp["input_ids"].shape[1]
    return list(range(ntoks)) if token_range is None else [int(t) for t in token_range]


def trace_important_states(model, num_layers: int, inp: dict, e_range, answer_t,
                           noise: NoiseSpec = 0.1, uniform_noise: bool = False,
                           replace: bool = False, token_range=None, *, whole_answer: bool = False
                           ) -> torch.Tensor:
    """Scores (tokens × layers) of restoring each single block output (the residual stream)."""
    table = []
    for tnum in _token_rows(inp, token_range):
        row = [trace_with_patch(model, inp, [(tnum, layername(model, layer))], answer_t,
                                tokens_to_mix=e_range, noise=noise, uniform_noise=uniform_noise,
                                replace=replace, whole_answer=whole_answer)
               for layer in range(num_layers)]
        table.append(torch.stack(row))
    return torch.stack(table)


def trace_important_window(model, num_layers: int, inp: dict, e_range, answer_t, kind: str,
                           window: int = 10, noise: NoiseSpec = 0.1, uniform_noise: bool = False,
                           replace: bool = False, token_range=None, *, whole_answer: bool = False
                           ) -> torch.Tensor:
    """Scores (tokens × layers) of restoring the `kind` ('mlp' / 'attn') outputs of a window of
    layers around each layer (see `window_layers`) at one token."""
    table = []
    for tnum in _token_rows(inp, token_range):
        row = []
        for layer in range(num_layers):
            states = [(tnum, layername(model, L, kind)) for L in window_layers(layer, window, num_layers)]
            row.append(trace_with_patch(model, inp, states, answer_t, tokens_to_mix=e_range,
                                        noise=noise, uniform_noise=uniform_noise, replace=replace,
                                        whole_answer=whole_answer))
        table.append(torch.stack(row))
    return torch.stack(table)


def trace_severed_states(model, num_layers: int, inp: dict, e_range, answer_t, sever: str,
                         noise: NoiseSpec = 0.1, uniform_noise: bool = False, token_range=None, *,
                         whole_answer: bool = False) -> torch.Tensor:
    """Scores (tokens × layers) of restoring each single block output while the `sever` module
    ('mlp' or 'attn') of every layer stays corrupted at the restored token (the notebook's
    calculate_hidden_flow_3 with disable_mlp / disable_attn)."""
    table = []
    for tnum in _token_rows(inp, token_range):
        frozen = [(tnum, layername(model, layer, sever)) for layer in range(num_layers)]
        row = [trace_with_repatch(model, inp, [(tnum, layername(model, layer))], frozen, answer_t,
                                  tokens_to_mix=e_range, noise=noise, uniform_noise=uniform_noise,
                                  whole_answer=whole_answer)
               for layer in range(num_layers)]
        table.append(torch.stack(row))
    return torch.stack(table)


def predict_from_input(model, inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(arg-max token, its probability) at the last position of every row."""
    with torch.no_grad():
        logits = model(**inp)["logits"]
    probs = torch.softmax(logits[:, -1], dim=1)
    p, preds = torch.max(probs, dim=1)
    return preds, p


def predict_token(mt, prompts: Sequence[str], return_p: bool = False):
    """The decoded top-1 next token of each prompt (and its probability with `return_p`)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    inp = make_inputs(mt.tokenizer, prompts, device=mt.device)
    preds, p = predict_from_input(mt.model, inp)
    result = [mt.tokenizer.decode([int(c)]) for c in preds]
    return (result, p) if return_p else result
