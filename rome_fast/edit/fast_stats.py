"""Fast second-moment statistics (docs/statistics.md): the same sums as `stats.layer_stats` (same
texts, same truncation, same cache files in the reference's layout), collected with

* several layers in one pass, the forward run block by block and stopped at the input of the
  last requested module (which itself is not run);
* packing: the tokenised texts are packed first-fit-decreasing into rows (several short texts
  per row, each with its own position ids restarting at 0 and a block-diagonal causal mask, so
  a text sees only itself: exactly its own forward), rows of similar width batched under the
  token budget, so almost no padding is computed; rows of one text need no mask at all (plain
  causal attention is exact for their real tokens), so attention skips its masked half;
* optionally bf16/fp16 activations (autocast) with each chunk's sum kept in fp32/fp64 (`addmm_`)
  and the totals in fp64;
* the run streamed by `stats_stream`: checkpointed and resumable, sharded over torchrun ranks,
  stopped when C⁻¹k has converged (`until_converged`), tokens/s in the progress bar.

A file written here is read by `stats.layer_stats` and vice versa."""
from __future__ import annotations

import json

import torch

from .. import distributed
from ..models import adapter_for
from ..hooks import StopForward, TraceDict, in_execution_order, module_input_size
from ..models.base import mask_like
from .corpus import corpus_digest, resolve_corpus, texts_fingerprint
from .stats import (_PRECISIONS, LayerStats, SecondMoment, _Subset, check_stats_request,
                    context_length, length_batches, load_stats_file, sample_order, save_stats_file,
                    stats_model_name, stats_path)

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


class KeySummer:
    """Σ k kᵀ over a batch of texts at the input of each module in `layer_names`, in one pass
    that stops at the input of the last of them: `summer(texts) -> ({name: sum}, n_keys)`, each
    sum in `dtype`. packed=False batches texts by length with right padding (the reference's
    batching, on the block-by-block runner)."""

    def __init__(self, model, tok, layer_names, maxlen: int, batch_tokens: int, dtype=torch.float32,
                 act_dtype=None, packed: bool = True, row_tokens: int = ROW_TOKENS):
        if isinstance(layer_names, str):
            layer_names = [layer_names]
        if act_dtype not in _ACT:
            raise ValueError(f"act_dtype must be None, 'bfloat16' or 'float16', not {act_dtype!r}")
        self.model, self.tok, self.act = model, tok, _ACT[act_dtype]
        self.adapter = adapter_for(model)
        self.names = in_execution_order(model, layer_names)
        self.top = max(_block_of(self.adapter, n) for n in self.names)
        self.maxlen, self.batch_tokens, self.dtype = maxlen, batch_tokens, dtype
        self.packed, self.row_tokens = packed, row_tokens
        self.device = next(model.parameters()).device
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    @torch.no_grad()
    def __call__(self, texts) -> tuple[dict, int]:
        a, device = self.adapter, self.device
        ids = self.tok(list(texts), truncation=True, max_length=self.maxlen)["input_ids"]
        ids = [x for x in ids if len(x) > 0]
        if self.packed:
            rows = pack_rows([len(x) for x in ids], min(self.row_tokens, self.maxlen))
        else:
            rows = [[i] for i in range(len(ids))]
        widths = [sum(len(ids[i]) for i in r) for r in rows]
        # rows of one text and packed rows in separate batches: the former need no mask at all
        single = [g for g in range(len(rows)) if len(rows[g]) == 1]
        multi = [g for g in range(len(rows)) if len(rows[g]) > 1]
        batches = [[part[i] for i in group] for part in (single, multi)
                   for group in length_batches([widths[g] for g in part], self.batch_tokens)]
        sums = {n: None for n in self.names}
        n_keys = 0
        # keys kept before each module runs; the last one to run stops the forward before computing
        # anything (the reference runs it first: for an MLP output projection, a large matmul a batch)
        with TraceDict(self.model, self.names, retain_output=False, retain_input=True, detach=True,
                       stop=True, before=True) as keys:
            for group in batches:
                width = widths[group[0]]
                batch = torch.full((len(group), width), self.pad_id, dtype=torch.long)
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
                with torch.autocast(device.type, dtype=self.act, enabled=self.act is not None):
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
                        for l in range(self.top + 1):
                            h = a.run_block(l, h, ctx)
                    except StopForward:
                        pass
                for n in self.names:  # keys at real tokens only, summed in the statistics' dtype
                    k = keys[n].input[keep].to(self.dtype)
                    if sums[n] is None:
                        sums[n] = k.new_zeros(k.shape[1], k.shape[1])
                    sums[n].addmm_(k.t(), k)
                n_keys += int(keep.sum())
        if n_keys == 0:  # texts that tokenise to nothing
            dims = {n: module_input_size(self.model, n) for n in self.names}
            sums = {n: torch.zeros(dims[n], dims[n], dtype=self.dtype, device=device) for n in self.names}
        return sums, n_keys

    def first_bad(self, texts) -> int | None:
        """The index of the first text whose keys alone are not finite."""
        for i, t in enumerate(texts):
            sums, _ = self([t])
            if not all(bool(torch.isfinite(s).all()) for s in sums.values()):
                return i
        return None


