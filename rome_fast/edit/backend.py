"""One protocol for every editing method and implementation (ROME, MEMIT, AlphaEdit × reference,
fast), and the one driver behind `apply_rome_to_model`, `apply_memit_to_model`, ...

Every method's update of a weight is a sum of outer products, W += U Rᵀ (in W's layout): ROME's
u ⊗ right for each request, MEMIT's K-side solve times the spread residual, AlphaEdit's projected
solve times the residual. A backend therefore reports its work as `WeightDelta`s, and one compiled
rank-k kernel applies any of them.

A backend says:
* `check_requests(...)`: validated, normalised copies of the requests (the first bad one is a
  ValueError naming it);
* `prepare(...)`: everything a call needs that the edits do not change — options checked, context
  templates sampled from the unedited model, statistics loaded and checked — returned as the
  keywords `compute`/`edit` get (default: the keywords as given);
* `compute(...)`: the deltas of a call's requests, computed on the model as it is; the model is
  left exactly as it was (bitwise) on return;
* `edit(...)`: compute and keep the deltas in the model (a backend may fuse the two, as fast ROME
  does: no snapshot, restore and re-add);
* `batches`: True when one call solves all its requests together (MEMIT, AlphaEdit); False when
  requests are edited one after another, each on the model edited by the ones before (ROME).

`apply_edits` checks every request and prepares before touching anything, snapshots the weights
the backend will change, runs the edit, and on any exception — KeyboardInterrupt included — copies
the snapshot back before re-raising: a failed call never leaves a half-edited model. See
docs/editing.md, "Backends"."""
from __future__ import annotations

import copy as copy_module
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .sites import edit_sites
from .solve_update import LAYOUTS, rank_k_update_


@dataclass
class WeightDelta:
    """W += U Rᵀ for layout "in_out" (W is [d_k, d_v], GPT-2's Conv1D) or W += R Uᵀ for "out_in"
    (W is [d_v, d_k], nn.Linear). U [d_k, n], R [d_v, n]."""
    name: str            # parameter name, e.g. "model.layers.4.mlp.down_proj.weight"
    U: torch.Tensor
    R: torch.Tensor
    layout: str
    info: Any = field(default=None, compare=False)  # what the method wants to report (ROME: ValueInfo)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.U.dim() == 1:
            self.U = self.U.unsqueeze(1)
        if self.R.dim() == 1:
            self.R = self.R.unsqueeze(1)
        if self.U.shape[1] != self.R.shape[1]:
            raise ValueError(f"{self.name}: U has {self.U.shape[1]} columns but R has {self.R.shape[1]}")

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def matrix(self) -> torch.Tensor:
        """The update in W's own shape, float32 (for inspection, saving and tests)."""
        m = self.U.float() @ self.R.float().T
        return m if self.layout == "in_out" else m.T

    @torch.no_grad()
    def apply_(self, model) -> None:
        """W += the update, in place, with the compiled rank-k kernel where it can run."""
        W = model.get_parameter(self.name)
        rank_k_update_(W, self.U.to(W.device), self.R.to(W.device), self.layout)


class EditBackend:
    """Base class of an editing backend; register an instance with `register_backend`."""
    method: ClassVar[str] = ""      # "rome", "memit", "alphaedit", ...
    name: ClassVar[str] = ""        # "reference", "fast", ...
    batches: ClassVar[bool] = False

    def weight_names(self, model, hparams) -> list[str]:
        """The parameters an edit with `hparams` may change (snapshotted by `apply_edits`): by
        default the rewrite weight of every layer in hparams.layers, from the model's adapter."""
        return [s.weight for s in edit_sites(model, hparams)]

    def check_requests(self, model, tok, requests: list, hparams) -> list:
        """Validated, normalised copies of the requests; raises ValueError naming the bad one.
        Called on every request before anything is edited."""
        raise NotImplementedError

    def prepare(self, model, tok, requests: list, hparams, **kw) -> dict:
        """The keywords for compute/edit, after the work and checks that do not depend on the
        edits (called once per `apply_edits`, before anything is edited)."""
        return kw

    def compute(self, model, tok, requests: list, hparams, **kw) -> list[WeightDelta]:
        """The deltas of `requests` (already checked) on the model as it is; the model is left
        bitwise unchanged on return. A non-batching backend gets one request per call."""
        raise NotImplementedError

    def edit(self, model, tok, requests: list, hparams, **kw) -> list[WeightDelta]:
        """Compute the deltas and keep them in the model; returns them."""
        deltas = self.compute(model, tok, requests, hparams, **kw)
        for d in deltas:
            d.apply_(model)
        return deltas


_REGISTRY: dict[tuple[str, str], EditBackend] = {}


def register_backend(backend: EditBackend) -> EditBackend:
    """Make `backend` reachable as (backend.method, backend.name)."""
    if not backend.method or not backend.name:
        raise ValueError("an edit backend needs a method and a name")
    _REGISTRY[(backend.method, backend.name)] = backend
    return backend


def backend_names(method: str) -> list[str]:
    return sorted(name for m, name in _REGISTRY if m == method)


def get_backend(method: str, name: str) -> EditBackend:
    if (method, name) not in _REGISTRY:
        known = backend_names(method)
        raise ValueError(f"unknown {method} backend {name!r}: one of {known}" if known
                         else f"unknown editing method {method!r}: one of {sorted({m for m, _ in _REGISTRY})}")
    return _REGISTRY[(method, name)]


@torch.no_grad()
def restore_weights(model, orig_weights: dict) -> None:
    """Copy saved weights back (bitwise: a plain copy of the clones)."""
    for name, w in orig_weights.items():
        model.get_parameter(name).copy_(w)


def apply_edits(model, tok, requests, hparams, method: str, backend="fast", copy: bool = False,
                return_orig_weights: bool = False, after_each=None, **kw):
    """Edit `model` with `requests` using (method, backend); `backend` is a registered name or an
    EditBackend instance. Returns (model, orig_weights, deltas): orig_weights maps the changed
    parameters to clones taken before the first request when return_orig_weights=True (else {});
    deltas lists every WeightDelta applied, in order.

    Every request is checked, and the backend prepared, before anything is edited. On any
    exception (KeyboardInterrupt included) the weights are put back as they were before the call,
    then the exception goes on. after_each(n), if given, runs after each edit step with the number
    of requests edited so far (ROME: after every request), e.g. to save progress."""
    impl = backend if isinstance(backend, EditBackend) else get_backend(method, backend)
    if isinstance(requests, dict):
        requests = [requests]
    requests = impl.check_requests(model, tok, list(requests), hparams)
    if not requests:
        raise ValueError("no requests to edit")
    kw = impl.prepare(model, tok, requests, hparams, **kw)
    if copy:
        model = copy_module.deepcopy(model)
    names = impl.weight_names(model, hparams)
    saved = {n: model.get_parameter(n).detach().clone() for n in names}
    applied: list[WeightDelta] = []
    try:
        groups = [requests] if impl.batches else [[r] for r in requests]
        done = 0
        for group in groups:
            deltas = impl.edit(model, tok, group, hparams, **kw)
            stray = sorted({d.name for d in deltas} - saved.keys())
            if stray:  # a change apply_edits could not undo: a bug in the backend
                raise RuntimeError(f"{type(impl).__name__} changed {stray}, which its weight_names() "
                                   f"does not list")
            applied += deltas
            done += len(group)
            if after_each is not None:
                after_each(done)
    except BaseException:
        restore_weights(model, saved)
        raise
    return model, (saved if return_orig_weights else {}), applied
