"""The reference's `util.logit_lens.LogitLens`: the next-token distribution read at every block's
output, through the final norm and the unembedding (the "logit lens").

The module names default to GPT-2's in the reference (`transformer.h.{}`, `transformer.ln_f`,
`transformer.wte`); a name the model does not have is replaced by the model adapter's module for
that role, so the lens works on every supported family."""
from __future__ import annotations

import torch

from ...hooks import TraceDict, first_tensor, get_module, get_parameter
from ...models import adapter_for


def _has_module(model, name: str) -> bool:
    try:
        get_module(model, name)
        return True
    except LookupError:
        return False


class LogitLens:
    """`with lens: model(**one_prompt)` then `lens.output[layer]` (the softmax at the last position
    after that layer) or `lens.pprint(k)`. Only single-prompt batches (as the reference)."""

    def __init__(self, model, tok, layer_module_tmp: str, ln_f_module: str, lm_head_module: str,
                 disabled: bool = False):
        self.disabled = disabled
        self.model, self.tok = model, tok
        adapter = adapter_for(model)
        self.n_layers = adapter.num_layers
        if not _has_module(model, layer_module_tmp.format(0)):
            layer_module_tmp = adapter.layer_template
        if not _has_module(model, ln_f_module):
            ln_f_module = adapter.final_norm_name
        if not _has_module(model, lm_head_module):
            lm_head_module = adapter.lm_head_name
        self.ln_f = get_module(model, ln_f_module)
        self.lm_w = get_parameter(model, f"{lm_head_module}.weight").T
        try:
            self.lm_b = get_parameter(model, f"{lm_head_module}.bias")
        except LookupError:
            self.lm_b = None
        self.trace_layers = [layer_module_tmp.format(i) for i in range(self.n_layers)]
        self.output: dict | None = None
        self.td: TraceDict | None = None

    def __enter__(self):
        if not self.disabled:
            self.td = TraceDict(self.model, self.trace_layers, retain_input=False, retain_output=True)
            self.td.__enter__()

    def __exit__(self, *exc):
        if self.disabled:
            return None
        self.td.__exit__(*exc)
        self.output = {}
        with torch.no_grad():
            for layer, name in enumerate(self.trace_layers):
                out = first_tensor(self.td[name].output)
                if out is None:  # the forward did not get this far
                    continue
                if out.shape[0] != 1:
                    raise ValueError(f"LogitLens reads one prompt at a time; the batch had {out.shape[0]} rows")
                logits = self.ln_f(out[:, -1]) @ self.lm_w
                if self.lm_b is not None:
                    logits = logits + self.lm_b
                self.output[layer] = torch.softmax(logits.float(), dim=1)
        return None

    def pprint(self, k: int = 5) -> None:
        """One line per layer: its top-k tokens with their probability in percent."""
        if not self.output:
            raise ValueError("nothing to print: run the model inside `with lens:` first")
        lines = []
        for layer, probs in self.output.items():
            top = torch.topk(probs[0], k)
            pairs = [(self.tok.decode(int(i)), round(round(float(p), 2) * 100))
                     for p, i in zip(top.values, top.indices)]
            lines.append(f"{layer}: {pairs}")
        print("\n".join(lines))
