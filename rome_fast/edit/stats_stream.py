"""The streamed statistics run (docs/statistics.md): sums of k kᵀ over a corpus sample, chunk
by chunk, resumable, sharded over torchrun ranks, stopped when C⁻¹k has converged.

The sample (texts in sampling order) is cut into chunks of `CHUNK` texts; chunk c is summed by
rank c mod world, so a round of `world` chunks advances every rank by one. A chunk's sum is
computed in the statistics' dtype and added to fp64 totals, always in the same chunks and the
same order, which makes a resumed run end with the same bits as an uninterrupted one (on the same
device and thread count). Ranks never wait for each other except at the doublings of the sample
(rounds 1, 2, 4, ...), where the convergence figure needs the summed totals, and at the end."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import distributed
from .stats import ARTICLES_PER_BATCH
from .stats_checkpoint import VERSION, checkpoint_path, load_checkpoint, save_checkpoint

CHUNK = ARTICLES_PER_BATCH  # texts a chunk: the unit of summation order and of resuming


@dataclass
class StreamResult:
    sums: dict            # {layer: fp64 Σ k kᵀ over the ranks}
    count: int            # keys (tokens) summed, per layer
    texts: int            # texts of the sample used (a prefix: fewer when it converged early)
    seconds: float        # this run's time (not counting an earlier, interrupted one)
    local_tokens: int     # tokens this rank summed in this run (for tokens/s)
    curve: list = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return bool(self.curve) and self.curve[-1]["converged"]


def _is_doubling(rounds: int) -> bool:
    return rounds > 0 and rounds & (rounds - 1) == 0


def stream_sums(sum_chunk: Callable, sample, names, *, info=None, checkpoint_base=None,
                settings: Optional[dict] = None, every_s: Optional[float] = 600.0,
                every_texts: Optional[int] = None, tracker=None, restart: bool = False,
                progress: bool = True, desc: Optional[str] = None,
                after_round: Optional[Callable[[], None]] = None) -> StreamResult:
    """Sum over `sample` (an indexable sequence of texts in sampling order).

    sum_chunk(texts) -> ({layer: Σ k kᵀ}, n_keys); it may offer `first_bad(texts) -> index`
    to name the text whose keys are not finite. info: this rank (DistInfo; default one process).
    checkpoint_base: where checkpoints go (`stats_checkpoint.checkpoint_base`), None for none;
    every_s / every_texts: how often (seconds, texts of this rank); `settings` are recorded in
    them and must match on resume. tracker: a ConvergenceTracker (stops when it says so).
    after_round: called after each round (and its checkpoint), for tests that kill a run."""
    from tqdm.auto import tqdm

    info = info or distributed.DistInfo()
    rank, world = info.rank, info.world
    n = len(sample)
    n_chunks = math.ceil(n / CHUNK)
    rounds_total = math.ceil(n_chunks / world)
    texts_after = lambda r: min(r * world * CHUNK, n)  # noqa: E731  (texts of the sample in r rounds)
    my_chunks = range(rank, n_chunks, world)
    my_texts = sum(min(CHUNK, n - c * CHUNK) for c in my_chunks)
    settings = dict(settings or {}, names=list(names), n_texts=n, chunk=CHUNK, rank=rank, world=world,
                    until_converged=None if tracker is None else tracker.tol)
    path = None if checkpoint_base is None else checkpoint_path(checkpoint_base, rank)

    device = getattr(sum_chunk, "device", "cpu")
    sums, count, rounds, done = {}, 0, 0, 0
    if path is not None and restart:
        path.unlink(missing_ok=True)
    loaded = load_checkpoint(path, settings) if path is not None else None
    if loaded is not None:
        arrays, meta = loaded
        sums = {nm: torch.from_numpy(arrays[f"sum.{i}"]).to(device)
                for i, nm in enumerate(names) if f"sum.{i}" in arrays}
        count, rounds, done = meta["count"], meta["rounds"], meta["texts"]
        if tracker is not None:
            tracker.restore(meta["curve"], {nm: torch.from_numpy(arrays[f"prev.{i}"])
                                            for i, nm in enumerate(names) if f"prev.{i}" in arrays})
    if world > 1 and tracker is not None:
        # ranks may have checkpointed at different times: all adopt the longest convergence
        # record (its points are the same on every rank that has them), so every rank meets the
        # others at the same doublings and stops at the same round
        lengths = distributed.all_gather(len(tracker.curve))
        src = max(range(world), key=lambda r: (lengths[r], -r))
        curve, prev = distributed.broadcast(tracker.state(), src=src)
        tracker.restore(curve, prev)

    def save() -> None:
        arrays = {f"sum.{i}": sums[nm].cpu().numpy() for i, nm in enumerate(names) if nm in sums}
        meta = dict(version=VERSION, settings=settings, count=count, rounds=rounds, texts=done, curve=[])
        if tracker is not None:
            curve, prev = tracker.state()
            meta["curve"] = curve
            arrays.update({f"prev.{i}": prev[nm].numpy() for i, nm in enumerate(names) if nm in prev})
        save_checkpoint(path, arrays, meta)

    def global_sums() -> tuple[dict, int]:
        if not info.distributed:
            return dict(sums), count
        # the same collectives in the same order on every rank; a rank that has summed no chunk
        # yet contributes zeros of the others' shape
        shapes = {}
        for got in distributed.all_gather({nm: tuple(t.shape) for nm, t in sums.items()}):
            shapes.update(got)
        total = {nm: distributed.all_reduce_sum_(sums[nm].clone() if nm in sums else
                                                 torch.zeros(shapes[nm], dtype=torch.float64, device=device))
                 for nm in names}
        return total, int(distributed.all_reduce_sum_(torch.tensor([count], dtype=torch.float64))[0])

    def convergence_point() -> dict:
        total, c = global_sums()
        p = tracker.point(rounds, texts_after(rounds), c, total)
        if info.distributed:  # one decision for all ranks, whatever their rounding
            p = distributed.broadcast(p)
            tracker.curve[-1] = p
        return p

    bar = tqdm(total=my_texts, initial=done, desc=desc or "statistics", unit="text", disable=not progress)
    t0 = last_save = time.monotonic()
    local_tokens, since_save = 0, 0
    try:
        while rounds < rounds_total:
            if tracker is not None and tracker.converged and rounds >= tracker.last_round:
                break
            c = rounds * world + rank
            if c < n_chunks:
                texts = [sample[i] for i in range(c * CHUNK, min((c + 1) * CHUNK, n))]
                part, keys = sum_chunk(texts)
                for nm in names:
                    s = part[nm]
                    if not bool(torch.isfinite(s).all()):
                        _raise_not_finite(sum_chunk, texts, sample, c * CHUNK, nm)
                    if nm in sums:
                        sums[nm] += s.double()
                    else:
                        sums[nm] = s.to(torch.float64, copy=True)
                count, local_tokens = count + keys, local_tokens + keys
                done, since_save = done + len(texts), since_save + len(texts)
                bar.update(len(texts))
            rounds += 1
            point = None
            if tracker is not None and _is_doubling(rounds) and rounds > tracker.last_round:
                point = convergence_point()
            rate = f"{local_tokens / max(time.monotonic() - t0, 1e-9):.0f} tok/s"
            if tracker is not None and tracker.curve:
                rate += f", Δ(C⁻¹k) {_fmt(tracker.curve[-1]['max_change'])}"
            bar.set_postfix_str(rate)
            due = (point is not None
                   or (every_texts is not None and since_save >= every_texts)
                   or (every_s is not None and time.monotonic() - last_save >= every_s))
            if path is not None and due and rounds < rounds_total:
                save()
                last_save, since_save = time.monotonic(), 0
            if after_round is not None:
                after_round()
    finally:
        bar.close()
    if tracker is not None and rounds > tracker.last_round:  # the last point: the whole sample
        convergence_point()
    total, c = global_sums()
    return StreamResult(total, c, texts_after(rounds), time.monotonic() - t0, local_tokens,
                        list(tracker.curve) if tracker is not None else [])


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _raise_not_finite(sum_chunk, texts, sample, start: int, layer: str):
    where = f"texts {start}..{start + len(texts) - 1} of the sample"
    find = getattr(sum_chunk, "first_bad", None)
    k = find(texts) if find is not None else None
    if k is not None:
        pos = start + k
        order = getattr(sample, "order", None)
        corpus_idx = f" (text {order[pos]} of the corpus)" if order is not None else ""
        snippet = texts[k][:60].replace("\n", " ") if isinstance(texts[k], str) else texts[k]
        where = f"text {pos} of the sample{corpus_idx}, {snippet!r}"
    raise FloatingPointError(f"the keys at {layer} are not finite (NaN or Inf) for {where}: the model "
                             "overflows or is broken there; check its weights, or run the forward in "
                             "float32 (--act-dtype float32) with --precision float64")
