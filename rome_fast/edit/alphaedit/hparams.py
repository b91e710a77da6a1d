"""AlphaEdit hyperparameters: MEMIT's fields (same presets, same meaning) plus the two of the
projection, with the reference's JSON names (docs/alphaedit.md §Hyperparameters).

`nullspace_threshold`: eigenvalues of the mean second moment C below it count as zero; their
eigenvectors span the null space P projects onto (absolute, in C's units). `L2`: the ridge α in
the solve (the paper's I, the code's α·I)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..hparams import list_presets as _list_presets
from ..memit.hparams import MEMITHyperParams

PRESET_DIR = Path(__file__).resolve().parent / "hparams"


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    METHOD: ClassVar[str] = "AlphaEdit"
    PRESETS: ClassVar[Path] = PRESET_DIR
    USES_LAMBDA: ClassVar[bool] = False    # mom2_update_weight is read (the files carry it) but unused

    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        t = float(self.nullspace_threshold)
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"nullspace_threshold must be a finite number > 0 (eigenvalues of C below it span "
                             f"the null space), got {self.nullspace_threshold!r}")
        a = float(self.L2)
        if not math.isfinite(a) or a <= 0:
            raise ValueError(f"L2 (the ridge α) must be a finite number > 0: with α = 0 the projected system "
                             f"is singular outside the null space; got {self.L2!r}")

    @classmethod
    def preset_path(cls, name: str) -> Path | None:
        """The AlphaEdit file of the model MEMIT's preset matching would pick (same names, aliases)."""
        memit = MEMITHyperParams.preset_path(name)
        if memit is None:
            return None
        path = PRESET_DIR / memit.name
        return path if path.is_file() else None


def list_presets() -> list[str]:
    return _list_presets(PRESET_DIR)
