"""Second-moment statistics C = E[k kᵀ] of a rewrite module's input (docs/editing.md, "Statistics").

Keys are collected at every non-padding token of `sample_size` texts (a fixed pseudo-random
subset: `random.Random(1)` shuffles the indices, the first `sample_size` are taken), each
truncated at the model's context length (capped at 2048); the forward stops right after the
module. The disk cache uses the reference's layout and names, so its statistics files load:
`{stats_dir}/{model_name}/{ds_name}_stats/{layer}_{precision}_{stats}_{sample_size}.npz` with
keys `mom2.mom2` (the *sum* of k kᵀ), `mom2.count`, `mom2.constructor`, `sample_size`."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from .corpus import resolve_corpus
from ..hooks import module_input_size

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
    """The reference's `config._name_or_path` with '/' -> '_'; a local path gives its last
    component (an absolute path would otherwise become a long, machine-specific name)."""
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/")
    if not name:
        return type(model).__name__
    if os.path.isabs(name) or name.startswith(".") or os.path.isdir(name):
        name = Path(name).name
    return name.replace("/", "_")


def corpus_ds_name(corpus, default: str | None = None) -> str:
    """The cache folder name of a corpus: a file's stem, a dataset's name ('/' -> '_'), 'corpus'
    for an in-memory list; `default` (the hparams' mom2_dataset) when there is no corpus."""
    if corpus is None:
        if not default:
            raise ValueError("no corpus and no dataset name for the statistics")
        return default
    if isinstance(corpus, (list, tuple)):
        return "corpus"
    if Path(corpus).is_file():
        return Path(corpus).stem
    return str(corpus).replace("/", "_")


def context_length(model) -> int:
    cfg = model.config
    n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or MAX_CONTEXT
    return min(int(n), MAX_CONTEXT)


def stats_path(stats_dir, model_name: str, ds_name: str, layer_name: str, precision="float32",
               to_collect=("mom2",), sample_size=None, batch_tokens=None, maxlen=None,
               act_dtype=None) -> Path:
    precision = precision or "float64"
    # statistics from a half-precision forward are approximate: never under the exact ones' name
    act_sfx = f"_act-{act_dtype}" if act_dtype not in (None, "float32") else ""
    size_sfx = "" if sample_size is None else f"_{sample_size}"
    # the reference meant a `_t{batch_tokens}` suffix when batch_tokens truncates articles below
    # the context length; its string lacked the f-prefix. Here it is written out.
    t_sfx = f"_t{batch_tokens}" if batch_tokens is not None and maxlen is not None and batch_tokens < maxlen else ""
    name = f"{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{size_sfx}{t_sfx}{act_sfx}.npz"
    return Path(stats_dir) / model_name.replace("/", "_") / f"{ds_name}_stats" / name


def load_stats_file(path, expected_dim: int | None = None, sample_size=None) -> SecondMoment | None:
    """A cached statistics file, or None if its sample_size differs from the one asked for.
    A file that is unreadable, of the wrong shape, holds non-finite values or no keys is a
    ValueError naming it (with what to do: delete it, so it is recomputed). Whether the statistics
    are good enough to edit with (enough keys, positive definite) is checked when editing
    (covariance.py)."""
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


def save_stats_file(path, stat: SecondMoment, sample_size=None) -> None:
    """Written to a temporary file beside the target and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{"mom2.mom2": stat.mom2.cpu().numpy(), "mom2.count": np.array(stat.count),
                           "mom2.constructor": np.array(_CONSTRUCTOR),
                           "sample_size": np.array(-1 if sample_size is None else sample_size)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
            stat = load_stats_file(path, dim, sample_size)
            if stat is not None:
                return LayerStats(stat, path, sample_size)

    texts, _ = resolve_corpus(corpus, ds_name)
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)  # the reference's FixedRandomSubsetSampler
    if sample_size is not None:
        order = order[:int(sample_size)]
    subset = _Subset(texts, order)
    stat = collect_mom2(model, tok, [layer_name], subset, min(maxlen, batch_tokens), batch_tokens,
                        _PRECISIONS[precision], progress)[layer_name]
    if stat.mom2.shape[0] != dim:
        raise ValueError(f"{layer_name}: collected keys of width {stat.mom2.shape[0]}, expected {dim}")
    if path is not None:
        save_stats_file(path, stat, sample_size)
    return LayerStats(stat, path, sample_size)


class _Subset:
    def __init__(self, texts, order):
        self.texts, self.order = texts, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.texts[self.order[i]]
