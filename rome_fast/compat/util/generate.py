"""The reference's `util.generate`: `generate_fast` (top-k sampling, the prompt and its
continuation up to `max_out_len` tokens in all) and `generate_interactive` (a prompt loop).

Sampling draws from torch's global RNG as the reference does (`torch.manual_seed`, or `reseed=`,
makes it repeatable). Unlike the reference, the KV-cache loop passes the whole attention mask,
so the sampled distribution is the model's own, and prompts of different lengths are padded on
the left (docs/dropin.md)."""
from __future__ import annotations

import torch

from ...eval.generation import generate
from .logit_lens import LogitLens


def generate_fast(model, tok, prompts, n_gen_per_prompt: int = 1, top_k: int = 5, max_out_len: int = 200,
                  reseed=None) -> list[str]:
    """`n_gen_per_prompt` samples per prompt (prompt first, as a flat list), each the prompt
    followed by sampled tokens up to `max_out_len` tokens in total, NFKD-normalised with blank
    lines joined and the end-of-text marker removed."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if reseed is not None:
        torch.manual_seed(reseed)
    return generate(model, tok, list(prompts), max_out_len=max_out_len, top_k=top_k, seed=None,
                    n_gen_per_prompt=n_gen_per_prompt)


def generate_interactive(model, tok, top_k: int = 5, max_out_len: int = 200, compare_against=None,
                         use_logit_lens: bool = False, layer_module_tmp: str = "transformer.h.{}",
                         ln_f_module: str = "transformer.ln_f", lm_head_module: str = "transformer.wte") -> None:
    """Ask for prompts and print a sample of `model` (and of `compare_against`), with the logit
    lens of each layer if asked. Ends at end of input (Ctrl-D) or Ctrl-C; an empty line is
    skipped. Module names the model lacks are replaced by its adapter's."""
    lenses = []
    if use_logit_lens:
        lenses = [LogitLens(m, tok, layer_module_tmp, ln_f_module, lm_head_module)
                  for m in ([model] + ([compare_against] if compare_against is not None else []))]
    while True:
        try:
            prompt = input("Enter a prompt: ").strip(" \r\t\n")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not prompt:
            continue
        print(f"Argument Model: {generate_fast(model, tok, [prompt], 1, top_k, max_out_len)}")
        if compare_against is not None:
            print(f"Baseline Model: {generate_fast(compare_against, tok, [prompt], 1, top_k, max_out_len)}")
        for lens, title in zip(lenses, ("Argument Model", "Baseline Model")):
            inputs = tok([prompt], return_tensors="pt").to(next(lens.model.parameters()).device)
            with torch.no_grad(), lens:
                lens.model(**inputs)
            print(f"\n--- {title} Logit Lens ---")
            lens.pprint()
        print()


__all__ = ["generate_fast", "generate_interactive"]
