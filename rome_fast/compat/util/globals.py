"""The reference's `util.globals`: where data, statistics, hyperparameters and results live.

The reference reads them from a `globals.yml` in the working directory. Here each is taken from
the environment variable of the same name when it is set, otherwise from rome_fast's cache
($ROME_FAST_CACHE, default ~/.cache/rome_fast), so no file has to exist anywhere:

    DATA_DIR     $DATA_DIR     or $ROME_FAST_CACHE/data     (data sets; the official files are fetched here)
    STATS_DIR    $STATS_DIR    or $ROME_FAST_CACHE/stats    (second-moment statistics, the reference's layout)
    HPARAMS_DIR  $HPARAMS_DIR  or $ROME_FAST_CACHE/hparams  (optional ROME/<model>.json files)
    RESULTS_DIR  $RESULTS_DIR  or ./results                 (as the reference's default)

Like the reference's, the values are read once, when the module is imported."""
from __future__ import annotations

import os
from pathlib import Path

from ...data import cache_dir
from ...edit.stats import default_stats_dir
from ...models.loading import cache_root


def _folder(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser() if value else default


DATA_DIR = _folder("DATA_DIR", cache_dir())
STATS_DIR = _folder("STATS_DIR", default_stats_dir())
HPARAMS_DIR = _folder("HPARAMS_DIR", cache_root() / "hparams")
RESULTS_DIR = _folder("RESULTS_DIR", Path("results"))
REMOTE_ROOT_URL = "https://rome.baulab.info"

__all__ = ["DATA_DIR", "HPARAMS_DIR", "REMOTE_ROOT_URL", "RESULTS_DIR", "STATS_DIR"]
