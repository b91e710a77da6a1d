"""The fast causal-tracing engine: many (token, layer) cells of many facts per forward pass.

The reference runs 2 + T·N forward passes of batch 1+S per fact and kind. This engine runs one
clean and one corrupted pass per group of facts, recording every block's input, then every cell
from the first layer where it differs from the corrupted run, cells of every kind and fact in one
batch; docs/tracing.md explains each saving and why it is exact.

`mode="grid"` runs every cell from the embeddings through the whole model with hooks instead (no
block-by-block reuse), the path for a model the adapters cannot run block by block."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from ..hooks import TraceDict, first_tensor
from ..models.base import BlockContext, KVRecorder, KVReplay
from ..ops import add_noise_, restore_rows_
from .kinds import TraceKind, get_kind, kind_names


@dataclass
class FactInput:
    """One fact to trace: token ids, subject range [b, e), noise [S, e-b, D] for its corrupted rows,
    the tokens whose rows are wanted (None: all), and the answer token (None: the clean top-1)."""
    input_ids: Sequence[int]
    subject_range: tuple[int, int]
    noise: torch.Tensor
    tokens: Sequence[int] | None = None
    answer: int | None = None

    def token_rows(self) -> list[int]:
        return list(self.tokens) if self.tokens is not None else list(range(len(self.input_ids)))


@dataclass
class FactTrace:
    answer: int
    high_score: float
    low_score: float
    scores: dict = field(default_factory=dict)  # kind name -> [len(tokens), N] float32 CPU tensor
    tokens: list = field(default_factory=list)


class Cell(NamedTuple):
    """One restoration to score: the fact, the kind, where its score goes (row, layer), the
    restored token's padded position, and the kind's restore rule applied to the layer."""
    fact: int
    kind: TraceKind
    row: int
    layer: int
    token: int
    start: int  # first layer whose input differs from the corrupted run
    lo: int     # restored layers [lo, hi)
    hi: int


# --------------------------------------------------------------------------------------------
# facts in a batch, and what the clean and corrupted passes leave for the cells


@dataclass
class _Batch:
    facts: list
    input_ids: torch.Tensor      # [F, T] left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pad: list                    # left padding of each fact

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


def _pad_facts(facts: list, device) -> _Batch:
    width = max(len(f.input_ids) for f in facts)
    ids = torch.zeros(len(facts), width, dtype=torch.long)
    mask = torch.zeros(len(facts), width, dtype=torch.long)
    pad = []
    for i, f in enumerate(facts):
        p = width - len(f.input_ids)
        ids[i, p:] = torch.as_tensor(list(f.input_ids))
        mask[i, p:] = 1
        pad.append(p)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return _Batch(facts, ids.to(device), mask.to(device), pos.to(device), pad)


@dataclass
class _Baseline:
    """The clean and corrupted passes of a batch: what every cell restores from and starts from."""
    batch: _Batch
    samples: int                  # S corrupted rows per fact
    answers: torch.Tensor         # [F] answer token per fact
    high: torch.Tensor            # [F] clean p(answer)
    ctx: BlockContext | None = None       # the clean batch's block context (one row per fact)
    clean_states: list | None = None      # block inputs 0..N of the clean run, [F, T, D] each
    clean_modules: dict | None = None     # hooked module name -> its clean output [F, T, D]
    corrupt_emb: torch.Tensor | None = None     # [F·S, T, D] corrupted word embeddings
    corrupt_states: list | None = None    # block inputs 0..N of the corrupted run (prefix mode)
    kv: KVRecorder | None = None          # the corrupted run's keys/values (suffix runs)
    low: torch.Tensor | None = None       # [F] corrupted p(answer)
    untouched: torch.Tensor | None = None  # [F] score of a cell that restores nothing that differs


def _from(states: torch.Tensor, start: int) -> torch.Tensor:
    return states if start == 0 else states[:, start:].contiguous()


def _answer_probs(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """p(answer) per row: exp(logit − logsumexp), which reads the vocabulary's logits once instead
    of writing a full softmax."""
    return (logits.gather(1, answers[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).exp()


def _last_logits(adapter, h_last: torch.Tensor) -> torch.Tensor:
    return adapter.head(h_last).float()


class _Restores:
    """Forward hooks (the hooks layer's TraceDict) on every module the given kinds restore; each
    writes the clean rows of its planned job in one `restore_rows_` launch. `plan` maps a module
    name to (clean output, row → fact, row → token or -1) and is set layer by layer."""

    def __init__(self, model, names: list[str]):
        self.plan: dict[str, tuple] = {}
        self._hooks = TraceDict(model, names, retain_output=False, edit_output=self._restore)

    def _restore(self, output, layer):
        job = self.plan.get(layer)
        if job is not None:
            restore_rows_(first_tensor(output), *job)
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hooks.close()


def _module_names(adapter, kinds) -> dict:
    """(kind name, layer) -> the hooked module's name, for the kinds that restore a module."""
    return {(k.name, layer): k.module_name(adapter, layer)
            for k in kinds if k.part is not None for layer in range(adapter.num_layers)}


# --------------------------------------------------------------------------------------------
# the engine


class TraceEngine:
    """Batched causal tracing on one model. `max_batch_tokens` bounds a pass's rows × width;
    None sizes it from free memory (CUDA) or a CPU default."""

    def __init__(self, mt, mode: str = "prefix", max_batch_tokens: int | None = None,
                 reuse_kv: bool = True):
        if mode not in ("prefix", "grid"):
            raise ValueError(f"unknown engine mode {mode!r}: 'prefix' or 'grid'")
        # suffix runs: a restored token's rows recompute only the positions from it on, the
        # keys/values before it coming from the corrupted run
        self.reuse_kv = reuse_kv and mode == "prefix"
        self.mt = mt
        self.adapter = mt.adapter
        self.model = mt.model
        self.mode = mode
        self.max_batch_tokens = max_batch_tokens
        self.splits = 0  # how often an out-of-memory split a batch (reported by benchmarks)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def _token_budget(self) -> int:
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            a = self.adapter
            # activations per token and row at the widest point of a block, with headroom
            per_token = (a.hidden_size * 8 + a.key_size * 3) * self.dtype.itemsize
            return int(max(2048, min(1 << 20, 0.35 * free / per_token)))
        # CPU: keep the widest temporary (the MLP's hidden layer) near 16 MiB. Larger blocks come
        # from the allocator as fresh memory maps (glibc maps anything over 32 MiB), and their
        # page faults cost more than the bigger matmuls gain.
        widest = max(self.adapter.key_size, self.adapter.hidden_size) * self.dtype.itemsize
        return int(max(512, min(8192, (16 << 20) // widest)))

    def _out_of_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.splits += 1

    # ---- public ---------------------------------------------------------------------------
    @torch.no_grad()
    def trace(self, facts: Sequence[FactInput], kinds: Sequence[str] | str = "all", window: int = 10,
              replace: bool = False) -> list[FactTrace]:
        """Scores of every (token, layer) cell of each kind for each fact. kinds=() only checks
        the predictions (the clean pass)."""
        kinds = tuple(get_kind(k) for k in kind_names(kinds))
        if window < 1:
            raise ValueError("window must be at least 1")
        samples = {f.noise.shape[0] for f in facts}
        if len(samples) != 1:
            raise ValueError("every fact of one call must use the same number of noise samples")
        for f in facts:
            b, e = f.subject_range
            if not 0 <= b < e <= len(f.input_ids):
                raise ValueError(f"subject range {f.subject_range} outside a {len(f.input_ids)}-token prompt")
            if f.noise.shape[1] != e - b or f.noise.shape[2] != self.adapter.hidden_size:
                raise ValueError(f"noise shape {tuple(f.noise.shape)} != (S, {e - b}, {self.adapter.hidden_size})")
            for t in f.token_rows():
                if not 0 <= t < len(f.input_ids):
                    raise ValueError(f"token {t} outside a {len(f.input_ids)}-token prompt")
        return self._trace_facts(list(facts), kinds, window, replace)

    def _trace_facts(self, facts: list, kinds, window: int, replace: bool) -> list[FactTrace]:
        """The facts in one batch; an out-of-memory that a smaller chunk of cells cannot avoid (in
        the clean or corrupted pass, or a single cell's rows) halves the facts instead of failing."""
        try:
            return self._trace_batch(_pad_facts(facts, self.device), kinds, window, replace)
        except torch.OutOfMemoryError:
            if len(facts) == 1:
                raise
        self._out_of_memory()  # outside the handler: the failed batch's tensors are freed by now
        half = len(facts) // 2
        return (self._trace_facts(facts[:half], kinds, window, replace)
                + self._trace_facts(facts[half:], kinds, window, replace))

    # ---- the clean and corrupted passes ------------------------------------------------------
    def _run_blocks(self, h, ctx, record: bool):
        states = [h] if record else None
        for layer in range(self.adapter.num_layers):
            h = self.adapter.run_block(layer, h, ctx)
            if record:
                states.append(h)
        return h, states

    def _baseline(self, batch: _Batch, kinds, replace: bool) -> _Baseline:
        a, dev = self.adapter, self.device
        F, S = len(batch.facts), batch.facts[0].noise.shape[0]

        # clean pass: answers, high scores, every state to restore from
        emb = a.embed(batch.input_ids)
        h0, ctx = a.prepare(emb, batch.attention_mask, batch.position_ids, full_mask=self.reuse_kv)
        names = _module_names(a, kinds)
        with TraceDict(self.model, names.values(), retain_output=True, clone=True, detach=True) as rec:
            h, clean_states = self._run_blocks(h0, ctx, record=True)
        clean_logits = _last_logits(a, h[:, -1])
        answers = torch.tensor([f.answer if f.answer is not None else int(clean_logits[i].argmax())
                                for i, f in enumerate(batch.facts)], device=dev)
        base = _Baseline(batch, S, answers, _answer_probs(clean_logits, answers))
        if not kinds:  # a prediction check: the clean pass is all that is needed
            return base
        base.ctx, base.clean_states = ctx, clean_states
        base.clean_modules = {name: first_tensor(rec[name].output) for name in names.values()}

        # corrupted pass: S rows per fact, noise on the subject's word embeddings
        row_fact = torch.arange(F, device=dev).repeat_interleave(S)
        cemb = emb[row_fact].contiguous()
        n_tok = max(f.subject_range[1] - f.subject_range[0] for f in batch.facts)
        noise = torch.zeros(F * S, n_tok, a.hidden_size, dtype=torch.float32)
        starts, lengths = [], []
        for i, f in enumerate(batch.facts):
            b, e = f.subject_range
            noise[i * S:(i + 1) * S, :e - b] = f.noise.to(torch.float32)
            starts += [batch.pad[i] + b] * S
            lengths += [e - b] * S
        noise = noise.to(dev)
        add_noise_(cemb, noise, torch.arange(F * S), starts, lengths, replace)
        ch0, cctx = a.prepare(cemb, batch.attention_mask[row_fact], batch.position_ids[row_fact],
                              full_mask=self.reuse_kv)
        if self.reuse_kv:
            base.kv = cctx.past = KVRecorder()  # the corrupted run's keys/values, for the suffix runs
        h, base.corrupt_states = self._run_blocks(ch0, cctx, record=self.mode == "prefix")
        base.corrupt_emb = cemb
        if replace:  # as the reference, the corrupted baseline adds the noise even then
            lemb = emb[row_fact].contiguous()
            add_noise_(lemb, noise, torch.arange(F * S), starts, lengths, False)
            lh0, lctx = a.prepare(lemb, batch.attention_mask[row_fact], batch.position_ids[row_fact])
            h_low = self._run_blocks(lh0, lctx, record=False)[0]
        else:
            h_low = h

        def mean_p(h_last):
            return _answer_probs(_last_logits(a, h_last), answers[row_fact]).view(F, S).mean(1)

        base.low = mean_p(h_low[:, -1])
        # a cell that restores nothing that differs (a token before the subject) scores this
        base.untouched = base.low if h_low is h else mean_p(h[:, -1])
        return base

    def _trace_batch(self, batch: _Batch, kinds, window: int, replace: bool) -> list[FactTrace]:
        N = self.adapter.num_layers
        base = self._baseline(batch, kinds, replace)
        if not kinds:
            return [FactTrace(int(base.answers[i]), float(base.high[i]), math.nan)
                    for i in range(len(batch.facts))]
        cells = plan_cells(batch, kinds, window, N)
        totals = torch.zeros(len(cells), dtype=torch.float64)
        if cells:
            runner = self._run_cells_prefix if self.mode == "prefix" else self._run_cells_grid
            self._run_split(runner, cells, totals, base)

        out = []
        for i, f in enumerate(batch.facts):
            tokens = f.token_rows()
            res = FactTrace(int(base.answers[i]), float(base.high[i]), float(base.low[i]), tokens=tokens)
            for k in kinds:
                res.scores[k.name] = torch.full((len(tokens), N), float(base.untouched[i]), dtype=torch.float32)
            out.append(res)
        for c, cell in enumerate(cells):
            out[cell.fact].scores[cell.kind.name][cell.row, cell.layer] = float(totals[c] / base.samples)
        return out

    # ---- cells in chunks ------------------------------------------------------------------
    def _run_split(self, runner, cells: list[Cell], totals, base: _Baseline):
        """Run cells in chunks of at most the token budget. Suffix runs need one restored position
        per chunk."""
        idx = list(range(len(cells)))
        width = base.batch.width
        if base.kv is not None:
            groups: dict = {}
            for c in idx:
                groups.setdefault(cells[c].token, []).append(c)
            for tp, group in sorted(groups.items()):
                self._run_chunks(runner, cells, group, totals, base, width - tp)
        else:
            self._run_chunks(runner, cells, idx, totals, base, width)

    def _run_chunks(self, runner, cells: list[Cell], idx: list, totals, base: _Baseline, width: int):
        """An out-of-memory halves the chunk and goes on instead of failing a long run."""
        per_chunk = max(1, self._token_budget() // (width * base.samples))
        # ascending start layer, so a chunk's active rows at any layer are a prefix of it
        idx = sorted(idx, key=lambda c: (cells[c].start, cells[c].fact))
        pos = 0
        while pos < len(idx):
            chunk = idx[pos:pos + per_chunk]
            try:
                sums = runner([cells[c] for c in chunk], base)
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                per_chunk = max(1, len(chunk) // 2)
                self._out_of_memory()
                continue
            totals[torch.tensor(chunk)] += sums.double().cpu()
            pos += len(chunk)

    # ---- prefix reuse: cells join the batch at their start layer ------------------------------
    def _run_cells_prefix(self, cells: list[Cell], base: _Baseline) -> torch.Tensor:
        a, N = self.adapter, self.adapter.num_layers
        rows = _Rows(cells, base.samples, a, self.device)
        ctx = base.ctx.select(rows.fact)
        tp, tok = 0, rows.tok
        if base.kv is not None:  # every row restores the same padded position: run from it on
            tp = cells[0].token
            ctx = ctx.suffix(tp)
            ctx.past = KVReplay(base.kv, rows.corrupt, tp)
            tok = torch.zeros_like(tok)
        # rows active from layer l on: start <= l (rows are sorted by start)
        n_active = [int((rows.start <= l).sum()) for l in range(N + 1)]
        h = None
        with _Restores(self.model, rows.module_names) as restores:
            for layer in range(N + 1):
                n_prev = 0 if h is None else h.shape[0]
                n = n_active[layer]
                if n > n_prev:  # rows joining here continue the corrupted run's state
                    new = base.corrupt_states[layer][rows.corrupt[n_prev:n], tp:].contiguous()
                    restore_rows_(new, _from(base.clean_states[layer], tp), rows.fact[n_prev:n],
                                  torch.where(rows.stream[n_prev:n], tok[n_prev:n], -1))
                    h = new if h is None else torch.cat([h, new])
                if layer == N or h is None:
                    continue
                rows.plan_module_restores(restores.plan, layer, n, tok, base.clean_modules, tp)
                h = a.run_block(layer, h, ctx.select(slice(0, n)))
                restores.plan.clear()
        return rows.cell_sums(a, h, base.answers)

    # ---- grid: every cell's rows run the whole model from the embeddings ---------------------
    def _run_cells_grid(self, cells: list[Cell], base: _Baseline) -> torch.Tensor:
        a, N = self.adapter, self.adapter.num_layers
        rows = _Rows(cells, base.samples, a, self.device)
        batch = base.batch
        h, ctx = a.prepare(base.corrupt_emb[rows.corrupt], batch.attention_mask[rows.fact],
                           batch.position_ids[rows.fact])
        n = rows.fact.shape[0]
        with _Restores(self.model, rows.module_names) as restores:
            for layer in range(N):
                rows.plan_module_restores(restores.plan, layer, n, rows.tok, base.clean_modules, 0)
                h = a.run_block(layer, h, ctx)
                restores.plan.clear()
                # block-output kinds restore the input of their start layer
                sel = rows.stream & (rows.start == layer + 1)
                if bool(sel.any()):
                    h = h.contiguous()
                    restore_rows_(h, base.clean_states[layer + 1], rows.fact, torch.where(sel, rows.tok, -1))
        return rows.cell_sums(a, h, base.answers)


def plan_cells(batch: _Batch, kinds: Sequence[TraceKind], window: int, num_layers: int) -> list[Cell]:
    """Every cell of every fact, each kind's restore rule applied. Tokens before the subject are
    left out: nothing differs there from the corrupted run, so their score is the corrupted one."""
    cells = []
    for fi, f in enumerate(batch.facts):
        for row, t in enumerate(f.token_rows()):
            if t < f.subject_range[0]:
                continue
            for kind in kinds:
                for layer in range(num_layers):
                    cells.append(Cell(fi, kind, row, layer, batch.pad[fi] + t,
                                      *kind.plan(layer, window, num_layers)))
    return cells


class _Rows:
    """The batch rows of a chunk of cells: S rows (noise samples) per cell, as index tensors."""

    def __init__(self, cells: list[Cell], S: int, adapter, device):
        def per_row(values, dtype=None):
            return torch.tensor(values, device=device, dtype=dtype).repeat_interleave(S)

        self.n_cells = len(cells)
        self.cell = torch.arange(self.n_cells, device=device).repeat_interleave(S)
        sample = torch.arange(S, device=device).repeat(self.n_cells)
        self.fact = per_row([c.fact for c in cells])
        self.corrupt = self.fact * S + sample  # the row of the corrupted pass it continues
        self.stream = per_row([c.kind.part is None for c in cells], torch.bool)  # block-output kinds
        self.tok = per_row([c.token for c in cells])
        self.start = torch.tensor([c.start for c in cells]).repeat_interleave(S)
        self.lo = per_row([c.lo for c in cells])
        self.hi = per_row([c.hi for c in cells])
        kinds = list({c.kind.name: c.kind for c in cells}.values())
        ids = {k.name: i for i, k in enumerate(kinds)}
        self.kind = per_row([ids[c.kind.name] for c in cells])
        # the hooked modules of this chunk's module kinds, per layer: (kind index, module name)
        names = _module_names(adapter, kinds)
        self.module_names = list(names.values())
        self.by_layer = [[(i, names[(k.name, layer)]) for i, k in enumerate(kinds) if k.part is not None]
                         for layer in range(adapter.num_layers)]

    def plan_module_restores(self, plan: dict, layer: int, n: int, tok, clean_modules: dict, tp: int):
        """One restore job per hooked module of `layer` for the first n rows: the rows of that
        kind whose restored layers cover `layer` restore their token, the others nothing."""
        covers = (self.lo[:n] <= layer) & (self.hi[:n] > layer)
        for kind, name in self.by_layer[layer]:
            sel = covers & (self.kind[:n] == kind)
            plan[name] = (_from(clean_modules[name], tp), self.fact[:n], torch.where(sel, tok[:n], -1))

    def cell_sums(self, adapter, h, answers) -> torch.Tensor:
        """Per cell, the sum over its rows of p(answer) at the last position."""
        p = _answer_probs(_last_logits(adapter, h[:, -1]), answers[self.fact])
        return torch.zeros(self.n_cells, device=h.device, dtype=torch.float64).index_add_(
            0, self.cell, p.double())
