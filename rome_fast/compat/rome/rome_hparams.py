"""The reference's `rome.rome_hparams.ROMEHyperParams`: the same JSON fields (`from_json`)."""
from ...edit.hparams import ROMEHyperParams

__all__ = ["ROMEHyperParams"]
