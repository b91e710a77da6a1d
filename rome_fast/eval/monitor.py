"""A collapse monitor for sequential editing (docs/alphaedit.md §Monitor).

After every batch of a sequential run it records:
* `update_norm`: the Frobenius norm of the batch's update of each edited weight, ‖W_after − W_before‖;
* `kl`: KL(p_orig ‖ p_edited) of the next-token distributions on fixed probe prompts unrelated to
  the edits, averaged over every position of every prompt (the original model's distributions
  are computed once, before the first edit);
* `ngram_entropy`: the n-gram entropy (the GE formula) of a few seeded top-5 generations: a model
  that repeats itself or babbles loses it;
* `seconds`: the batch's edit time.

A run folder gets `monitor.json` ({"probe_prompts", "generation_prompts", "baseline", "batches":
[{"batch", "edits", "update_norm", "kl", "ngram_entropy", "seconds"}]}) and `monitor.png`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .generation import generate, n_gram_entropy

PROBE_PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "To bake bread, first mix flour, water and",
    "The theory of general relativity describes",
    "In the morning I usually drink a cup of",
    "Photosynthesis is the process by which plants",
    "The stock market fell sharply on Monday after",
    "A triangle has three sides, and the sum of its angles is",
    "She opened the window and saw that the street was",
    "The recipe calls for two eggs, a pinch of salt and",
    "Water boils at a lower temperature on mountains because",
    "The committee will meet next week to discuss",
    "Once upon a time, in a small village by the sea,",
]
GENERATION_PROMPTS = ["My favourite thing about summer is", "The history of the printing press",
                      "Here is a simple way to learn a new language:", "Scientists recently discovered"]
GENERATION_LENGTH = 50


class CollapseMonitor:
    """Measures a model against the distributions of the model it was built on."""

    def __init__(self, mt, probe_prompts=PROBE_PROMPTS, generation_prompts=GENERATION_PROMPTS,
                 generation_length: int = GENERATION_LENGTH, seed: int = 0):
        if not probe_prompts or not generation_prompts:
            raise ValueError("the collapse monitor needs probe and generation prompts")
        self.probe_prompts, self.generation_prompts = list(probe_prompts), list(generation_prompts)
        self.generation_length, self.seed = int(generation_length), int(seed)
        self.base = self._log_probs(mt)
        self.baseline = {"ngram_entropy": self.ngram_entropy(mt)}

    @torch.no_grad()
    def _log_probs(self, mt) -> torch.Tensor:
        """Log-softmax of the next-token logits at every real position of every probe: [N, V] fp32."""
        tok, model = mt.tokenizer, mt.model
        dev = next(model.parameters()).device
        enc = [list(tok(p)["input_ids"]) for p in self.probe_prompts]
        width = max(map(len, enc))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)
            mask[i, :len(e)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
        return torch.log_softmax(logits.float(), -1)[mask.to(dev).bool()].cpu()

    def kl(self, mt) -> float:
        """Mean over probe positions of KL(p_orig ‖ p_now), in nats."""
        now = self._log_probs(mt)
        return float((self.base.exp() * (self.base - now)).sum(-1).mean())

    def ngram_entropy(self, mt) -> float:
        texts = generate(mt.model, mt.tokenizer, self.generation_prompts, max_out_len=self.generation_length,
                         seed=self.seed)
        return n_gram_entropy(texts)

    def measure(self, mt, batch: int, edits: int, before: dict, seconds: float) -> dict:
        """The record of one finished batch; `before`: {weight name: its value before the batch}."""
        norms = {n: float((mt.model.get_parameter(n).detach().float() - w.float()).norm()) for n, w in
                 sorted(before.items())}
        return {"batch": int(batch), "edits": int(edits), "update_norm": norms, "kl": self.kl(mt),
                "ngram_entropy": self.ngram_entropy(mt), "seconds": float(seconds)}

    def header(self) -> dict:
        return {"probe_prompts": self.probe_prompts, "generation_prompts": self.generation_prompts,
                "generation_length": self.generation_length, "baseline": self.baseline}


def write_monitor(out_dir, header: dict, batches: list[dict], stopped: dict | None = None,
                  plot: bool = True) -> Path:
    """out_dir/monitor.json (atomically) and, with plot=True, out_dir/monitor.png."""
    from .cases import _write_json_atomic
    out_dir = Path(out_dir)
    log = {**header, "batches": sorted(batches, key=lambda b: b["batch"])}
    if stopped:
        log["stopped"] = stopped
    path = out_dir / "monitor.json"
    _write_json_atomic(path, log)
    if plot and log["batches"]:
        plot_monitors({"": log}, out_dir / "monitor.png")
    return path


def load_monitor(path) -> dict:
    path = Path(path)
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the monitor log {path}: {exc}") from None
    if not isinstance(log, dict) or not isinstance(log.get("batches"), list):
        raise ValueError(f"{path} is not a monitor log (no 'batches' list)")
    return log


def plot_monitors(runs: dict, png, title: str | None = None) -> Path:
    """One figure, three panels against the number of edits: the update norm, the KL on the probe
    prompts and the generations' n-gram entropy. runs: {label: monitor log}; one run is drawn
    with a line per edited weight, several with the root-sum-square over their weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    single = len(runs) == 1
    for label, log in runs.items():
        b = log["batches"]
        x = [r["edits"] for r in b]
        if single:
            for name in b[0]["update_norm"] if b else []:
                short = ".".join(p for p in name.split(".") if p.isdigit()) or name
                axes[0].plot(x, [r["update_norm"].get(name, float("nan")) for r in b], marker=".",
                             label=f"layer {short}")
        else:
            axes[0].plot(x, [sum(v * v for v in r["update_norm"].values()) ** 0.5 for r in b], marker=".",
                         label=label)
        axes[1].plot(x, [r["kl"] for r in b], marker=".", label=label or None)
        axes[2].plot(x, [r["ngram_entropy"] for r in b], marker=".", label=label or None)
        base = (log.get("baseline") or {}).get("ngram_entropy")
        if base is not None:
            axes[2].axhline(base, color="grey", linestyle=":", linewidth=1)
    axes[0].set_title("update norm per batch ‖ΔW‖" + ("" if single else " (all layers)"))
    axes[1].set_title("KL(original ‖ edited), probe prompts (nats)")
    axes[2].set_title("n-gram entropy of generations (dotted: unedited)")
    for ax in axes:
        ax.set_xlabel("edits so far")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[1].set_yscale("log", nonpositive="mask")  # KL > 0 once anything is edited
    if not single:  # methods' updates differ by orders of magnitude (a runaway ROME edit: 50x)
        axes[0].set_yscale("log", nonpositive="mask")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
