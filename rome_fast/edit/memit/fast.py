"""The "fast" MEMIT backend (the default): the reference's algorithm (main.py) with exact savings.

* the z of all requests optimised together (`fast_z.compute_zs`: lower blocks once, suffixes on
  cached prefixes, shared forward/backward, per-request Adam, stop and clamp);
* H at the first layer is h_init from the z step (the bare prompt's block-L output at the
  subject's last token, before any update: what the reference recomputes);
* keys and H from forwards stopped at the module that provides them;
* statistics of every edited layer from one pass, kept as C's cached fp64 Cholesky factor;
  X = (λC + KKᵀ)⁻¹K by Woodbury on the factor when n < d_k, else by factoring λC + KKᵀ (solve.py);
* W += R Xᵀ in place by the fused rank-k kernel, without forming the d_v×d_k update; `edit`
  leaves the updates in the model (no snapshot, restore and re-add as the reference does).

Subclasses change the per-layer statistics and solve (`layer_solvers`, `solve_layer`) or add
work after a batch (`after_batch`): AlphaEdit's projected solve plugs in there."""
from __future__ import annotations

import time

import torch

from ..backend import WeightDelta, register_backend
from .compute_ks import compute_ks, residual_at_z_layer
from .fast_z import compute_zs, z_matrix
from .main import MEMITBackend, check_memit_requests, prepare, weight_names
from .solve import solve
from .stats import default_stats, layer_factors
from .z_checkpoint import ZCheckpoint, identity


class MEMITFast(MEMITBackend):
    name = "fast"

    # ---- the parts a subclass may change ------------------------------------------------------
    def layer_solvers(self, model, tok, hparams, key_sizes, stats_dir, corpus, cov, progress) -> dict:
        """Per edited layer, what `solve_layer` needs (here: C's factor)."""
        return layer_factors(model, tok, hparams, key_sizes, default_stats(stats_dir, corpus), corpus, cov,
                             progress)

    def solve_layer(self, solver, K: torch.Tensor, hparams, layer: int) -> torch.Tensor:
        """U (d_k × n, float64) such that the layer's update is W += R Uᵀ."""
        return solve(solver, K, float(hparams.mom2_update_weight), self.solve_method)

    def after_batch(self, model, tok, requests, hparams, templates, solvers) -> None:
        """Called once the batch's updates are in the model (edit) / before they are undone."""

    solve_method = "auto"

    # ---- the protocol -----------------------------------------------------------------------
    def compute(self, model, tok, requests, hparams, **kw) -> list[WeightDelta]:
        names = weight_names(model, hparams)
        saved = {n: model.get_parameter(n).detach().clone() for n in names}
        try:
            return self.edit(model, tok, requests, hparams, **kw)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    model.get_parameter(n).copy_(w)

    def edit(self, model, tok, requests, hparams, context_templates=None, stats_dir=None, corpus=None,
             cov=None, seed: int = 0, progress: bool = True, z_batch: int | None = None,
             zs: list | None = None, return_info: dict | None = None, z_checkpoint=None) -> list[WeightDelta]:
        """The updates of `requests`, left in the model. zs: their target vectors, computed
        before (`compute_zs` on this model, with these hparams and templates), e.g. to try
        several λ or lower layers with one z step. z_checkpoint: a folder where the z step keeps
        its finished vectors, so a call cut short and made again resumes it (z_checkpoint.py).
        return_info: a dict to fill with the z step's ZInfo list ("z") and per-layer details
        ("layers"); with z_checkpoint, its seconds include "z_resumed" (spent by earlier calls)."""
        clock = [time.perf_counter()]
        requests = check_memit_requests(model, requests, hparams)
        adapter, layout, templates, d_k = prepare(model, tok, hparams, context_templates, seed)
        solvers = self.layer_solvers(model, tok, hparams, d_k, stats_dir, corpus, cov, progress)
        clock.append(time.perf_counter())
        if zs is not None and len(zs) != len(requests):
            raise ValueError(f"zs holds {len(zs)} target vectors for {len(requests)} requests")
        checkpoint = None
        if z_checkpoint is not None and zs is None:
            checkpoint = ZCheckpoint(z_checkpoint, identity(model, hparams, templates, weight_names(model, hparams)))
        zinfo = zs if zs is not None else compute_zs(model, tok, requests, hparams, templates, adapter, z_batch,
                                                      progress, checkpoint)
        clock.append(time.perf_counter())
        Z = z_matrix(zinfo)                                                   # [d, n]
        bare_first = templates[0] == ["{}"]
        m = len(hparams.layers)
        deltas, layers = [], {}
        for i, (layer, name) in enumerate(zip(hparams.layers, weight_names(model, hparams))):
            K = compute_ks(model, tok, requests, hparams, layer, templates, stop=True).T      # [d_k, n]
            if i == 0 and bare_first:  # nothing is updated yet: H is the z step's h_init
                H = torch.stack([z.h_init for z in zinfo], 1)
            else:
                H = residual_at_z_layer(model, tok, requests, hparams, stop=True).T
            R = (Z - H).double() / (m - i)
            U = self.solve_layer(solvers[layer], K, hparams, layer)
            d = WeightDelta(name, U, R, layout)
            d.apply_(model)
            deltas.append(d)
            layers[layer] = {"K": K.detach().cpu(), "residual_norm": (Z - H).norm(dim=0).cpu()}
        self.after_batch(model, tok, requests, hparams, templates, solvers)
        for d in deltas:  # the factors, as the reference returns them: float64 on the CPU
            d.U, d.R = d.U.cpu(), d.R.cpu()
        if return_info is not None:
            clock.append(time.perf_counter())
            return_info.update(z=zinfo, layers=layers, seconds=dict(
                setup=clock[1] - clock[0], z=clock[2] - clock[1], layers=clock[3] - clock[2],
                **({"z_resumed": checkpoint.resumed_seconds} if checkpoint is not None else {})))
        return deltas


register_backend(MEMITFast())
