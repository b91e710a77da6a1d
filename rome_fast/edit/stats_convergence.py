"""Has C converged? (docs/statistics.md, "Convergence").

An edit uses C only through C⁻¹k for its keys k (ROME's u ∝ C⁻¹k̄, MEMIT's and AlphaEdit's
solves likewise), so that is what is watched: at every doubling of the sample, x = C⁻¹k is
solved (fp64 Cholesky) for a set of probe keys, and the figure is the largest relative change
‖x_new − x_old‖ / ‖x_new‖ over probes and layers since the previous doubling. The probes are the
keys of the edit requests when they are known, else those of a fixed set of facts
(`PROBE_REQUESTS`); a key is the rewrite module's input at the subject's last token, as ROME's."""
from __future__ import annotations

import hashlib
import json

import torch

# A fixed set of facts of varied relations (place, company, person, language, sport, ...).
PROBE_REQUESTS = (
    ("{} is located in the city of", "The Eiffel Tower"),
    ("{} is headquartered in", "Toyota"),
    ("{} plays the", "Miles Davis"),
    ("The mother tongue of {} is", "Danielle Darrieux"),
    ("{} is a professional", "Lionel Messi"),
    ("{} was founded by", "Apple"),
    ("{} is the capital of", "Berlin"),
    ("The official language of {} is", "Brazil"),
    ("{} flows through", "The Nile"),
    ("{} was developed by", "Windows 10"),
    ("{} is a museum in", "The Louvre"),
    ("{} was written by", "Pride and Prejudice"),
    ("{} is a part of the continent of", "Vinson Massif"),
    ("{}, who works as a", "Albert Einstein"),
    ("{} was created by the company", "The iPhone"),
    ("{} is affiliated with the religion of", "The Vatican"),
)


def as_requests(requests) -> list[tuple[str, str]]:
    """(prompt template, subject) pairs from edit requests ({"prompt", "subject"} dicts or pairs)."""
    out = []
    for r in requests:
        prompt, subject = (r["prompt"], r["subject"]) if isinstance(r, dict) else r
        if "{}" not in prompt:
            raise ValueError(f"probe prompt {prompt!r} has no '{{}}' for the subject {subject!r}")
        out.append((prompt, subject))
    if not out:
        raise ValueError("no probe requests")
    return out


def probes_fingerprint(requests, fact_token: str = "subject_last") -> str:
    return hashlib.sha256(json.dumps([as_requests(requests), fact_token]).encode()).hexdigest()[:16]


@torch.no_grad()
def probe_keys(model, tok, layer_names, requests=None, fact_token: str = "subject_last") -> dict:
    """{layer: (m, d) fp64 keys}: each probe's key at each layer's rewrite module."""
    from .compute_u import module_io_at
    pairs = as_requests(PROBE_REQUESTS if requests is None else requests)
    out = {}
    for name in layer_names:
        keys = [module_io_at(model, tok, name, [prompt], subject, fact_token, stop=True)[0][0]
                for prompt, subject in pairs]
        out[name] = torch.stack(keys).double().cpu()
    return out


def solve_probes(sums: torch.Tensor, count: int, keys: torch.Tensor) -> torch.Tensor | None:
    """C⁻¹Kᵀ (d, m) for C = sums / count in fp64; None while C is not positive definite."""
    C = sums.double() / max(count, 1)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        return None
    return torch.cholesky_solve(keys.to(C.device, torch.float64).T, L)


def relative_changes(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """‖x_new − x_old‖ / ‖x_new‖ of each probe (column)."""
    return (new - old.to(new.device)).norm(dim=0) / new.norm(dim=0).clamp_min(1e-300)


class ConvergenceTracker:
    """The convergence record of one pass: call `point` with the summed statistics at each
    doubling; `curve` lists the points, `converged` says whether the last change is below `tol`."""

    def __init__(self, probes: dict, tol: float | None = None):
        if tol is not None and not tol > 0:
            raise ValueError(f"the convergence tolerance must be positive, got {tol}")
        self.probes, self.tol = probes, tol
        self.prev: dict = {n: None for n in probes}
        self.curve: list[dict] = []

    @property
    def converged(self) -> bool:
        return bool(self.curve) and self.curve[-1]["converged"]

    @property
    def last_round(self) -> int:
        return self.curve[-1]["round"] if self.curve else 0

    def point(self, round_: int, texts: int, count: int, sums: dict) -> dict:
        change, median = {}, {}
        for name, keys in self.probes.items():
            x = solve_probes(sums[name], count, keys)
            prev = self.prev[name]
            rel = None if x is None or prev is None else relative_changes(x, prev)
            change[name] = None if rel is None else float(rel.max())
            median[name] = None if rel is None else float(rel.median())
            self.prev[name] = None if x is None else x.cpu()
        known = list(change.values())
        worst = None if not known or any(c is None for c in known) else max(known)
        # the rule reads the largest change; the median (per layer) says how typical it is
        p = {"round": round_, "texts": texts, "keys": count, "change": change, "median_change": median,
             "max_change": worst, "converged": self.tol is not None and worst is not None and worst < self.tol}
        self.curve.append(p)
        return p

    # the part of the state a checkpoint keeps
    def state(self) -> tuple[list, dict]:
        return self.curve, {n: x for n, x in self.prev.items() if x is not None}

    def restore(self, curve: list, prev: dict) -> None:
        self.curve = [dict(p) for p in curve]
        self.prev = {n: prev.get(n) for n in self.probes}
