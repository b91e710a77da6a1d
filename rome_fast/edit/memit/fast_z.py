"""The target vectors z of many requests, optimised together (the fast path of `compute_z`).

Exact savings only: every request has its own δ_j, its own Adam state, early stop and clamp, and
gets the z the reference's one-request loop gives (up to rounding):

* δ_j enters at block L's output (L = the z layer), so blocks 0..L are constant: they run once,
  without autograd, over every row of every request of a group.
* Causal attention, and δ added at each row's lookup index s: a row's positions before
  min(s, first target position) never change. Their keys/values in blocks L+1..N−1 are recorded
  once (`prepare_suffix_run`); each step runs those blocks only on the rows' suffixes, with the
  prefix replayed from the cache. The KL row needs one position.
* The unembedding runs only where the loss reads it (target positions, the KL row's position).
* All the requests of a group share one forward/backward per step. Their losses are summed, and
  since δ_j touches only request j's rows, the gradient of δ_j is that of request j's own loss.
  One Adam over the [g, d] parameter is request-wise Adam: Adam is elementwise, and every request
  still running has taken the same number of steps. A request that stops (loss < 0.05) keeps its δ
  (it is copied back after the shared step), and its rows leave the batch.
* Groups are sized to a memory budget; requests are independent, so grouping changes nothing."""
from __future__ import annotations

import importlib
import time

import torch
import torch.nn.functional as F

from ...models import adapter_for
from ...models.base import KVRecorder, KVReplay
from ..fast_compute_v import prepare_suffix_run
from .compute_z import ZInfo, loss_layer, z_rows

CPU_BUDGET = 2 << 30  # bytes of autograd activations per group on a CPU


def _bytes_per_token(a, first_layer: int, key_size: int) -> int:
    """A rough size of what one suffix token keeps for the backward pass across blocks
    first_layer..N−1 (attention and MLP activations, fp32)."""
    return 4 * max(1, a.num_layers - first_layer) * (14 * a.hidden_size + 5 * key_size)


def _budget(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.4)
    return CPU_BUDGET


# the module (rome_fast.edit re-exports a function under its name): STOP_LOSS is read at each step
_value = importlib.import_module("..compute_v", __package__)


class _Request:
    """A request's rows, their suffix spans, and where its loss reads."""

    def __init__(self, tok, request, templates, fact_token, device):
        ids, mask, lengths, lookup, target_ids, n_rw = z_rows(tok, request, templates, fact_token, device)
        self.ids, self.lengths, self.lookup, self.target_ids, self.n_rw = ids, lengths, lookup, target_ids, n_rw
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        n_t = len(target_ids)
        for i, (lk, ln) in enumerate(zip(lookup, lengths)):
            if not 0 <= lk < ln:
                raise ValueError(f"lookup index {lk} is outside row {i} of length {ln} for subject "
                                 f"{request['subject']!r}")
        # rewriting rows need logits at ℓ−n_t … ℓ−1; the KL row at its lookup index only
        self.start = [min(lookup[i], lengths[i] - n_t) for i in range(n_rw)] + [lookup[n_rw]]
        self.end = lengths[:n_rw] + [lookup[n_rw] + 1]
        self.width = max(e - s for s, e in zip(self.start, self.end))

    @property
    def rows(self) -> int:
        return self.n_rw + 1


