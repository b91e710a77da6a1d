"""Second-moment statistics C = E[k kᵀ] of a rewrite module's input (docs/statistics.md).

Keys are collected at every non-padding token of `sample_size` texts (a fixed pseudo-random
subset: `random.Random(1)` shuffles the indices, the first `sample_size` are taken), each
truncated at the model's context length (capped at 2048); the forward stops right after the
module. The disk cache uses the reference's layout and names, so its statistics files load:
`{stats_dir}/{model_name}/{ds_name}_stats/{layer}_{precision}_{stats}_{sample_size}.npz` with
keys `mom2.mom2` (the *sum* of k kᵀ), `mom2.count`, `mom2.constructor`, `sample_size`.
This module holds that naming, the file format and the plain (reference) collector; the fast,
streamed, resumable one is `fast_stats` with `stats_stream`."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..hooks import module_input_size
from .corpus import corpus_digest, corpus_name, resolve_corpus

MAX_CONTEXT = 2048       # cap on article length (Llama-style configs claim 8k-128k positions)
ARTICLES_PER_BATCH = 100  # the reference's DataLoader batch, sorted by length within it
_CONSTRUCTOR = "util.runningstats.SecondMoment()"
_PRECISIONS = {"float32": torch.float32, "float64": torch.float64, None: torch.float64}


class SecondMoment:
    """Running sum of k kᵀ and its count; `moment()` is the uncentred mean E[k kᵀ]."""

    def __init__(self, mom2: torch.Tensor | None = None, count: int = 0):
        self.mom2, self.count = mom2, int(count)

    def add(self, a: torch.Tensor) -> None:
        if len(a) == 0:
            return
        if self.mom2 is None:
            self.mom2 = a.new_zeros(a.shape[1], a.shape[1])
        self.mom2.addmm_(a.t(), a)
        self.count += a.shape[0]

    def moment(self) -> torch.Tensor:
        return self.mom2 / self.count


class LayerStats:
    """What `layer_stats` returns, shaped like the reference's CombinedStat: `.mom2.moment()`."""

    def __init__(self, mom2: SecondMoment, path: Path | None = None, sample_size=None):
        self.mom2, self.path, self.sample_size = mom2, path, sample_size


def default_stats_dir() -> Path:
    """$ROME_FAST_CACHE/stats (default ~/.cache/rome_fast/stats): where editing caches statistics
    unless told otherwise (the reference's STATS_DIR)."""
    from ..models.loading import cache_root
    return cache_root() / "stats"


def stats_model_name(model) -> str:
    """The reference's `config._name_or_path` with '/' -> '_', so one model has one statistics
    folder however it was loaded: a local folder gives its last component, a snapshot folder
    of the Hugging Face cache (`.../models--org--name/snapshots/<rev>`) its hub id `org_name`
    (the embedded model is named by `models.loading`)."""
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/")
    if not name:
        return type(model).__name__
    if os.path.isabs(name) or name.startswith(".") or os.path.isdir(name):
        parts = Path(name).parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3][len("models--"):].replace("--", "_")
        name = Path(name).name
    return name.replace("/", "_")


def corpus_ds_name(corpus, default: str | None = None) -> str:
    """The cache folder name of a corpus (`corpus.corpus_name`: a file's stem, a folder's or a
    dataset's name); with no corpus, that of `default` (the hparams' mom2_dataset: a dataset
    name or a local path)."""
    if corpus is None:
        if not default:
            raise ValueError("no corpus and no dataset name for the statistics")
        corpus = default
    return corpus_name(corpus)


def sample_order(n_texts: int, sample_size=None, seed: int = 1) -> list[int]:
    """The indices of the texts used, in order: the reference's FixedRandomSubsetSampler
    (`random.Random(1)` shuffles every index, the first `sample_size` are kept)."""
    order = list(range(n_texts))
    random.Random(seed).shuffle(order)
    return order if sample_size is None else order[:int(sample_size)]


def context_length(model) -> int:
    cfg = model.config
    n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or MAX_CONTEXT
    return min(int(n), MAX_CONTEXT)


def stats_path(stats_dir, model_name: str, ds_name: str, layer_name: str, precision="float32",
               to_collect=("mom2",), sample_size=None, batch_tokens=None, maxlen=None,
               act_dtype=None, seed: int = 1) -> Path:
    precision = precision or "float64"
    # statistics from a half-precision forward are approximate: never under the exact ones' name
    act_sfx = f"_act-{act_dtype}" if act_dtype not in (None, "float32") else ""
    size_sfx = "" if sample_size is None else f"_{sample_size}"
    # the reference meant a `_t{batch_tokens}` suffix when batch_tokens truncates articles below
    # the context length; its string lacked the f-prefix. Here it is written out.
    t_sfx = f"_t{batch_tokens}" if batch_tokens is not None and maxlen is not None and batch_tokens < maxlen else ""
    seed_sfx = f"_seed{seed}" if seed != 1 else ""  # another subset than the reference's
    name = f"{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{size_sfx}{t_sfx}{act_sfx}{seed_sfx}.npz"
    return Path(stats_dir) / _path_part(model_name) / f"{_path_part(ds_name)}_stats" / name


