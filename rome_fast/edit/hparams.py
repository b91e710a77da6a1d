"""Editing hyperparameters with the reference's JSON field names (docs/editing.md, "Hyperparameters"):
`ReferenceHParams`, the (de)serialisation and checks shared by every method, and ROME's.

`ROMEHyperParams.from_name("gpt2-xl")` loads a bundled preset; `from_json(path)` reads any
reference-format file (unknown keys are an error, so a typo cannot silently fall back to a
default); `to_json(path)` writes one back. The module-name fields are optional: None means the
model adapter's modules; a given name is checked against the adapter when editing (`sites.py`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .covariance import check_ridge

PRESET_DIR = Path(__file__).resolve().parent / "hparams"
FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last", "last")


class ReferenceHParams:
    """(De)serialisation shared by the editing methods' hyperparameter dataclasses: JSON files with
    the reference's field names; the OPTIONAL extras are written only when set."""
    METHOD: ClassVar[str] = ""
    PRESETS: ClassVar[Path] = PRESET_DIR
    OPTIONAL: ClassVar[tuple] = ()

    def check_common(self) -> None:
        """What every method checks: layers, key token, statistics precision and ridge, module names."""
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        self.layers = [int(x) for x in self.layers]
        if not self.layers:
            raise ValueError("hparams.layers must name at least one layer")
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"unknown fact_token {self.fact_token!r}: one of {FACT_TOKENS}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ValueError(f"mom2_dtype must be 'float32' or 'float64', not {self.mom2_dtype!r}")
        if self.mom2_act_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"mom2_act_dtype must be None, 'bfloat16' or 'float16', not {self.mom2_act_dtype!r}")
        for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or "{}" not in value):
                raise ValueError(f"hparams.{name} must be a module name with '{{}}' for the layer number "
                                 f"(or null for the model's own), got {value!r}")
        for name in ("ln_f_module", "lm_head_module"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"hparams.{name} must be a module name or null, got {value!r}")
        check_ridge(getattr(self, "mom2_ridge", None))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in self.OPTIONAL:  # the reference's fields only, unless the option is used
            if d.get(key) is None:
                d.pop(key, None)
        return d

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=4) + "\n")

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.METHOD} hyperparameters must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.METHOD} hyperparameter(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, fpath):
        path = Path(fpath)  # the parameter keeps the reference's name
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except TypeError as exc:  # a required field missing
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_name(cls, name: str):
        """A bundled preset by model name: 'gpt2-xl', 'EleutherAI/gpt-j-6B' (or with '_'),
        'smollm2-135m', ... (case-insensitive)."""
        path = cls.preset_path(name)
        if path is None:
            raise ValueError(f"no {cls.METHOD} preset for {name!r}; bundled presets: "
                             f"{', '.join(list_presets(cls.PRESETS))}")
        return cls.from_json(path)

    @classmethod
    def preset_path(cls, name: str) -> Path | None:
        return _preset_path(name, cls.PRESETS)

    @classmethod
    def for_model_layers(cls, model, name: str | None = None, layers=None):
        """The preset matching `name` (or the model's config name), else the class defaults with
        the module names of the model's adapter (then `layers` is required); `layers` overrides
        the preset's; v_loss_layer becomes the last layer."""
        from ..models import adapter_for

        adapter = adapter_for(model)
        for candidate in (name, getattr(model.config, "_name_or_path", None)):
            if candidate and cls.preset_path(candidate) is not None:
                hp = cls.from_name(candidate)
                break
        else:
            if layers is None:
                raise ValueError(f"no {cls.METHOD} preset for {name or model.config._name_or_path!r}: "
                                 "give the layer(s) to edit")
            hp = cls(layers=list(layers), rewrite_module_tmp=adapter.rewrite_template,
                     layer_module_tmp=adapter.layer_template, mlp_module_tmp=adapter.mlp_template,
                     attn_module_tmp=adapter.attn_template, ln_f_module=adapter.final_norm_name,
                     lm_head_module=adapter.lm_head_name)
        if layers is not None:
            hp = dataclasses.replace(hp, layers=list(layers))
        if not 0 <= min(hp.layers) <= max(hp.layers) < adapter.num_layers:
            raise ValueError(f"edit layer(s) {hp.layers} out of range for a {adapter.num_layers}-layer model")
        hp.v_loss_layer = adapter.num_layers - 1
        return hp


@dataclass
class ROMEHyperParams(ReferenceHParams):
    METHOD: ClassVar[str] = "ROME"
    OPTIONAL: ClassVar[tuple] = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
                                 "ln_f_module", "lm_head_module", "mom2_act_dtype", "mom2_ridge")

    layers: list[int]
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int = -1
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    # module names ("{}" = the layer): None = the model adapter's, else checked against it
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    attn_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int | None = 100000  # None: every text of the corpus
    mom2_dtype: str = "float32"
    # the statistics forward's precision (fast collector only; the sums stay in mom2_dtype):
    # None = the model's; "bfloat16"/"float16" trade exactness for speed, in separate cache files
    mom2_act_dtype: str | None = None
    # not in the reference: C + mom2_ridge·mean(diag C)·I instead of refusing statistics that are
    # singular or not positive definite (None: refuse them)
    mom2_ridge: float | None = None

    def __post_init__(self):
        self.check_common()

    @classmethod
    def for_model(cls, model, name: str | None = None, layer: int | None = None) -> "ROMEHyperParams":
        """The preset matching `name` (or the model's config name) if there is one, otherwise the
        shared reference values with module names from the model's adapter (then `layer` is
        required). `layer` overrides the preset's layer; v_loss_layer is the last layer."""
        return cls.for_model_layers(model, name, None if layer is None else [int(layer)])


def _norm(name: str) -> str:
    return name.replace("/", "_").lower()


def list_presets(preset_dir: Path = PRESET_DIR) -> list[str]:
    return sorted(p.stem for p in Path(preset_dir).glob("*.json"))


def _preset_path(name: str, preset_dir: Path = PRESET_DIR) -> Path | None:
    """Match a preset by name, case-insensitively, with or without the hub owner, allowing a
    suffix after '-': 'openai-community/gpt2-xl' -> gpt2-xl, 'EleutherAI/gpt-j-6B' ->
    EleutherAI_gpt-j-6B, 'HuggingFaceTB/SmolLM2-135M-Instruct' and the embedded model's cache
    directory 'smollm2-135m-fp32-<size>' -> SmolLM2-135M."""
    if not name:
        return None
    key = _norm(str(name).rstrip("/"))
    key = {"smollm2": "smollm2-135m", "default": "smollm2-135m"}.get(key, key)
    short = key.rsplit("_", 1)[-1]
    for stem in list_presets(preset_dir):
        s = _norm(stem)
        for cand in (s, s.rsplit("_", 1)[-1]):
            for k in (key, short):
                if k == cand or k.startswith(cand + "-"):
                    return Path(preset_dir) / f"{stem}.json"
    return None