def collect_mom2_fast(model, tok, layer_names, texts, maxlen: int, batch_tokens: int,
                      dtype=torch.float32, act_dtype=None, packed: bool = True,
                      row_tokens: int = ROW_TOKENS, progress: bool = True, desc=None,
                      stats_out: dict | None = None) -> dict[str, SecondMoment]:
    """Σ k kᵀ over every token of `texts` at the input of each module in `layer_names`, in one
    pass, in memory (no checkpoint): {name: SecondMoment}. packed=False batches texts by length
    with right padding (the reference's batching, on the block-by-block runner). `stats_out`
    receives tokens and seconds."""
    from .stats_stream import stream_sums

    summer = KeySummer(model, tok, layer_names, maxlen, batch_tokens, dtype, act_dtype, packed, row_tokens)
    res = stream_sums(summer, texts, summer.names, progress=progress, desc=desc or f"stats {summer.names[-1]}")
    if stats_out is not None:
        stats_out.update(tokens=res.count, seconds=res.seconds)
    if res.count == 0:
        raise ValueError("the corpus produced no tokens")
    return {n: SecondMoment(res.sums[n].to(dtype), res.count) for n in summer.names}


def model_fingerprint(model) -> str:
    """A short hash of a model's config and a strided sample of every parameter: tells a
    checkpoint's model from another of the same name, at the cost of a few thousand reads."""
    import hashlib
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            k = min(64, flat.numel())
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(name.encode() + str(tuple(p.shape)).encode())
            h.update(flat[idx].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _converged_file(paths: dict, names, request: dict):
    """The statistics files of an earlier `until_converged` run with the same request, if any:
    {name: path}, found through their convergence records."""
    found = {}
    for n in names:
        folder = paths[n].parent
        if not folder.is_dir():
            return None
        for js in folder.glob(f"{n}_*.convergence.json"):
            try:
                rec = json.loads(js.read_text())
            except (OSError, ValueError):
                continue
            npz = js.with_name(js.name[:-len(".convergence.json")] + ".npz")
            if rec.get("request") == request and rec.get("converged") and npz.is_file():
                found[n] = (npz, rec["texts"])
                break
        else:
            return None
    return found


def layer_stats_fast(model, tok, layer_names, stats_dir, ds_name: str | None = None,
                     to_collect=("mom2",), sample_size=None, precision="float32", batch_tokens=None,
                     progress=True, corpus=None, model_name: str | None = None,
                     force_recompute: bool = False, act_dtype=None, packed: bool = True, *,
                     seed: int = 1, until_converged: float | None = None, probe_requests=None,
                     checkpoint_minutes: float | None = 10.0, checkpoint_texts: int | None = None,
                     restart: bool = False, shard: bool = False, stats_out: dict | None = None,
                     after_round=None):
    """`stats.layer_stats` on the fast collector. `layer_names`: one module name (returns a
    LayerStats) or several (returns {name: LayerStats}, the missing ones collected in one pass).
    The cache files are the reference path's; act_dtype 'bfloat16'/'float16' runs the forward
    in that precision (tensor cores on a GPU, AMX / AVX-512-BF16 on a recent x86 CPU) with the
    sums still in `precision`; such files are approximate and carry an `_act-<dtype>` suffix.

    The run (docs/statistics.md) checkpoints under `stats_dir` every `checkpoint_minutes` /
    `checkpoint_texts` and resumes from there (restart=True discards the checkpoint); shard=True
    splits the corpus over the torchrun ranks (every rank must call it; rank 0 writes the files);
    until_converged=TOL stops at the first doubling of the sample where C⁻¹k moved by less than
    TOL for the probe keys (those of `probe_requests`, else a fixed set), and the file then records
    the texts used as its sample size. The convergence curve is written beside each file
    (`<file stem>.convergence.json`). `seed` picks another fixed subset than the reference's (1).
    stats_out receives tokens, seconds, texts and the curve of the pass; after_round() is called
    after each round of chunks (`stats_stream`)."""
    single = isinstance(layer_names, str)
    names = [layer_names] if single else list(dict.fromkeys(layer_names))
    if not names:
        raise ValueError("no layers given")
    ds_name = check_stats_request(to_collect, precision, sample_size, ds_name, corpus)
    maxlen = context_length(model)
    batch_tokens = int(maxlen * 3 if batch_tokens is None else batch_tokens)
    if batch_tokens <= 0:
        raise ValueError("batch_tokens must be positive")
    if until_converged is not None and not until_converged > 0:
        raise ValueError(f"until_converged must be a positive tolerance, got {until_converged}")
    info = distributed.current() if shard else distributed.DistInfo()
    model_name = model_name or stats_model_name(model)
    dims = {n: module_input_size(model, n) for n in names}
    request = dict(precision=precision, act_dtype=act_dtype, seed=seed, sample_size=sample_size,
                   batch_tokens=batch_tokens, until_converged=until_converged,
                   probes=None if probe_requests is None else _probe_fp(probe_requests))
    out, paths = {}, {}
    digest = None if stats_dir is None else corpus_digest(corpus if corpus is not None else ds_name)
    for n in names:
        if stats_dir is None:
            continue
        paths[n] = stats_path(stats_dir, model_name, ds_name, n, precision, to_collect, sample_size,
                              batch_tokens, maxlen, act_dtype, seed)
        if paths[n].is_file() and not force_recompute:
            stat = load_stats_file(paths[n], dims[n], sample_size, digest)
            if stat is not None:
                out[n] = LayerStats(stat, paths[n], sample_size)
    missing = [n for n in names if n not in out]
    if missing and until_converged is not None and stats_dir is not None and not force_recompute:
        earlier = _converged_file(paths, missing, request)
        if earlier:
            for n, (path, texts) in earlier.items():
                out[n] = LayerStats(load_stats_file(path, dims[n], texts, digest), path, texts)
            missing = []
    if not missing:
        return out[names[0]] if single else {n: out[n] for n in names}

    from ..files import atomic_write
    from .stats_checkpoint import checkpoint_base, discard_checkpoints
    from .stats_convergence import PROBE_REQUESTS, ConvergenceTracker, probe_keys
    from .stats_stream import stream_sums

    texts, _ = resolve_corpus(corpus, ds_name)
    order = sample_order(len(texts), sample_size, seed)
    sample = _Subset(texts, order)
    summer = KeySummer(model, tok, missing, min(maxlen, batch_tokens), batch_tokens, _PRECISIONS[precision],
                       act_dtype, packed)
    names_run = summer.names  # execution order
    tracker = ConvergenceTracker(probe_keys(model, tok, names_run, probe_requests), until_converged)
    settings = {**request, "model": model_name, "model_fingerprint": model_fingerprint(model),
                "corpus": ds_name, "corpus_fingerprint": texts_fingerprint(texts, order),
                "probes": _probe_fp(probe_requests or PROBE_REQUESTS), "packed": packed,
                "row_tokens": ROW_TOKENS, "maxlen": min(maxlen, batch_tokens)}
    base = checkpoint_base(paths[names_run[-1]], len(names_run)) if stats_dir is not None else None
    res = stream_sums(summer, sample, names_run, info=info, checkpoint_base=base, settings=settings,
                      every_s=None if checkpoint_minutes is None else 60.0 * checkpoint_minutes,
                      every_texts=checkpoint_texts, tracker=tracker, restart=restart,
                      progress=progress and info.is_main, desc=f"stats {names_run[-1]}",
                      after_round=after_round)
    if res.count == 0:
        raise ValueError(f"the corpus {ds_name!r} produced no tokens")
    # a run stopped early by convergence records the texts it used, as a fixed-size run of that
    # many texts would (the sample is a prefix of the same order)
    used = res.texts if res.texts < len(sample) else sample_size
    for n in names_run:
        if res.sums[n].shape[0] != dims[n]:
            raise ValueError(f"{n}: collected keys of width {res.sums[n].shape[0]}, expected {dims[n]}")
        stat = SecondMoment(res.sums[n].to(_PRECISIONS[precision]), res.count)
        path = None
        if stats_dir is not None:
            path = stats_path(stats_dir, model_name, ds_name, n, precision, to_collect, used, batch_tokens,
                              maxlen, act_dtype, seed)
            if info.is_main:
                save_stats_file(path, stat, used, digest)
                record = _curve_record(res, n, request, model_name, ds_name, len(sample), probe_requests)
                atomic_write(path.with_name(path.name[:-len(".npz")] + ".convergence.json"),
                             lambda f: json.dump(record, f, indent=1), "w")
        out[n] = LayerStats(stat, path, used)
    if info.distributed:
        distributed.barrier()  # the files are written before any checkpoint goes
    if base is not None and info.is_main:
        discard_checkpoints(base)
    if stats_out is not None:
        stats_out.update(tokens=res.count, seconds=res.seconds, local_tokens=res.local_tokens,
                         texts=res.texts, converged=res.converged, curve=res.curve)
    return out[names[0]] if single else {n: out[n] for n in names}


def _probe_fp(requests) -> str:
    from .stats_convergence import probes_fingerprint
    return probes_fingerprint(requests)


def _curve_record(res, name, request, model_name, ds_name, n_sample, probe_requests) -> dict:
    from .stats_convergence import PROBE_REQUESTS
    probes = probe_requests or PROBE_REQUESTS
    return {"model": model_name, "layer": name, "corpus": ds_name, "request": request,
            "sample_texts": n_sample, "texts": res.texts, "keys": res.count, "converged": res.converged,
            "seconds": res.seconds, "tokens_per_s_rank0": res.local_tokens / max(res.seconds, 1e-9),
            "probes": {"source": "requests" if probe_requests else "built-in", "n": len(probes)},
            "measure": "largest relative change of C^-1 k over the probe keys since the previous doubling",
            "curve": [{"texts": p["texts"], "keys": p["keys"], "change": p["change"][name],
                       "median_change": p["median_change"][name], "max_change": p["max_change"]}
                      for p in res.curve]}
