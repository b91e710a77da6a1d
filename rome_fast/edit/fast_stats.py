"""Fast second-moment statistics (DESIGN.md §4): the same sums as `stats.layer_stats` (same texts,
same truncation, same cache files in the reference's layout), collected with

* several layers in one pass, the forward run block by block and stopped at the input of the
  last requested module (which itself is not run);
* packing: the tokenised texts are packed first-fit-decreasing into rows (several short texts
  per row, each with its own position ids restarting at 0 and a block-diagonal causal mask, so
  a text sees only itself: exactly its own forward), rows of similar width batched under the
  token budget, so almost no padding is computed; rows of one text need no mask at all (plain
  causal attention is exact for their real tokens), so attention skips its masked half;
* optionally bf16/fp16 activations (autocast) with the sums kept in fp32/fp64 (`addmm_`);
* tokens/s in the progress bar.

A file written here is read by `stats.layer_stats` and vice versa."""
from __future__ import annotations

import random
import time

import torch

from ..models import adapter_for
from ..hooks import StopForward, TraceDict, in_execution_order, module_input_size
from ..models.base import mask_like
from .stats import (_PRECISIONS, ARTICLES_PER_BATCH, LayerStats, SecondMoment, _Subset, check_stats_request,
                    context_length, length_batches, load_stats_file, save_stats_file, stats_model_name,
                    stats_path)
from .corpus import resolve_corpus

ROW_TOKENS = 512  # packed row capacity: longer rows waste attention on masked-out pairs
_ACT = {None: None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
        torch.bfloat16: torch.bfloat16, torch.float16: torch.float16, torch.float32: None}


def pack_rows(lengths, capacity: int) -> list[list[int]]:
    """First-fit decreasing: index groups whose lengths sum to <= capacity (a longer text is a
    row of its own)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for r in range(len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(capacity, n) - n)
    return rows


def _block_of(adapter, name: str) -> int:
    for l in range(adapter.num_layers):
        if name.startswith(adapter.layer_name(l) + "."):
            return l
    raise ValueError(f"module {name!r} is not inside a transformer block of this model")


def collect_mom2_fast(model, tok, layer_names, texts, maxlen: int, batch_tokens: int,
                      dtype=torch.float32, act_dtype=None, packed: bool = True,
                      row_tokens: int = ROW_TOKENS, progress: bool = True, desc=None,
                      stats_out: dict | None = None) -> dict[str, SecondMoment]:
    """Σ k kᵀ over every token of `texts` at the input of each module in `layer_names`, in one
    pass: {name: SecondMoment}. packed=False batches texts by length with right padding (the
    reference's batching, on the block-by-block runner). `stats_out` receives tokens and seconds."""
    from tqdm.auto import tqdm

    if isinstance(layer_names, str):
        layer_names = [layer_names]
    if act_dtype not in _ACT:
        raise ValueError(f"act_dtype must be None, 'bfloat16' or 'float16', not {act_dtype!r}")
    act = _ACT[act_dtype]
    a = adapter_for(model)
    names = in_execution_order(model, layer_names)
    top = max(_block_of(a, n) for n in names)
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stats = {n: SecondMoment() for n in names}
    n_tok, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(texts), desc=desc or f"stats {names[-1]}", disable=not progress, unit="text")
    # keys kept before each module runs; the last one to run stops the forward before computing
    # anything (the reference runs it first: for an MLP output projection, a large matmul a batch)
    with torch.no_grad(), TraceDict(model, names, retain_output=False, retain_input=True, detach=True,
                                    stop=True, before=True) as keys:
        for start in range(0, len(texts), ARTICLES_PER_BATCH):
            chunk = [texts[i] for i in range(start, min(start + ARTICLES_PER_BATCH, len(texts)))]
            ids = tok(chunk, truncation=True, max_length=maxlen)["input_ids"]
            ids = [x for x in ids if len(x) > 0]
            if packed:
                rows = pack_rows([len(x) for x in ids], min(row_tokens, maxlen))
            else:
                rows = [[i] for i in range(len(ids))]
            widths = [sum(len(ids[i]) for i in r) for r in rows]
            # rows of one text and packed rows in separate batches: the former need no mask at all
            single = [g for g in range(len(rows)) if len(rows[g]) == 1]
            multi = [g for g in range(len(rows)) if len(rows[g]) > 1]
            batches = [[part[i] for i in group] for part in (single, multi)
                       for group in length_batches([widths[g] for g in part], batch_tokens)]
            for group in batches:
                width = widths[group[0]]
                batch = torch.full((len(group), width), pad_id, dtype=torch.long)
                seg = torch.full((len(group), width), -1, dtype=torch.long)
                pos = torch.zeros((len(group), width), dtype=torch.long)
                for r, g in enumerate(group):
                    c = 0
                    for s, i in enumerate(rows[g]):
                        n = len(ids[i])
                        batch[r, c:c + n] = torch.tensor(ids[i])
                        seg[r, c:c + n] = s
                        pos[r, c:c + n] = torch.arange(n)
                        c += n
                batch, seg, pos = batch.to(device), seg.to(device), pos.to(device)
                keep = seg >= 0
                packed_batch = len(rows[group[0]]) > 1
                with torch.autocast(device.type, dtype=act, enabled=act is not None):
                    emb = a.embed(batch)
                    if packed_batch:  # block-diagonal causal: a token sees earlier tokens of its own text
                        h, ctx = a.prepare(emb, keep.long(), pos, full_mask=True)
                        q = torch.arange(width, device=device)
                        allowed = (seg[:, :, None] == seg[:, None, :]) & (q[None, None, :] <= q[None, :, None])
                        allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding sees itself
                        ctx.attention_mask = mask_like(allowed[:, None], ctx.attention_mask)
                    else:
                        # one right-padded text per row: plain causal attention is exact for the
                        # real tokens (padding only follows them) and lets the kernels skip the
                        # masked half; the padding's keys are dropped below
                        h, ctx = a.prepare(emb, None, pos)
                    try:
                        for l in range(top + 1):
                            h = a.run_block(l, h, ctx)
                    except StopForward:
                        pass
                for n in names:  # keys at real tokens only, summed in the statistics' dtype
                    stats[n].add(keys[n].input[keep].to(dtype))
                n_tok += int(keep.sum())
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    if stats_out is not None:
        stats_out.update(tokens=n_tok, seconds=time.perf_counter() - t0)
    if stats[names[0]].count == 0:
        raise ValueError("the corpus produced no tokens")
    return stats