def compute_zs(model, tok, requests, hparams, context_templates, adapter=None, z_batch: int | None = None,
               progress: bool = False, checkpoint=None) -> list[ZInfo]:
    """One ZInfo per request (z = h_init + δ at the z layer), optimised in groups of up to
    `z_batch` requests (default: as many as fit a memory budget). checkpoint: a `ZCheckpoint`;
    the requests it holds are read from it, each finished group is written to it."""
    a = adapter or adapter_for(model)
    device = next(model.parameters()).device
    L = hparams.z_layer
    out: list = [None] * len(requests)
    keys = []
    if checkpoint is not None:
        from .z_checkpoint import request_key
        keys = [request_key(r) for r in requests]
        found = checkpoint.load(device)
        out = [found.get(k) for k in keys]
    todo = [j for j in range(len(requests)) if out[j] is None]
    items = {j: _Request(tok, requests[j], context_templates, hparams.fact_token, device) for j in todo}
    if z_batch is None and items:
        per_req = max(it.rows * it.width for it in items.values())
        z_batch = max(1, _budget(device) // (per_req * _bytes_per_token(a, L + 1, a.key_size)))
    # similar widths together (less padding); the results do not depend on the grouping
    order = sorted(todo, key=lambda j: (items[j].width, len(items[j].ids[0])))
    groups = [order[s:s + z_batch] for s in range(0, len(order), z_batch)] if items else []
    from tqdm.auto import tqdm
    for group in tqdm(groups, desc=f"z ({len(todo)} of {len(requests)} requests)", unit="group",
                      disable=not progress):
        t0 = time.perf_counter()
        infos = _optimise_group(model, a, [items[j] for j in group], hparams)
        if checkpoint is not None:
            checkpoint.save([keys[j] for j in group], infos, time.perf_counter() - t0)
        for j, info in zip(group, infos):
            out[j] = info
    return out


def _optimise_group(model, a, items, hparams) -> list[ZInfo]:
    device = next(model.parameters()).device
    L, N = hparams.z_layer, a.num_layers
    loss_at = loss_layer(hparams, L, N)
    g = len(items)
    # the group's rows, right-padded to one width; per row: its request
    T = max(it.ids.shape[1] for it in items)
    ids = torch.cat([F.pad(it.ids, (0, T - it.ids.shape[1]), value=it.pad_id) for it in items])
    lengths = [x for it in items for x in it.lengths]
    mask = (torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
    start = [x for it in items for x in it.start]
    end = [x for it in items for x in it.end]
    lookup = [x for it in items for x in it.lookup]
    req = [j for j, it in enumerate(items) for _ in range(it.rows)]
    first_row = [sum(it.rows for it in items[:j]) for j in range(g)]
    targets = {}  # rewriting row -> target ids (its loss reads the last len(ids) positions)
    for j, it in enumerate(items):
        for i in range(it.n_rw):
            targets[first_row[j] + i] = it.target_ids

    with torch.no_grad():
        emb = a.embed(ids)
        h, ctx = a.prepare(emb, mask, full_mask=True)
        for l in range(L + 1):
            h = a.run_block(l, h, ctx)
        h_init = torch.stack([h[first_row[j], lookup[first_row[j]]] for j in range(g)]).float()
    # rows of similar suffix width run together (less padding; rows never see each other)
    buckets = [_Bucket(a, rows, emb, mask, h, lengths, start, end, lookup, req, targets, L + 1)
               for rows in _by_width([e - s for s, e in zip(start, end)])]
    del h, emb
    req_t = torch.tensor(req, device=device)
    n_t_row = torch.tensor([len(targets.get(r, [0])) for r in range(len(req))], device=device, dtype=torch.float32)
    n_rw_req = torch.tensor([it.n_rw for it in items], device=device, dtype=torch.float32)

    delta = torch.zeros(g, h_init.shape[1], dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    h_norm = h_init.norm(dim=1)
    max_norm = hparams.clamp_norm_factor * h_norm
    active = torch.ones(g, dtype=torch.bool, device=device)
    losses = [[] for _ in range(g)]
    steps = [0] * g
    kl_init = None
    was_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        running_buckets = buckets
        for it_ in range(hparams.v_num_grad_steps):
            ids_act = torch.nonzero(active)[:, 0]
            opt.zero_grad()
            with torch.enable_grad():
                t_h, t_row, t_id, kl_h, kl_req = [], [], [], [], []
                for b in running_buckets:
                    x = b.h.index_put((b.local, b.at), delta[b.req].to(b.h.dtype), accumulate=True)
                    x_loss = x if loss_at == L else None
                    for l in range(L + 1, N):
                        x = a.run_block(l, x, b.ctx)
                        if l == loss_at:
                            x_loss = x
                    t_h.append(x_loss[b.t_local, b.t_col])
                    t_row.append(b.t_row)
                    t_id.append(b.t_id)
                    kl_h.append(x[b.kl_local, 0])
                    kl_req.append(b.kl_req)
                t_row, t_id, kl_req = torch.cat(t_row), torch.cat(t_id), torch.cat(kl_req)
                logp = torch.log_softmax(a.head(torch.cat(t_h + kl_h)).float(), dim=-1)
                nt = len(t_id)
                tok_logp = logp[:nt].gather(1, t_id[:, None])[:, 0]
                per_row = torch.zeros(len(req), device=device).index_add(0, t_row, tok_logp)
                nll_req = torch.zeros(g, device=device).index_add(0, req_t, -per_row / n_t_row)
                nll = nll_req[ids_act] / n_rw_req[ids_act]
                kl_logp = logp[nt:]
                if kl_init is None:  # every request runs at step 0
                    kl_init = torch.zeros(g, kl_logp.shape[1], device=device)
                    kl_init[kl_req] = kl_logp.detach()
                kl_each = (kl_logp.exp() * (kl_logp - kl_init[kl_req])).sum(-1)
                kl = hparams.kl_factor * torch.zeros(g, device=device).index_add(0, kl_req, kl_each)[ids_act]
                wd = hparams.v_weight_decay * delta[ids_act].norm(dim=1) / h_norm[ids_act] ** 2
                loss = nll + kl + wd
            for k, j in enumerate(ids_act.tolist()):
                losses[j].append((nll[k].item(), kl[k].item(), wd[k].item()))
            go_on = loss.detach() >= _value.STOP_LOSS
            if it_ == hparams.v_num_grad_steps - 1:
                break  # the last iteration only evaluates
            if not bool(go_on.any()):
                break
            loss[go_on].sum().backward()
            keep = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                running = torch.zeros(g, dtype=torch.bool, device=device)
                running[ids_act[go_on]] = True
                delta[~running] = keep[~running]          # a stopped request's δ no longer changes
                norms = delta.norm(dim=1)
                over = running & (norms > max_norm)
                delta[over] *= (max_norm[over] / norms[over])[:, None]
            for j in ids_act[go_on].tolist():
                steps[j] += 1
            if not bool(go_on.all()):  # the stopped requests' rows leave the batch
                active = running
                running_buckets = [s for s in (b.subset(active) for b in buckets) if s is not None]
    finally:
        for p, w in zip(model.parameters(), was_grad):
            p.requires_grad_(w)
    d = delta.detach()
    return [ZInfo(h_init[j] + d[j], h_init[j], d[j].clone(), losses[j], steps[j],
                  items[j].lookup) for j in range(g)]


def _by_width(widths, min_rows: int = 8) -> list[list[int]]:
    """Row indices bucketed by suffix width; a bucket of fewer than `min_rows` rows joins the
    next wider one (each bucket costs a pass through the blocks)."""
    order = sorted(range(len(widths)), key=lambda r: widths[r])
    buckets, cur = [], []
    for k, r in enumerate(order):
        cur.append(r)
        last = k == len(order) - 1
        if last or (widths[order[k + 1]] != widths[r] and len(cur) >= min_rows):
            buckets.append(cur)
            cur = []
    return buckets


class _Bucket:
    """Some rows of a group, as one suffix batch: their hidden states and context, where δ goes,
    and where their loss reads (target positions; the KL rows' one position)."""

    def __init__(self, a, rows, emb, mask, h, lengths, start, end, lookup, req, targets, first_layer, _view=None):
        if _view is not None:
            self.__dict__.update(_view)
            return
        device = h.device
        idx = torch.tensor(rows, device=device)
        self.rows = idx                                                  # group row ids
        self.h, self.ctx = prepare_suffix_run(a, emb[idx], mask[idx], [lengths[r] for r in rows], h[idx],
                                              [start[r] for r in rows], [end[r] for r in rows], first_layer)
        self.req = torch.tensor([req[r] for r in rows], device=device)
        self.local = torch.arange(len(rows), device=device)
        self.at = torch.tensor([lookup[r] - start[r] for r in rows], device=device)  # δ's column
        t_local, t_col, t_id = [], [], []
        for i, r in enumerate(rows):
            ids = targets.get(r, [])
            t_local += [i] * len(ids)
            t_col += range(lengths[r] - len(ids) - start[r], lengths[r] - start[r])
            t_id += ids
        self.t_local, self.t_col, self.t_id = (torch.tensor(x, dtype=torch.long, device=device)
                                               for x in (t_local, t_col, t_id))
        self.t_row = idx[self.t_local]
        kl = [i for i, r in enumerate(rows) if r not in targets]
        self.kl_local = torch.tensor(kl, dtype=torch.long, device=device)
        self.kl_req = self.req[self.kl_local]

    def subset(self, active_req: torch.Tensor) -> "_Bucket | None":
        """The rows of the requests still running (None if there are none)."""
        keep = active_req[self.req]
        if bool(keep.all()):
            return self
        if not bool(keep.any()):
            return None
        local = torch.nonzero(keep)[:, 0]
        new = torch.full_like(keep, -1, dtype=torch.long)
        new[local] = torch.arange(len(local), device=local.device)
        sub = self.ctx.select(local)
        sub.past = _replay_rows(self.ctx.past, local)
        tk, kk = keep[self.t_local], keep[self.kl_local]
        return _Bucket(*([None] * 12), _view=dict(
            rows=self.rows[local], h=self.h[local], ctx=sub, req=self.req[local],
            local=torch.arange(len(local), device=local.device), at=self.at[local],
            t_local=new[self.t_local[tk]], t_col=self.t_col[tk], t_id=self.t_id[tk], t_row=self.t_row[tk],
            kl_local=new[self.kl_local[kk]], kl_req=self.kl_req[kk]))


def _replay_rows(replay: KVReplay, index: torch.Tensor) -> KVReplay:
    """The replay of some rows of the batch, gathered once (not at every step)."""
    rec = KVRecorder()
    rec.keys = {k: v[index] for k, v in replay.recorded.keys.items()}
    rec.values = {k: v[index] for k, v in replay.recorded.values.items()}
    return KVReplay(rec, width=replay.width)


def z_matrix(infos) -> torch.Tensor:
    """[d, n] of the z vectors."""
    return torch.stack([i.z for i in infos], 1)

