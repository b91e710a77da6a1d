"""ROME requests one after another, the edited weights saved after each, so a long sequential run
resumes after its last finished request instead of at the start of its batch.

A sequential ROME batch of 100 requests takes a quarter of an hour on a CPU; without this, a crash
lost all of it. The folder holds one safetensors file: the current value of every weight ROME
edits and how many requests they contain, written atomically after every request. Its identity (the
model's fingerprint, the weights before the first request, the requests, the hyperparameters, the
context templates, the statistics' corpus or given C⁻¹, and the backend) must match the call's, else
the file is refused."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..files import content_sha256, remove_stale_temporaries, save_tensors_atomic, tensors_sha256

PROGRESS = "rome_progress.safetensors"


def apply_rome_resumable(model, tok, requests, hparams, folder, backend="fast", return_info: dict | None = None,
                         **kw) -> dict:
    """`apply_rome_to_model(model, tok, requests, hparams, return_orig_weights=True, backend=...,
    **kw)[1]`, resumable: the weights are saved to `folder` after each request, and a call that
    finds them there (same model state, requests and settings) loads them and goes on after the
    last saved request. Returns the weights from before the first request. Every request is
    checked before anything is edited; on any exception, KeyboardInterrupt included, the weights
    are put back as they were before the call (the saved progress stays for the next call).
    return_info, if given, receives {"resumed_requests", "resumed_seconds"}: what the file held."""
    from ..models import adapter_for
    from .backend import EditBackend, get_backend, restore_weights
    from .fast_stats import model_fingerprint
    from .memit.z_checkpoint import request_key
    from .rome import apply_rome_to_model
    from .templates import get_context_templates

    impl = backend if isinstance(backend, EditBackend) else get_backend("rome", backend)
    requests = impl.check_requests(model, tok, [requests] if isinstance(requests, dict) else list(requests), hparams)
    if not requests:
        raise ValueError("no requests to edit")
    if kw.get("context_templates") is None:  # from the model before the first request, on a resume too
        kw["context_templates"] = get_context_templates(model, tok, hparams.context_template_length_params,
                                                        kw.get("seed", 0))
    names = impl.weight_names(model, hparams)
    before = {n: model.get_parameter(n).detach().clone() for n in names}
    ident = content_sha256({"model": model_fingerprint(model), "weights": tensors_sha256(before),
                            "requests": [request_key(r) for r in requests], "hparams": hparams.to_dict(),
                            "templates": kw["context_templates"], "backend": impl.name,
                            "key_mode": kw.get("key_mode", "reference"), "family": adapter_for(model).family,
                            "statistics": _statistics_identity(kw)})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    path = folder / PROGRESS
    try:
        done, seconds = _load(path, ident, model, before)
        if return_info is not None:
            return_info.update(resumed_requests=done, resumed_seconds=seconds)
        last = time.perf_counter()

        def save(edited: int) -> None:  # after each request: the weights so far, with the time they took
            nonlocal last, seconds
            now = time.perf_counter()
            seconds, last = seconds + now - last, now
            save_tensors_atomic(path, {n: model.get_parameter(n) for n in names},
                                {"identity": ident, "done": str(done + edited), "seconds": repr(seconds)})

        if done < len(requests):
            apply_rome_to_model(model, tok, requests[done:], hparams, backend=impl, after_each=save, **kw)
    except BaseException:
        restore_weights(model, before)
        raise
    return before


def _statistics_identity(kw: dict):
    """What the covariance comes from besides the hyperparameters: the corpus (a file's name or
    an in-memory list's texts) or a given C⁻¹ (its bytes)."""
    inv = kw.get("inv_cov")
    if inv is not None:
        return tensors_sha256(inv if isinstance(inv, dict) else {"inv_cov": inv})
    corpus = kw.get("corpus")
    return content_sha256(list(corpus)) if isinstance(corpus, (list, tuple)) else (None if corpus is None
                                                                                   else str(corpus))


def _load(path: Path, ident: str, model, before: dict) -> tuple[int, float]:
    """(requests done, their seconds) from the progress file, its weights put in the model; (0, 0)
    without a file."""
    if not path.is_file():
        return 0, 0.0
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as st:
            meta = st.metadata() or {}
            saved = {n: st.get_tensor(n) for n in st.keys()}
        done, seconds = int(meta["done"]), float(meta["seconds"])
    except Exception as exc:  # a file this package did not write whole
        raise ValueError(f"{path} is not a readable ROME progress file ({type(exc).__name__}): delete it to "
                         "start the edits over") from None
    if meta.get("identity") != ident:
        raise ValueError(f"{path} holds the progress of another edit (another model state, requests or "
                         "settings): delete it, or give another folder")
    if sorted(saved) != sorted(before) or any(saved[n].shape != before[n].shape for n in before):
        raise ValueError(f"{path} holds weights {sorted(saved)}, not {sorted(before)}: delete it to start over")
    with torch.no_grad():
        for n, w in saved.items():
            model.get_parameter(n).copy_(w)
    return done, seconds