def _path_part(name: str) -> str:
    """One path component (names come from configs and hparams: nothing may climb out)."""
    name = str(name).replace("/", "_").replace("\\", "_")
    return "_" if name in ("", ".", "..") else name


def load_stats_file(path, expected_dim: int | None = None, sample_size=None,
                    corpus_sha256: str | None = None) -> SecondMoment | None:
    """A cached statistics file, or None if its sample_size differs from the one asked for.
    A file that is unreadable, of the wrong shape, holds non-finite values or no keys is a
    ValueError naming it (with what to do: delete it, so it is recomputed); so is one made from
    another corpus than `corpus_sha256` (`corpus.corpus_digest`: the cache is named after the
    corpus's file name, so two corpora of one name would share it). Files without a recorded
    digest (the reference's, older ones) and corpora without one (dataset names, lists) are not
    compared. Whether the statistics are good enough to edit with (enough keys, positive
    definite) is checked when editing (covariance.py)."""
    path = Path(path)
    redo = "delete it to recompute it"
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as exc:  # zip errors, pickled objects, truncation
        raise ValueError(f"statistics file {path} could not be read ({exc}): {redo}") from None
    for key in ("mom2.mom2", "mom2.count"):
        if key not in data:
            raise ValueError(f"statistics file {path} has no {key!r} entry (keys: {sorted(data)}): {redo}")
    try:
        stored = data.get("sample_size")
        stored = None if stored is None or int(stored) < 0 else int(stored)
        count = int(data["mom2.count"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"statistics file {path}: sample_size / count are not integers ({exc}): {redo}") from None
    if stored != sample_size:
        return None
    recorded = str(data["corpus_sha256"]) if "corpus_sha256" in data else None
    if corpus_sha256 is not None and recorded is not None and recorded != corpus_sha256:
        raise ValueError(f"statistics file {path} was computed from another corpus than the one given now "
                         f"(same name, other content): delete it to recompute, or give the corpus another "
                         f"file name or another --stats-dir")
    mom2 = data["mom2.mom2"]
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise ValueError(f"statistics file {path}: second moment has shape {mom2.shape}, not square: {redo}")
    if expected_dim is not None and mom2.shape[0] != expected_dim:
        raise ValueError(f"statistics file {path}: second moment is {mom2.shape[0]}x{mom2.shape[1]} "
                         f"but the layer's key width is {expected_dim}: {redo}")
    if mom2.dtype.kind != "f":
        raise ValueError(f"statistics file {path}: second moment has dtype {mom2.dtype}, not float: {redo}")
    if not np.isfinite(mom2).all():
        raise ValueError(f"statistics file {path}: second moment contains NaN or Inf: {redo}")
    if count <= 0:
        raise ValueError(f"statistics file {path}: count is {count}: {redo}")
    return SecondMoment(torch.from_numpy(mom2), count)


def save_stats_file(path, stat: SecondMoment, sample_size=None, corpus_sha256: str | None = None) -> None:
    """Written atomically (`files.atomic_write`): a reader never sees half a file.
    corpus_sha256 (`corpus.corpus_digest`) is checked when the file is reused (`load_stats_file`)."""
    from ..files import atomic_write
    extra = {} if corpus_sha256 is None else {"corpus_sha256": np.array(corpus_sha256)}
    atomic_write(path, lambda f: np.savez(
        f, **{"mom2.mom2": stat.mom2.cpu().numpy(), "mom2.count": np.array(stat.count),
              "mom2.constructor": np.array(_CONSTRUCTOR),
              "sample_size": np.array(-1 if sample_size is None else sample_size), **extra}))


def length_batches(lengths, batch_tokens: int):
    """Index groups in decreasing length with (longest in group) × (group size) <= batch_tokens,
    as the reference's `length_collation`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, cur = [], []
    for i in order:
        if cur and lengths[cur[0]] * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def collect_mom2(model, tok, layer_names, texts, maxlen: int, batch_tokens: int,
                 dtype=torch.float32, progress=True, desc=None) -> dict[str, SecondMoment]:
    """Sum k kᵀ over every token of `texts` (a sequence of strings) at the input of each module
    in `layer_names`, in one pass that stops after the deepest of them: {name: SecondMoment}."""
    from tqdm.auto import tqdm

    from ..hooks import TraceDict, in_execution_order

    if isinstance(layer_names, str):
        layer_names = [layer_names]
    order = in_execution_order(model, layer_names)  # stop after the module that runs last
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stats = {n: SecondMoment() for n in order}
    bar = tqdm(total=len(texts), desc=desc or f"stats {order[-1]}", disable=not progress, unit="text")
    with torch.no_grad():
        for start in range(0, len(texts), ARTICLES_PER_BATCH):
            chunk = [texts[i] for i in range(start, min(start + ARTICLES_PER_BATCH, len(texts)))]
            ids = [tok(t, truncation=True, max_length=maxlen)["input_ids"] for t in chunk]
            ids = [x for x in ids if len(x) > 0]
            for group in length_batches([len(x) for x in ids], batch_tokens):
                width = len(ids[group[0]])
                batch = torch.full((len(group), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for r, i in enumerate(group):
                    batch[r, :len(ids[i])] = torch.tensor(ids[i])
                    mask[r, :len(ids[i])] = 1
                pos = torch.arange(width).unsqueeze(0).expand(len(group), width)
                batch, mask, pos = batch.to(device), mask.to(device), pos.to(device)
                with TraceDict(model, order, retain_output=False, retain_input=True, detach=True, stop=True) as tr:
                    model(input_ids=batch, attention_mask=mask, position_ids=pos, use_cache=False)
                keep = mask.bool()
                for n in order:  # keys at non-padding tokens only
                    stats[n].add(tr[n].input[keep].to(dtype))
            bar.update(len(chunk))
    bar.close()
    if stats[order[0]].count == 0:
        raise ValueError("the corpus produced no tokens")
    return stats


def check_stats_request(to_collect, precision: str, sample_size, ds_name, corpus) -> str:
    """Validates a statistics request (both collectors); returns the cache's dataset name."""
    if tuple(to_collect) != ("mom2",):
        raise ValueError(f"only the 'mom2' statistic is collected, not {tuple(to_collect)}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be 'float32' or 'float64', not {precision!r}")
    if sample_size is not None and int(sample_size) <= 0:
        raise ValueError(f"sample_size must be positive, got {sample_size}")
    if ds_name is None:
        if corpus is None:
            raise ValueError("give a corpus or a dataset name (ds_name) for the statistics")
        ds_name = corpus_ds_name(corpus)
    return ds_name


def layer_stats(model, tok, layer_name: str, stats_dir, ds_name: str | None = None,
                to_collect=("mom2",), sample_size=None, precision="float32", batch_tokens=None,
                progress=True, corpus=None, model_name: str | None = None,
                force_recompute: bool = False) -> LayerStats:
    """Second moment of `layer_name`'s input over a corpus, cached on disk.

    corpus: a text file, a list of strings, or a Hugging Face dataset name; None loads `ds_name`
    ('wikipedia' or 'wikitext', needs the `datasets` package). ds_name names the cache folder
    (default: the file's stem). sample_size: how many texts (None: all). A cached file is reused
    when its stored sample_size matches; `stats_dir=None` disables the disk cache."""
    ds_name = check_stats_request(to_collect, precision, sample_size, ds_name, corpus)
    maxlen = context_length(model)
    if batch_tokens is None:
        batch_tokens = maxlen * 3
    batch_tokens = int(batch_tokens)
    if batch_tokens <= 0:
        raise ValueError("batch_tokens must be positive")
    dim = module_input_size(model, layer_name)
    path = None
    if stats_dir is not None:
        path = stats_path(stats_dir, model_name or stats_model_name(model), ds_name, layer_name,
                          precision, to_collect, sample_size, batch_tokens, maxlen)
        if path.is_file() and not force_recompute:
            stat = load_stats_file(path, dim, sample_size, corpus_digest(corpus if corpus is not None else ds_name))
            if stat is not None:
                return LayerStats(stat, path, sample_size)

    texts, _ = resolve_corpus(corpus, ds_name)
    subset = _Subset(texts, sample_order(len(texts), sample_size))
    stat = collect_mom2(model, tok, [layer_name], subset, min(maxlen, batch_tokens), batch_tokens,
                        _PRECISIONS[precision], progress)[layer_name]
    if stat.mom2.shape[0] != dim:
        raise ValueError(f"{layer_name}: collected keys of width {stat.mom2.shape[0]}, expected {dim}")
    if path is not None:
        save_stats_file(path, stat, sample_size, corpus_digest(corpus if corpus is not None else ds_name))
    return LayerStats(stat, path, sample_size)


class _Subset:
    def __init__(self, texts, order):
        self.texts, self.order = texts, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.texts[self.order[i]]
