"""MEMIT hyperparameters with the reference's JSON field names (docs/memit.md §Hyperparameters).

`MEMITHyperParams.from_name("gpt2-xl")` loads a bundled preset; `from_json(path)` reads any
reference-format file. Unknown keys are an error (a typo must not fall back to a default), except
the known extras: `model_name` (AlphaEdit's copies of the MEMIT files carry it), `mom2_act_dtype`
(this package's half-precision statistics option) and `mom2_ridge` (as ROME's)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..hparams import ReferenceHParams, _preset_path, list_presets as _list_presets

PRESET_DIR = Path(__file__).resolve().parent / "hparams"
# names people call the Llama-3 preset by that the hub-name matcher does not catch
_ALIASES = {"llama-3-8b": "Meta-Llama-3-8B", "llama3-8b": "Meta-Llama-3-8B"}


@dataclass
class MEMITHyperParams(ReferenceHParams):
    METHOD: ClassVar[str] = "MEMIT"
    PRESETS: ClassVar[Path] = PRESET_DIR
    OPTIONAL: ClassVar[tuple] = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
                                 "ln_f_module", "lm_head_module", "model_name", "mom2_act_dtype", "mom2_ridge")
    USES_LAMBDA: ClassVar[bool] = True     # False where the solve ignores mom2_update_weight (AlphaEdit)

    layers: list[int]
    layer_selection: str = "all"           # read, as in the reference, but unused
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int = -1
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    mom2_update_weight: float = 15000.0    # λ in  ΔW = R Kᵀ (λC + KKᵀ)⁻¹
    # module names ("{}" = the layer): None = the model adapter's, else checked against it (sites.py)
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    attn_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int | None = 100000    # None: every text of the corpus
    mom2_dtype: str = "float32"
    # extras (not in the reference's class)
    model_name: str | None = None          # AlphaEdit's files name the model; not used here
    mom2_act_dtype: str | None = None      # fast statistics forward in bf16/fp16 (own cache files)
    mom2_ridge: float | None = None        # C + ridge·mean(diag C)·I for statistics refused otherwise

    def __post_init__(self):
        self.check_common()
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"hparams.layers must be strictly ascending (MEMIT updates them bottom up "
                             f"and optimises z at the last one), got {self.layers}")
        lam = float(self.mom2_update_weight)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"mom2_update_weight (λ) must be a finite number >= 0, got {self.mom2_update_weight!r}")
        if int(self.v_num_grad_steps) < 1:
            raise ValueError(f"v_num_grad_steps must be at least 1, got {self.v_num_grad_steps}")

    @property
    def z_layer(self) -> int:
        """Where the target vectors z live: the residual stream after the last edited layer."""
        return self.layers[-1]

    @classmethod
    def from_dict(cls, data: dict) -> "MEMITHyperParams":
        if isinstance(data, dict) and "layers" not in data:
            raise ValueError("MEMIT hyperparameters need 'layers'")
        return super().from_dict(data)

    @classmethod
    def preset_path(cls, name: str) -> Path | None:
        path = _preset_path(name, PRESET_DIR)
        if path is None and name:
            short = str(name).rstrip("/").replace("/", "_").lower().rsplit("_", 1)[-1]
            for alias, stem in _ALIASES.items():
                if short == alias or short.startswith(alias + "-"):
                    return PRESET_DIR / f"{stem}.json"
        return path

    @classmethod
    def for_model(cls, model, name: str | None = None, layers=None) -> "MEMITHyperParams":
        """The preset matching `name` (or the model's config name) if there is one, otherwise the
        reference's GPT-J values with module names from the model's adapter (then `layers` is
        required). `layers` overrides the preset's; v_loss_layer becomes the last layer."""
        return cls.for_model_layers(model, name, layers)


def check_layers(hp: MEMITHyperParams, num_layers: int) -> None:
    """Edited layers and the loss layer must exist in a `num_layers`-layer model."""
    bad = [l for l in hp.layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"edit layer(s) {bad} of hparams.layers {hp.layers} are outside the model's "
                         f"{num_layers} layers (0..{num_layers - 1})")
    if hp.v_loss_layer >= num_layers:
        raise ValueError(f"hparams.v_loss_layer {hp.v_loss_layer} is outside the model's {num_layers} "
                         f"layers (use {num_layers - 1}, the last)")


def list_presets() -> list[str]:
    return _list_presets(PRESET_DIR)
