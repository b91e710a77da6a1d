"""Checkpoints of a statistics run (docs/statistics.md, "Resuming").

One file per rank, beside the statistics it will produce
(`{ds}_stats/.checkpoints/{final name}.rank{r}.ckpt.npz`): the fp64 sums of every layer of the
pass, the key count, how many rounds of the corpus the rank has summed, the convergence record,
and the settings of the run. It is written to a temporary file in the same folder, flushed and
fsynced, then renamed over the previous checkpoint, which stays whole until that moment; a failed
write (a full disk) leaves it as it was. It is read with allow_pickle=False, and a checkpoint
written with other settings is refused, never merged."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..files import atomic_write

VERSION = 1
SUFFIX = ".ckpt.npz"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous one is intact)."""


def checkpoint_base(final_path, n_layers: int = 1) -> Path:
    """The path prefix of a run's checkpoints: named after the statistics file of the pass's
    last layer (and how many layers the pass has)."""
    final_path = Path(final_path)
    stem = final_path.name[:-len(".npz")] if final_path.name.endswith(".npz") else final_path.name
    more = f"+{n_layers - 1}-more-layers" if n_layers > 1 else ""
    return final_path.parent / ".checkpoints" / f"{stem}{more}"


def checkpoint_path(base: Path, rank: int) -> Path:
    return Path(f"{base}.rank{rank}{SUFFIX}")


def discard_checkpoints(base: Path) -> None:
    """Remove every rank's checkpoint of a run (it has finished)."""
    folder = Path(base).parent
    if folder.is_dir():
        for p in folder.glob(f"{Path(base).name}.rank*{SUFFIX}"):
            p.unlink(missing_ok=True)
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass




def save_checkpoint(path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write atomically; on any failure the previous file at `path` is untouched and a
    CheckpointWriteError says so."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))
    except OSError as exc:
        kept = "the previous checkpoint is intact" if path.is_file() else "there was no earlier checkpoint"
        raise CheckpointWriteError(exc.errno, f"could not write the checkpoint {path} ({exc.strerror or exc}); "
                                   f"{kept}: free some space and rerun the same command to resume") from None


def load_checkpoint(path, settings: dict):
    """(arrays, meta) of the checkpoint at `path`, None when there is none. ValueError when it
    cannot be read or was written with other settings than `settings`."""
    path = Path(path)
    if not path.is_file():
        return None
    fix = "rerun with the settings it was written with, or delete it (--restart) to start over"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as exc:  # zip, JSON and pickle refusals alike
        raise ValueError(f"checkpoint {path} could not be read ({type(exc).__name__}: {exc}): "
                         "delete it (--restart) to start over") from None
    if meta.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has format version {meta.get('version')!r}, not {VERSION}: "
                         "delete it (--restart) to start over")
    old = meta.get("settings", {})
    diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
        raise ValueError(f"checkpoint {path} was written with other settings ({shown}): {fix}")
    return arrays, meta
