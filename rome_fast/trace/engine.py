"""The fast causal-tracing engine: many (token, layer) cells of many facts per forward pass.

What the reference does per fact and kind: 2 + T·N forward passes of batch 1+S. What this does,
exactly (every saving is exact under causal attention, up to float rounding):

* one clean pass and one corrupted pass per group of facts, recording every block's output;
* a cell (token t, layer L) starts at the layer where it first differs from the corrupted run:
  L+1 for hidden states (its input is the corrupted state with position t restored), the window's
  first layer for MLP / attention windows; the batch grows layer by layer ("prefix reuse");
* cells of every kind and every fact in one batch; each hooked module applies all rows' restores
  in one launch of the compiled `restore_rows_` kernel;
* tokens before the subject are never run: nothing differs there from the corrupted run, so their
  score is the corrupted score;
* logits at the last position only.

`mode="grid"` runs every cell from the embeddings through the whole model with hooks instead (no
block-by-block run), the path for a model the adapters cannot run block by block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ..ops import add_noise_, restore_rows_
from ..models import first_tensor
from ..models.base import KVRecorder

KINDS = ("hidden", "mlp", "attn")


@dataclass
class FactInput:
    """One fact to trace: token ids, subject range [b, e), noise [S, e-b, D] for its corrupted rows,
    the tokens whose rows are wanted (None: all), and the answer token (None: the clean top-1)."""
    input_ids: Sequence[int]
    subject_range: tuple[int, int]
    noise: torch.Tensor
    tokens: Sequence[int] | None = None
    answer: int | None = None


@dataclass
class FactTrace:
    answer: int
    high_score: float
    low_score: float
    scores: dict = field(default_factory=dict)  # kind -> [len(tokens), N] float32 CPU tensor
    tokens: list = field(default_factory=list)


def window_bounds(layer: int, window: int, num_layers: int) -> tuple[int, int]:
    """The reference's restore window around `layer`: [L - w//2, L + w - w//2) clipped."""
    return max(0, layer - window // 2), min(num_layers, layer - (-window // 2))


# --------------------------------------------------------------------------------------------
# batching of facts


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


class _RestoreHooks:
    """Forward hooks on MLP / attention modules that overwrite the planned rows' outputs with clean
    states, one kernel launch per module per pass. The plan is set per layer before each block."""

    def __init__(self, adapter, kinds: Iterable[str]):
        self.plan: dict = {}
        self.handles = []
        self.kinds = list(kinds)
        for kind in self.kinds:
            for layer in range(adapter.num_layers):
                module = adapter.module(adapter.module_name(kind, layer))
                self.handles.append(module.register_forward_hook(self._hook((kind, layer))))

    def _hook(self, key):
        def hook(module, inputs, output):
            job = self.plan.get(key)
            if job is not None:
                clean, row_fact, row_tok = job
                restore_rows_(first_tensor(output), clean, row_fact, row_tok)
            return output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class _Recorder:
    """Forward hooks recording the outputs of MLP / attention modules in a full pass."""

    def __init__(self, adapter, kinds: Iterable[str]):
        self.out: dict = {}
        self.handles = []
        for kind in kinds:
            for layer in range(adapter.num_layers):
                module = adapter.module(adapter.module_name(kind, layer))
                self.handles.append(module.register_forward_hook(self._hook((kind, layer))))

    def _hook(self, key):
        def hook(module, inputs, output):
            self.out[key] = first_tensor(output).detach().clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class _KVReplay:
    """Stands in for a KV cache in a suffix run: prepends, for every row, the corrupted run's keys
    and values of the positions before the suffix (identical by causality)."""

    def __init__(self, recorded: KVRecorder, rows: torch.Tensor, start: int):
        self.recorded, self.rows, self.start = recorded, rows, start

    def update(self, key, value, layer_idx, *args, **kwargs):
        n = key.shape[0]
        past_k = self.recorded.keys[layer_idx][self.rows[:n], :, :self.start]
        past_v = self.recorded.values[layer_idx][self.rows[:n], :, :self.start]
        return torch.cat([past_k, key], dim=-2), torch.cat([past_v, value], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


def _from(states: torch.Tensor, start: int) -> torch.Tensor:
    return states if start == 0 else states[:, start:].contiguous()


def _answer_probs(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """p(answer) per row: exp(logit − logsumexp), which reads the vocabulary's logits once instead
    of writing a full softmax."""
    return (logits.gather(1, answers[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).exp()


def _last_logits(adapter, h_last: torch.Tensor) -> torch.Tensor:
    return adapter.head(h_last).float()


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

    # ---- public ---------------------------------------------------------------------------
    @torch.no_grad()
    def trace(self, facts: Sequence[FactInput], kinds: Sequence[str] = KINDS, window: int = 10,
              replace: bool = False) -> list[FactTrace]:
        kinds = tuple("hidden" if k in (None, "", "hidden") else k for k in kinds)
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown kind {k!r}: expected one of None/'hidden', 'mlp', 'attn'")
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
        batch = _pad_facts(list(facts), self.device)
        return self._trace_batch(batch, kinds, window, replace)

    # ---- passes ---------------------------------------------------------------------------
    def _run_blocks(self, h, ctx, record: bool):
        states = [h] if record else None
        for layer in range(self.adapter.num_layers):
            h = self.adapter.run_block(layer, h, ctx)
            if record:
                states.append(h)
        return h, states

    def _trace_batch(self, batch: _Batch, kinds, window: int, replace: bool) -> list[FactTrace]:
        a, dev = self.adapter, self.device
        F, T, N = len(batch.facts), batch.width, a.num_layers
        S = batch.facts[0].noise.shape[0]
        module_kinds = [k for k in kinds if k != "hidden"]

        # clean pass: answers, high scores, every state to restore from
        emb = a.embed(batch.input_ids)
        h0, ctx = a.prepare(emb, batch.attention_mask, batch.position_ids, full_mask=self.reuse_kv)
        rec = _Recorder(a, module_kinds)
        try:
            h, clean_states = self._run_blocks(h0, ctx, record=True)
        finally:
            rec.remove()
        clean_logits = _last_logits(a, h[:, -1])
        answers = torch.tensor([f.answer if f.answer is not None else int(clean_logits[i].argmax())
                                for i, f in enumerate(batch.facts)], device=dev)
        high = _answer_probs(clean_logits, answers)
        clean_module = rec.out
        if not kinds:  # a prediction check: the clean pass is all that is needed
            return [FactTrace(int(answers[i]), float(high[i]), math.nan) for i in range(F)]

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
        add_noise_(cemb, noise.to(dev), torch.arange(F * S), starts, lengths, replace)
        ch0, cctx = a.prepare(cemb, batch.attention_mask[row_fact], batch.position_ids[row_fact],
                              full_mask=self.reuse_kv)
        kv = None
        if self.reuse_kv:
            kv = cctx.past = KVRecorder()  # the corrupted run's keys/values, for the suffix runs
        if self.mode == "prefix":
            h, corrupt_states = self._run_blocks(ch0, cctx, record=True)
        else:
            h, corrupt_states = self._run_blocks(ch0, cctx, record=False)
        if replace:  # as the reference, the corrupted baseline adds the noise even then
            lemb = emb[row_fact].contiguous()
            add_noise_(lemb, noise.to(dev), torch.arange(F * S), starts, lengths, False)
            lh0, lctx = a.prepare(lemb, batch.attention_mask[row_fact], batch.position_ids[row_fact])
            h_low = self._run_blocks(lh0, lctx, record=False)[0]
        else:
            h_low = h

        def mean_p(h_last):
            return _answer_probs(_last_logits(a, h_last), answers[row_fact]).view(F, S).mean(1)

        low = mean_p(h_low[:, -1])
        # a cell that restores nothing that differs (a token before the subject) scores this
        untouched = low if h_low is h else mean_p(h[:, -1])

        # the cells
        cells = self._plan_cells(batch, kinds, window, N)
        totals = torch.zeros(len(cells), dtype=torch.float64)
        if cells:
            runner = self._run_cells_prefix if self.mode == "prefix" else self._run_cells_grid
            ctx_state = dict(ctx=ctx, cemb=cemb, clean_states=clean_states, clean_module=clean_module,
                             corrupt_states=corrupt_states, answers=answers, S=S, batch=batch, kv=kv)
            self._run_split(runner, cells, list(range(len(cells))), totals, ctx_state, T)

        # assemble per-fact results
        out = []
        for i, f in enumerate(batch.facts):
            tokens = list(f.tokens) if f.tokens is not None else list(range(len(f.input_ids)))
            res = FactTrace(int(answers[i]), float(high[i]), float(low[i]), tokens=tokens)
            for k in kinds:
                res.scores[k] = torch.full((len(tokens), N), float(untouched[i]), dtype=torch.float32)
            out.append(res)
        for c, cell in enumerate(cells):
            fi, kind, row, layer = cell[0], cell[1], cell[2], cell[3]
            out[fi].scores[kind][row, layer] = float(totals[c] / S)
        return out

    def _plan_cells(self, batch: _Batch, kinds, window: int, N: int) -> list:
        """Cells as tuples (fact, kind, output row, layer, padded token, start layer, lo, hi).
        Tokens before the subject are left out: their score is the corrupted score."""
        cells = []
        for fi, f in enumerate(batch.facts):
            b = f.subject_range[0]
            tokens = list(f.tokens) if f.tokens is not None else list(range(len(f.input_ids)))
            for row, t in enumerate(tokens):
                if not 0 <= t < len(f.input_ids):
                    raise ValueError(f"token {t} outside a {len(f.input_ids)}-token prompt")
                if t < b:
                    continue
                tp = batch.pad[fi] + t
                for kind in kinds:
                    for layer in range(N):
                        if kind == "hidden":
                            cells.append((fi, kind, row, layer, tp, layer + 1, layer, layer + 1))
                        else:
                            lo, hi = window_bounds(layer, window, N)
                            cells.append((fi, kind, row, layer, tp, lo, lo, hi))
        return cells

    def _run_split(self, runner, cells, idx: list, totals, st, width: int):
        """Run cells in chunks of at most the token budget; an out-of-memory halves the chunk and
        goes on instead of failing a long run. Suffix runs need one restored position per chunk."""
        if st["kv"] is not None:
            groups: dict = {}
            for c in idx:
                groups.setdefault(cells[c][4], []).append(c)
            for tp, group in sorted(groups.items()):
                self._run_chunks(runner, cells, group, totals, st, width - tp)
        else:
            self._run_chunks(runner, cells, idx, totals, st, width)

    def _run_chunks(self, runner, cells, idx: list, totals, st, width: int):
        S = st["S"]
        per_chunk = max(1, self._token_budget() // (width * S))
        # ascending start layer, so a chunk's active rows at any layer are a prefix of it
        idx = sorted(idx, key=lambda c: (cells[c][5], cells[c][0]))
        pos = 0
        while pos < len(idx):
            chunk = idx[pos:pos + per_chunk]
            try:
                sums = runner([cells[c] for c in chunk], st)
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                per_chunk = max(1, len(chunk) // 2)
                self.splits += 1
                continue
            totals[torch.tensor(chunk)] += sums.double().cpu()
            pos += len(chunk)

    # ---- prefix reuse: cells join the batch at their start layer ------------------------------
    def _run_cells_prefix(self, cells: list, st) -> torch.Tensor:
        a, N = self.adapter, self.adapter.num_layers
        rows = _Rows(cells, st["S"], self.device)
        ctx = st["ctx"].select(rows.fact)
        tp, tok = 0, rows.tok
        if st["kv"] is not None:  # every row restores the same padded position: run from it on
            tp = cells[0][4]
            ctx = ctx.suffix(tp)
            ctx.past = _KVReplay(st["kv"], rows.corrupt, tp)
            tok = torch.zeros_like(tok)
        # rows active from layer l on: start <= l (rows are sorted by start)
        n_active = [int((rows.start <= l).sum()) for l in range(N + 1)]
        hooks = _RestoreHooks(a, rows.module_kinds)
        try:
            h = None
            for layer in range(N + 1):
                n_prev = 0 if h is None else h.shape[0]
                n = n_active[layer]
                if n > n_prev:  # rows joining here continue the corrupted run's state
                    new = st["corrupt_states"][layer][rows.corrupt[n_prev:n], tp:].contiguous()
                    restore_rows_(new, _from(st["clean_states"][layer], tp), rows.fact[n_prev:n],
                                  torch.where(rows.kind[n_prev:n] == 0, tok[n_prev:n], -1))
                    h = new if h is None else torch.cat([h, new])
                if layer == N or h is None:
                    continue
                rows.plan_module_restores(hooks, layer, n, tok, st["clean_module"], tp)
                h = a.run_block(layer, h, ctx.select(slice(0, n)))
                hooks.plan.clear()
        finally:
            hooks.remove()
        return rows.cell_sums(a, h, st["answers"])

    # ---- grid: every cell's rows run the whole model from the embeddings ---------------------
    def _run_cells_grid(self, cells: list, st) -> torch.Tensor:
        a, N = self.adapter, self.adapter.num_layers
        rows = _Rows(cells, st["S"], self.device)
        batch = st["batch"]
        h, ctx = a.prepare(st["cemb"][rows.corrupt], batch.attention_mask[rows.fact],
                           batch.position_ids[rows.fact])
        n = rows.fact.shape[0]
        hooks = _RestoreHooks(a, rows.module_kinds)
        try:
            for layer in range(N):
                rows.plan_module_restores(hooks, layer, n, rows.tok, st["clean_module"], 0)
                h = a.run_block(layer, h, ctx)
                hooks.plan.clear()
                sel = (rows.kind == 0) & (rows.lo == layer)  # hidden cells restore block outputs
                if bool(sel.any()):
                    h = h.contiguous()
                    restore_rows_(h, st["clean_states"][layer + 1], rows.fact, torch.where(sel, rows.tok, -1))
        finally:
            hooks.remove()
        return rows.cell_sums(a, h, st["answers"])


class _Rows:
    """The batch rows of a chunk of cells: S rows (noise samples) per cell, as index tensors."""

    def __init__(self, cells: list, S: int, device):
        def per_row(values):
            return torch.tensor(values, device=device).repeat_interleave(S)

        self.n_cells = len(cells)
        self.cell = torch.arange(self.n_cells, device=device).repeat_interleave(S)
        sample = torch.arange(S, device=device).repeat(self.n_cells)
        self.fact = per_row([c[0] for c in cells])
        self.corrupt = self.fact * S + sample  # the row of the corrupted pass it continues
        self.kind = per_row([KINDS.index(c[1]) for c in cells])  # 0 = hidden
        self.tok = per_row([c[4] for c in cells])
        self.start = torch.tensor([c[5] for c in cells]).repeat_interleave(S)
        self.lo = per_row([c[6] for c in cells])
        self.hi = per_row([c[7] for c in cells])
        self.module_kinds = sorted({c[1] for c in cells if c[1] != "hidden"})

    def plan_module_restores(self, hooks, layer: int, n: int, tok, clean_module: dict, tp: int):
        """One restore job per hooked module of `layer` for the first n rows: the rows of that
        kind whose window covers the layer restore their token, the others nothing."""
        for kind in hooks.kinds:
            sel = (self.kind[:n] == KINDS.index(kind)) & (self.lo[:n] <= layer) & (self.hi[:n] > layer)
            hooks.plan[(kind, layer)] = (_from(clean_module[(kind, layer)], tp), self.fact[:n],
                                         torch.where(sel, tok[:n], -1))

    def cell_sums(self, adapter, h, answers) -> torch.Tensor:
        """Per cell, the sum over its rows of p(answer) at the last position."""
        p = _answer_probs(_last_logits(adapter, h[:, -1]), answers[self.fact])
        return torch.zeros(self.n_cells, device=h.device, dtype=torch.float64).index_add_(
            0, self.cell, p.double())


# --------------------------------------------------------------------------------------------
# the drop-in API on the engine


def _noise_std_and_tokens(mt, prompt: str, subject: str, token_range):
    from ..tokens import find_token_range
    ids = mt.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("empty prompt: give the text whose next token is traced")
    b, e = find_token_range(mt.tokenizer, ids, subject)
    if token_range == "subject_last":
        tokens = [e - 1]
    elif token_range is None:
        tokens = None
    else:
        tokens = [int(t) for t in token_range]
        if any(not 0 <= t < len(ids) for t in tokens):
            raise ValueError(f"token_range {tokens} is outside the prompt's {len(ids)} tokens")
    return ids, (b, e), tokens


def result_dict(mt, fact: FactInput, res: FactTrace, kind: str, window: int) -> dict:
    """The reference's result dict of one fact and kind (`calculate_hidden_flow`'s return)."""
    from ..tokens import decode_tokens
    return dict(scores=res.scores[kind], low_score=res.low_score, high_score=res.high_score,
                input_ids=torch.tensor(list(fact.input_ids)),
                input_tokens=decode_tokens(mt.tokenizer, list(fact.input_ids)),
                subject_range=tuple(fact.subject_range), answer=mt.tokenizer.decode([res.answer]),
                window=window, correct_prediction=True, kind="" if kind == "hidden" else kind)


def mispredicted_dict(mt, fact: FactInput, res: FactTrace, kind: str, window: int) -> dict:
    """What the reference returns for a fact whose top-1 token is not the expected one."""
    from ..tokens import decode_tokens
    return dict(correct_prediction=False, answer=mt.tokenizer.decode([res.answer]),
                high_score=res.high_score, input_ids=torch.tensor(list(fact.input_ids)),
                input_tokens=decode_tokens(mt.tokenizer, list(fact.input_ids)), window=window,
                kind="" if kind == "hidden" else kind)


def make_fact_input(mt, prompt: str, subject: str, samples: int, noise, uniform_noise: bool = False,
                    token_range=None) -> FactInput:
    """Tokens, subject range and the reference's noise draw for one fact."""
    from .noise import draw_noise
    ids, (b, e), tokens = _noise_std_and_tokens(mt, prompt, subject, token_range)
    return FactInput(ids, (b, e), draw_noise(samples, e - b, mt.adapter.hidden_size, noise, uniform_noise),
                     tokens=tokens)


def calculate_hidden_flow_fast(mt, prompt: str, subject: str, samples: int = 10, noise=0.1,
                               token_range=None, uniform_noise: bool = False, replace: bool = False,
                               window: int = 10, kind=None, expect=None, engine: TraceEngine | None = None
                               ) -> dict:
    """`calculate_hidden_flow` on the fast engine: the same arguments and the same dict."""
    kind_name = "hidden" if kind in (None, "", "hidden") else kind
    engine = engine or TraceEngine(mt)
    fact = make_fact_input(mt, prompt, subject, samples, noise, uniform_noise, token_range)
    if expect is not None:  # the reference checks the prediction before tracing anything
        res = engine.trace([fact], kinds=(), window=window)[0]
        if mt.tokenizer.decode([res.answer]).strip() != expect:
            return mispredicted_dict(mt, fact, res, kind_name, window)
    res = engine.trace([fact], kinds=(kind_name,), window=window, replace=replace)[0]
    return result_dict(mt, fact, res, kind_name, window)