def layer_stats_fast(model, tok, layer_names, stats_dir, ds_name: str | None = None,
                     to_collect=("mom2",), sample_size=None, precision="float32", batch_tokens=None,
                     progress=True, corpus=None, model_name: str | None = None,
                     force_recompute: bool = False, act_dtype=None, packed: bool = True):
    """`stats.layer_stats` on the fast collector. `layer_names`: one module name (returns a
    LayerStats) or several (returns {name: LayerStats}, the missing ones collected in one pass).
    The cache files are the reference path's; act_dtype 'bfloat16'/'float16' runs the forward
    in that precision (tensor cores on a GPU, AMX / AVX-512-BF16 on a recent x86 CPU) with the
    sums still in `precision`; such files are approximate and carry an `_act-<dtype>` suffix."""
    single = isinstance(layer_names, str)
    names = [layer_names] if single else list(dict.fromkeys(layer_names))
    if not names:
        raise ValueError("no layers given")
    ds_name = check_stats_request(to_collect, precision, sample_size, ds_name, corpus)
    maxlen = context_length(model)
    batch_tokens = int(maxlen * 3 if batch_tokens is None else batch_tokens)
    if batch_tokens <= 0:
        raise ValueError("batch_tokens must be positive")
    dims = {n: module_input_size(model, n) for n in names}
    out, paths = {}, {}
    for n in names:
        if stats_dir is None:
            continue
        paths[n] = stats_path(stats_dir, model_name or stats_model_name(model), ds_name, n, precision,
                              to_collect, sample_size, batch_tokens, maxlen, act_dtype)
        if paths[n].is_file() and not force_recompute:
            stat = load_stats_file(paths[n], dims[n], sample_size)
            if stat is not None:
                out[n] = LayerStats(stat, paths[n], sample_size)
    missing = [n for n in names if n not in out]
    if missing:
        texts, _ = resolve_corpus(corpus, ds_name)
        order = list(range(len(texts)))
        random.Random(1).shuffle(order)  # the reference's FixedRandomSubsetSampler
        if sample_size is not None:
            order = order[:int(sample_size)]
        got = collect_mom2_fast(model, tok, missing, _Subset(texts, order), min(maxlen, batch_tokens),
                                batch_tokens, _PRECISIONS[precision], act_dtype, packed, progress=progress)
        for n in missing:
            if got[n].mom2.shape[0] != dims[n]:
                raise ValueError(f"{n}: collected keys of width {got[n].mom2.shape[0]}, expected {dims[n]}")
            if n in paths:
                save_stats_file(paths[n], got[n], sample_size)
            out[n] = LayerStats(got[n], paths.get(n), sample_size)
    return out[names[0]] if single else {n: out[n] for n in names}
