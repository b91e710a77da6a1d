"""The fast causal-tracing engine: many (token, layer) cells of many facts per forward pass.

The reference runs 2 + T·N forward passes of batch 1+S per fact and kind. This engine runs one
clean and one corrupted pass per group of facts, recording every block's input, then every cell
from the first layer where it differs from the corrupted run, cells of every kind and fact in one
batch; docs/tracing.md explains each saving and why it is exact.

`mode="grid"` runs every cell from the embeddings through the whole model with hooks instead (no
block-by-block reuse), the path for a model the adapters cannot run block by block.

Two options beyond the reference's trace: an answer of several tokens scored whole (teacher-forced,
the product of its tokens' probabilities; `FactInput.answer` a sequence), and severed paths
(`sever="mlp"` / `"attn"`: the paper's Fig. 3, hidden-state restores while that module stays
corrupted at the restored token in every layer)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from ..hooks import TraceDict, first_tensor
from ..models.base import BlockContext, KVRecorder, KVReplay
from ..ops import add_noise_, restore_rows_
from .kinds import KINDS, TraceKind, get_kind, kind_names


@dataclass
class FactInput:
    """One fact to trace: the prompt's token ids, subject range [b, e), noise [S, e-b, D] for its
    corrupted rows, the tokens whose rows are wanted (None: all), and the answer: None (the clean
    top-1 token, as the reference), a token id, or a sequence of token ids scored whole (the
    product of their probabilities, each after the prompt and the answer tokens before it).
    sever_noise: the second noise draw of a severed-path trace (`TraceEngine.trace(sever=...)`)."""
    input_ids: Sequence[int]
    subject_range: tuple[int, int]
    noise: torch.Tensor
    tokens: Sequence[int] | None = None
    answer: int | Sequence[int] | None = None
    sever_noise: torch.Tensor | None = None

    def token_rows(self) -> list[int]:
        return list(self.tokens) if self.tokens is not None else list(range(len(self.input_ids)))

    def answer_ids(self) -> list[int] | None:
        if self.answer is None:
            return None
        if isinstance(self.answer, int) or (torch.is_tensor(self.answer) and self.answer.dim() == 0):
            return [int(self.answer)]
        return [int(t) for t in self.answer]

    def run_ids(self) -> list[int]:
        """What the model runs on: the prompt, then the answer's tokens but the last (teacher
        forcing; nothing is appended for a one-token answer)."""
        ids = self.answer_ids()
        return list(self.input_ids) + (ids[:-1] if ids else [])


@dataclass
class FactTrace:
    answer: int                 # the answer's first token
    high_score: float
    low_score: float
    scores: dict = field(default_factory=dict)  # kind name -> [len(tokens), N] float32 CPU tensor
    tokens: list = field(default_factory=list)
    answer_ids: list = field(default_factory=list)  # every scored answer token
    greedy: bool = True         # each answer token is the clean run's top-1 after the ones before


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
    runs = [f.run_ids() for f in facts]
    width = max(len(r) for r in runs)
    ids = torch.zeros(len(facts), width, dtype=torch.long)
    mask = torch.zeros(len(facts), width, dtype=torch.long)
    pad = []
    for i, run in enumerate(runs):
        p = width - len(run)
        ids[i, p:] = torch.as_tensor(run)
        mask[i, p:] = 1
        pad.append(p)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return _Batch(facts, ids.to(device), mask.to(device), pos.to(device), pad)


@dataclass
class _Baseline:
    """The clean and corrupted passes of a batch: what every cell restores from and starts from."""
    batch: _Batch
    samples: int                  # S corrupted rows per fact
    answers: torch.Tensor         # [F, n] answer tokens per fact, right-aligned, -1 before a shorter one
    high: torch.Tensor            # [F] clean p(answer)
    greedy: torch.Tensor | None = None    # [F] the answer is the clean run's greedy continuation
    ctx: BlockContext | None = None       # the clean batch's block context (one row per fact)
    clean_states: list | None = None      # block inputs 0..N of the clean run, [F, T, D] each
    clean_modules: dict | None = None     # hooked module name -> its clean output [F, T, D]
    corrupt_emb: torch.Tensor | None = None     # [F·S, T, D] corrupted word embeddings
    corrupt_states: list | None = None    # block inputs 0..N of the corrupted run (prefix mode)
    kv: KVRecorder | None = None          # the corrupted run's keys/values (suffix runs)
    low: torch.Tensor | None = None       # [F] corrupted p(answer)
    untouched: torch.Tensor | None = None  # [F] score of a cell that restores nothing that differs
    # severed paths: the sever modules' outputs in the first corrupted run (name -> [F·S, T, D]),
    # and block 0's input of the second (the run the severed cells continue)
    sever_names: list | None = None
    sever_source: dict | None = None
    corrupt_input: torch.Tensor | None = None


def _from(states: torch.Tensor, start: int) -> torch.Tensor:
    return states if start == 0 else states[:, start:].contiguous()


def _answer_probs(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """p(answer) per row: exp(logit − logsumexp), which reads the vocabulary's logits once instead
    of writing a full softmax."""
    return (logits.gather(1, answers[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).exp()


def _last_logits(adapter, h_last: torch.Tensor) -> torch.Tensor:
    return adapter.head(h_last).float()


def _answer_scores(adapter, h: torch.Tensor, answers: torch.Tensor, greedy: bool = False):
    """Per row of h [R, W, D], the probability of its answer [R, n] (right-aligned, -1 before a
    shorter answer): token j of the last n is read at position W − n + j, the product over the
    answer's tokens. With `greedy`, also whether each token is the top-1 there."""
    n = answers.shape[1]
    if n == 1:  # the reference's score: the last position only
        logits = _last_logits(adapter, h[:, -1])
        p = _answer_probs(logits, answers[:, 0])
        return (p, logits.argmax(-1) == answers[:, 0]) if greedy else p
    logp = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    top = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    for j in range(n):
        col = answers[:, j]
        valid = col >= 0
        if h.shape[1] - n + j < 0 or not bool(valid.any()):
            continue  # no row's answer reaches this far back
        logits = _last_logits(adapter, h[:, h.shape[1] - n + j])
        tok = col.clamp(min=0)
        term = logits.gather(1, tok[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        logp += torch.where(valid, term, torch.zeros_like(term))
        top &= ~valid | (logits.argmax(-1) == tok)
    return (logp.exp(), top) if greedy else logp.exp()


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
              replace: bool = False, sever: str | None = None) -> list[FactTrace]:
        """Scores of every (token, layer) cell of each kind for each fact. kinds=() only checks
        the predictions (the clean pass). sever: a module kind ("mlp", "attn") whose outputs at
        the restored token stay, in every layer, at their values in a corrupted run while hidden
        states are restored (the severed-path trace; only kind "hidden", no `replace`; each fact
        needs `sever_noise`)."""
        kinds = tuple(get_kind(k) for k in kind_names(kinds))
        if window < 1:
            raise ValueError("window must be at least 1")
        if sever is not None:
            sever = get_kind(sever)
            if sever.part is None:
                raise ValueError(f"sever must name a module kind ({', '.join(k for k in KINDS if KINDS[k].part)}), "
                                 f"not {sever.name!r}")
            if any(k.part is not None for k in kinds):
                raise ValueError("a severed-path trace restores hidden states: use kinds=('hidden',)")
            if replace:
                raise ValueError("a severed-path trace adds the noise (the reference's has no replace option)")
            if kinds and any(f.sever_noise is None or f.sever_noise.shape != f.noise.shape for f in facts):
                raise ValueError("a severed-path trace needs each fact's second noise draw (sever_noise), "
                                 "shaped as its noise")
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
            ids = f.answer_ids()
            vocab = self.adapter.embedding.weight.shape[0]
            if ids is not None and (not ids or any(not 0 <= t < vocab for t in ids)):
                raise ValueError(f"answer token ids {ids} are empty or outside the vocabulary")
        return self._trace_facts(list(facts), kinds, window, replace, sever)

    def _trace_facts(self, facts: list, kinds, window: int, replace: bool, sever=None) -> list[FactTrace]:
        """The facts in one batch; an out-of-memory that a smaller chunk of cells cannot avoid (in
        the clean or corrupted pass, or a single cell's rows) halves the facts instead of failing."""
        try:
            return self._trace_batch(_pad_facts(facts, self.device), kinds, window, replace, sever)
        except torch.OutOfMemoryError:
            if len(facts) == 1:
                raise
        self._out_of_memory()  # outside the handler: the failed batch's tensors are freed by now
        half = len(facts) // 2
        return (self._trace_facts(facts[:half], kinds, window, replace, sever)
                + self._trace_facts(facts[half:], kinds, window, replace, sever))

    # ---- the clean and corrupted passes ------------------------------------------------------
    def _run_blocks(self, h, ctx, record: bool):
        states = [h] if record else None
        for layer in range(self.adapter.num_layers):
            h = self.adapter.run_block(layer, h, ctx)
            if record:
                states.append(h)
        return h, states

    def _baseline(self, batch: _Batch, kinds, replace: bool, sever: TraceKind | None = None) -> _Baseline:
        a, dev = self.adapter, self.device
        F, S = len(batch.facts), batch.facts[0].noise.shape[0]

        # clean pass: answers, high scores, every state to restore from
        emb = a.embed(batch.input_ids)
        h0, ctx = a.prepare(emb, batch.attention_mask, batch.position_ids, full_mask=self.reuse_kv)
        names = _module_names(a, kinds)
        with TraceDict(self.model, names.values(), retain_output=True, clone=True, detach=True) as rec:
            h, clean_states = self._run_blocks(h0, ctx, record=True)
        answers = self._answers(batch, h)
        high, greedy = _answer_scores(a, h, answers, greedy=True)
        base = _Baseline(batch, S, answers, high, greedy)
        if not kinds:  # a prediction check: the clean pass is all that is needed
            return base
        base.ctx, base.clean_states = ctx, clean_states
        base.clean_modules = {name: first_tensor(rec[name].output) for name in names.values()}
        row_fact = torch.arange(F, device=dev).repeat_interleave(S)

        def mean_p(h_run):
            return _answer_scores(a, h_run, answers[row_fact]).view(F, S).mean(1)

        if sever is not None:
            # the first draw's corrupted run gives the corrupted score and the sever modules'
            # outputs the severed cells keep; the second draw's run is what those cells continue
            # (the reference runs its second pass on its generator's next draw)
            base.sever_names = [sever.module_name(a, layer) for layer in range(a.num_layers)]
            _, h_a, _, src = self._corrupted_run(batch, emb, "noise", False, record_kv=False,
                                                 record_states=False, modules=base.sever_names)
            base.low, base.sever_source = mean_p(h_a), src
            base.corrupt_emb, h_b, states, _ = self._corrupted_run(batch, emb, "sever_noise", False,
                                                                   record_kv=self.reuse_kv, record_states=False,
                                                                   base=base)
            base.corrupt_input = states[0]
            base.untouched = mean_p(h_b)  # a restore and a freeze before the subject change nothing
            return base

        # corrupted pass: S rows per fact, noise on the subject's word embeddings
        base.corrupt_emb, h, states, _ = self._corrupted_run(
            batch, emb, "noise", replace, record_kv=self.reuse_kv, record_states=self.mode == "prefix", base=base)
        base.corrupt_states = states if self.mode == "prefix" else None
        if replace:  # as the reference, the corrupted baseline adds the noise even then
            h_low = self._corrupted_run(batch, emb, "noise", False, record_kv=False, record_states=False)[1]
        else:
            h_low = h
        base.low = mean_p(h_low)
        # a cell that restores nothing that differs (a token before the subject) scores this
        base.untouched = base.low if h_low is h else mean_p(h)
        return base

    def _answers(self, batch: _Batch, h_clean: torch.Tensor) -> torch.Tensor:
        """[F, n] answer tokens, right-aligned (-1 before shorter answers): each fact's given
        answer, else the clean run's top-1 at the last position."""
        given = [f.answer_ids() for f in batch.facts]
        top = None
        if any(g is None for g in given):
            top = _last_logits(self.adapter, h_clean[:, -1]).argmax(-1).tolist()
        rows = [g if g is not None else [top[i]] for i, g in enumerate(given)]
        n = max(len(r) for r in rows)
        out = torch.full((len(rows), n), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, n - len(r):] = torch.tensor(r)
        return out.to(self.device)

    def _corrupted_run(self, batch: _Batch, emb, noise_field: str, replace: bool, record_kv: bool,
                       record_states: bool, modules=(), base: _Baseline | None = None):
        """S corrupted rows per fact, the noise (each fact's `noise_field`) added onto or written
        over the subject's word embeddings. Returns (corrupted embeddings, last hidden states, the
        block inputs, only block 0's unless record_states, {module: output} of `modules`). With
        record_kv the keys and values go to base.kv, for the suffix runs."""
        a, dev = self.adapter, self.device
        F, S = len(batch.facts), batch.facts[0].noise.shape[0]
        row_fact = torch.arange(F, device=dev).repeat_interleave(S)
        cemb = emb[row_fact].contiguous()
        n_tok = max(f.subject_range[1] - f.subject_range[0] for f in batch.facts)
        noise = torch.zeros(F * S, n_tok, a.hidden_size, dtype=torch.float32)
        starts, lengths = [], []
        for i, f in enumerate(batch.facts):
            b, e = f.subject_range
            noise[i * S:(i + 1) * S, :e - b] = getattr(f, noise_field).to(torch.float32)
            starts += [batch.pad[i] + b] * S
            lengths += [e - b] * S
        add_noise_(cemb, noise.to(dev), torch.arange(F * S), starts, lengths, replace)
        ch0, cctx = a.prepare(cemb, batch.attention_mask[row_fact], batch.position_ids[row_fact],
                              full_mask=self.reuse_kv)
        if record_kv:
            base.kv = cctx.past = KVRecorder()  # the corrupted run's keys/values, for the suffix runs
        with TraceDict(self.model, list(modules), retain_output=True, clone=True, detach=True) as rec:
            h, states = self._run_blocks(ch0, cctx, record=record_states)
        return cemb, h, states or [ch0], {m: first_tensor(rec[m].output) for m in modules}

    def _trace_batch(self, batch: _Batch, kinds, window: int, replace: bool, sever=None) -> list[FactTrace]:
        N = self.adapter.num_layers
        base = self._baseline(batch, kinds, replace, sever)

        def fact_trace(i, low):
            ids = base.answers[i][base.answers[i] >= 0].tolist()
            return FactTrace(ids[0], float(base.high[i]), low, answer_ids=ids, greedy=bool(base.greedy[i]))

        if not kinds:
            return [fact_trace(i, math.nan) for i in range(len(batch.facts))]
        cells = plan_cells(batch, kinds, window, N)
        totals = torch.zeros(len(cells), dtype=torch.float64)
        if cells:
            if sever is not None:
                runner = self._run_cells_severed
            else:
                runner = self._run_cells_prefix if self.mode == "prefix" else self._run_cells_grid
            self._run_split(runner, cells, totals, base)

        out = []
        for i, f in enumerate(batch.facts):
            tokens = f.token_rows()
            res = fact_trace(i, float(base.low[i]))
            res.tokens = tokens
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

    # ---- severed paths: hidden-state restores with a module kept corrupted ---------------------
    def _run_cells_severed(self, cells: list[Cell], base: _Baseline) -> torch.Tensor:
        """Each cell's rows run every block from the second draw's corrupted input (from its
        restored token on, with the earlier positions' keys and values replayed, when the run was
        recorded): in every layer the sever module's output at the restored token is the first
        draw's corrupted one, and after block L (the cell's layer) the token's hidden state is the
        clean one. Nothing before the restored token differs from the second draw's run."""
        a, N = self.adapter, self.adapter.num_layers
        rows = _Rows(cells, base.samples, a, self.device)
        ctx, tp, tok = base.ctx.select(rows.fact), 0, rows.tok
        if base.kv is not None:  # every row restores the same padded position: run from it on
            tp = cells[0].token
            ctx = ctx.suffix(tp)
            ctx.past = KVReplay(base.kv, rows.corrupt, tp)
            tok = torch.zeros_like(tok)
        h = base.corrupt_input[rows.corrupt, tp:].contiguous()
        with _Restores(self.model, base.sever_names) as restores:
            for layer in range(N):
                name = base.sever_names[layer]
                restores.plan[name] = (_from(base.sever_source[name], tp), rows.corrupt, tok)
                h = a.run_block(layer, h, ctx)
                restores.plan.clear()
                sel = rows.start == layer + 1  # the cells restoring block `layer`'s output
                if bool(sel.any()):
                    h = h.contiguous()
                    restore_rows_(h, _from(base.clean_states[layer + 1], tp), rows.fact,
                                  torch.where(sel.to(tok.device), tok, -1))
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
        """Per cell, the sum over its rows of p(answer) (at the last position, or over the last
        positions for an answer of several tokens)."""
        p = _answer_scores(adapter, h, answers[self.fact])
        return torch.zeros(self.n_cells, device=h.device, dtype=torch.float64).index_add_(
            0, self.cell, p.double())
