"""The reference's `rome.layer_stats.layer_stats`, and what the compat editing functions share
about statistics: where they are looked for, the optional download, and the one-line error that
says how to edit offline.

Statistics are looked up in the reference's layout under `util.globals.STATS_DIR`, so the
reference's own `.npz` files, copied there, are used as they are and need no corpus. A missing
file is downloaded from the reference's server (as the reference does) unless `download=False`;
failing that it is computed from a corpus: `$ROME_FAST_CORPUS` (a local text file) when set, or
hparams `mom2_dataset` when it names a local text file, else the named Hugging Face dataset."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from ...edit.corpus import local_corpus
from ...edit.covariance import StatisticsError
from ...edit.stats import layer_stats as _layer_stats
from ...edit.stats import load_stats_file, stats_model_name, stats_path
from ..util import globals as _globals

STATS_URL = "https://rome.baulab.info/data/stats/"


def _tqdm():
    from tqdm.auto import tqdm
    return tqdm


def env_corpus():
    """$ROME_FAST_CORPUS as a path, or None."""
    value = os.environ.get("ROME_FAST_CORPUS")
    return Path(value).expanduser() if value else None


def stats_file(model, layer_name: str, ds_name: str, sample_size, precision, stats_dir=None,
               model_name=None) -> Path:
    return stats_path(stats_dir or _globals.STATS_DIR, model_name or stats_model_name(model), ds_name,
                      layer_name, precision, ("mom2",), sample_size)


def download_stats(path: Path, stats_dir) -> bool:
    """Fetch the reference's statistics file for `path` (its path relative to stats_dir) from the
    reference's server into place. False (and one line on stderr) when that fails."""
    from ...data import _atomic, _download

    rel = Path(path).relative_to(stats_dir).as_posix()
    try:
        with _atomic(Path(path)) as (f, tmp):
            _download(STATS_URL + rel, f, rel, True, 30.0, path)
            f.flush()
            load_stats_file(tmp)  # a ValueError unless it is a readable statistics file
    except (FileNotFoundError, ValueError) as exc:
        print(f"{exc}; computing the statistics locally", file=sys.stderr)
        return False
    return True


def _help(paths, ds_name, exc) -> StatisticsError:
    where = ", ".join(str(p) for p in paths)
    return StatisticsError(
        f"no statistics file at {where} and the dataset {ds_name!r} cannot be read here ({exc}): "
        f"copy the reference's statistics file(s) to that path, or set ROME_FAST_CORPUS to a local "
        f"text file (or mom2_dataset in the hparams JSON to its path) to compute them from it")


@contextlib.contextmanager
def explain_offline(model, hparams, layers, download: bool = True):
    """Yields the corpus to pass to rome_fast's editing (a local file, or None). Before the edit, a
    missing statistics file is downloaded when it can be; if the edit then needs a dataset that
    cannot be loaded (no `datasets` package, no network), the error says how to give a statistics
    file or a local corpus instead."""
    corpus = local_corpus(env_corpus(), hparams.mom2_dataset)
    if corpus is not None or not hparams.mom2_adjustment:
        yield corpus
        return
    from ...models import adapter_for
    adapter = adapter_for(model)
    paths = [stats_file(model, adapter.rewrite_name(layer), hparams.mom2_dataset, hparams.mom2_n_samples,
                        hparams.mom2_dtype) for layer in layers]
    if download:
        for p in paths:
            if not p.is_file():
                download_stats(p, _globals.STATS_DIR)
    try:
        yield None
    except (ImportError, OSError) as exc:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            raise
        raise _help(missing, hparams.mom2_dataset, " ".join(str(exc).split())) from exc


def layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=None, sample_size=None,
                precision=None, batch_tokens=None, download=True, progress=_tqdm):
    """The second moment of `layer_name`'s input (`stat.mom2.moment()`), cached in the reference's
    layout under stats_dir; precision None means float64, as the reference. `progress`: anything
    but None shows a progress bar."""
    model_name = model_name or stats_model_name(model)
    corpus = local_corpus(env_corpus(), ds_name)
    path = stats_path(stats_dir, model_name, ds_name, layer_name, precision, to_collect, sample_size)
    if download and corpus is None and not path.is_file():
        download_stats(path, Path(stats_dir))
    try:
        return _layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect=tuple(to_collect),
                            sample_size=sample_size, precision=precision, batch_tokens=batch_tokens,
                            progress=progress is not None, corpus=corpus, model_name=model_name)
    except (ImportError, OSError) as exc:
        if corpus is not None or path.is_file():
            raise
        raise _help([path], ds_name, " ".join(str(exc).split())) from exc


__all__ = ["layer_stats"]
