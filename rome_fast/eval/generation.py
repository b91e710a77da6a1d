"""Generation metrics of the evaluation: seeded top-k sampling, n-gram entropy (GE, fluency),
TF-IDF cosine against reference snippets (RS, consistency) and the essence perplexity.

Written without nltk / sklearn / scipy: a regex word tokenizer approximating nltk's
`word_tokenize`, and TF-IDF computed by hand from the reference's fitted `idf.npy` and
`tfidf_vocab.json`.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..models.base import cache_argument, returned_cache

# ---------------------------------------------------------------------------------------------
# Sampling


def generate(model, tok, prompts: Sequence[str], max_out_len: int = 100, top_k: int = 5,
             seed: int | None = 0, n_gen_per_prompt: int = 1) -> list[str]:
    """Top-k sampling as the reference's `generate_fast`: sequences grow to `max_out_len` tokens
    in total (prompt included), EOS does not stop them, the sampled token is drawn from the
    renormalised top-k softmax, and the text returned is prompt + continuation, decoded without
    special tokens, NFKD-normalised, with blank lines joined.

    Unlike the reference's sampler, the attention mask passed with the KV cache is
    the full mask of all positions so far, so cached logits equal those of a full forward pass;
    prompts are left-padded with explicit position ids. Sampling uses its own CPU generator
    seeded with `seed`, so results do not depend on the global RNG; `seed=None` draws from
    torch's global RNG instead, as the reference does (`torch.manual_seed` then decides)."""
    return generate_many(model, tok, [prompts], [seed], max_out_len, top_k, n_gen_per_prompt)[0]


@torch.no_grad()
def generate_many(model, tok, prompt_sets: Sequence[Sequence[str]], seeds: Sequence[int | None],
                  max_out_len: int = 100, top_k: int = 5, n_gen_per_prompt: int = 1) -> list[list[str]]:
    """`generate` of several prompt sets in one batch (a record's two or three prompts leave a
    CPU's cores idle; many records' fill them). Each set samples with its own generator, seeded
    with its seed, drawing for its own rows at every step, as it does alone: a set's texts are
    `generate(prompts, seed=s)`'s, up to rounding in the logits, which can move a sample only
    where a uniform draw falls on a boundary of the top-k distribution."""
    if len(seeds) != len(prompt_sets):
        raise ValueError(f"{len(prompt_sets)} prompt sets but {len(seeds)} seeds")
    sets = [[p for p in ps for _ in range(n_gen_per_prompt)] for ps in prompt_sets]
    spans, n = [], 0
    for s in sets:
        spans.append((n, n + len(s)))
        n += len(s)
    prompts = [p for s in sets for p in s]
    if not prompts:
        return [[] for _ in sets]
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    enc = [list(tok(p)["input_ids"]) for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    gens = [None if s is None else torch.Generator().manual_seed(int(s)) for s in seeds]
    past, step_ids = None, ids
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_pos = positions
    # Every row's real length is len(prompt) + number of steps; rows stop at max_out_len each.
    target_len = [max(max_out_len, len(e)) for e in enc]
    n_steps = max(t - len(e) for t, e in zip(target_len, enc))
    new_tokens = [[] for _ in enc]
    for _ in range(n_steps):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                    use_cache=True, **{cache_argument(model): past})
        past = returned_cache(out)
        probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
        top_p, top_i = probs.topk(top_k, dim=-1)
        top_p = (top_p / top_p.sum(-1, keepdim=True)).cpu()
        choice = torch.cat([torch.multinomial(top_p[a:b], 1, generator=g)
                            for (a, b), g in zip(spans, gens) if b > a])
        nxt = top_i.cpu().gather(1, choice)  # (B, 1)
        for i in range(len(enc)):
            if len(enc[i]) + len(new_tokens[i]) < target_len[i]:
                new_tokens[i].append(int(nxt[i, 0]))
        step_ids = nxt.to(dev)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    texts = [unicodedata.normalize("NFKD", tok.decode(e + t, skip_special_tokens=True))
             .replace("\n\n", " ").replace("<|endoftext|>", "") for e, t in zip(enc, new_tokens)]
    return [texts[a:b] for a, b in spans]


# ---------------------------------------------------------------------------------------------
# Word tokenizer (approximating nltk.word_tokenize: punkt sentence split + Treebank words)

_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd", "co",
           "corp", "no", "vol", "fig", "gen", "gov", "sen", "rep", "rev", "mt", "ft", "jan", "feb",
           "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "e.g", "i.e",
           "u.s", "u.k", "a.m", "p.m"}

# Treebank rules, applied in order (nltk TreebankWordTokenizer / NLTKWordTokenizer).
_STARTING_QUOTES = [(re.compile(r"([«“‘„]|`+)"), r" \1 "), (re.compile(r'^"'), "``"),
                    (re.compile(r"(``)"), r" \1 "), (re.compile(r'([ (\[{<])("|\'{2})'), r"\1 `` "),
                    (re.compile(r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b"), r"\1 \2")]
_PUNCTUATION = [
    (re.compile(r"([^\.])(\.)([\]\)}>\"']*)\s*$"), r"\1 \2 \3 "),  # sentence-final period
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),                      # , and : not inside numbers
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),                            # ellipsis
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
    (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
]
_ENDING_QUOTES = [(re.compile(r"([»”’])"), r" \1 "), (re.compile(r"''"), " '' "), (re.compile(r'"'), " '' "),
                  (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
                  (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 ")]
_CONTRACTIONS = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(can)(?#X)(not)\b", r"\b(d)(?#X)('ye)\b", r"\b(gim)(?#X)(me)\b", r"\b(gon)(?#X)(na)\b",
    r"\b(got)(?#X)(ta)\b", r"\b(lem)(?#X)(me)\b", r"\b(more)(?#X)('n)\b", r"\b(wan)(?#X)(na)(?=\s)",
    r" ('t)(?#X)(is)\b", r" ('t)(?#X)(was)\b")]
_SENT_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+(?=\S)")


def _sentences(text: str) -> list[str]:
    """Split after . ! ? (and closing quotes/brackets) followed by white space, unless the period
    ends a known abbreviation or a single letter (initials): a small stand-in for the punkt
    model, which likewise breaks at every period that does not end an abbreviation, whatever
    the case of the next word."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        before = text[start:m.start()]
        last_word = before.rsplit(None, 1)[-1] if before.split() else ""
        core = last_word.rstrip(".!?\"')]").lower()
        if last_word.endswith(".") and (core in _ABBREV or re.fullmatch(r"[a-z]", core)
                                         or re.fullmatch(r"(?:[a-z]\.)+[a-z]", core)):
            continue
        out.append(text[start:m.start()] + m.group(1))
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s.strip()]


def _treebank(text: str) -> list[str]:
    for rx, sub in _STARTING_QUOTES:
        text = rx.sub(sub, text)
    for rx, sub in _PUNCTUATION:
        text = rx.sub(sub, text)
    text = " " + text + " "
    for rx, sub in _ENDING_QUOTES:
        text = rx.sub(sub, text)
    for rx in _CONTRACTIONS:
        text = rx.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation, approximating `nltk.word_tokenize` (which needs the punkt model, a
    runtime download). Sentences are split with a small abbreviation-aware
    rule (`_sentences`), then each sentence goes through the Treebank rules nltk applies: quotes
    become `` and '', punctuation is split off except commas/colons inside numbers and periods
    inside a sentence, clitics are split ("don't" → "do", "n't"; "John's" → "John", "'s";
    "cannot" → "can", "not"). Differences from nltk remain for rare cases (punkt's learned
    abbreviations and ordinal rules); they move an n-gram entropy only slightly."""
    return [t for s in _sentences(text) for t in _treebank(s)]


# ---------------------------------------------------------------------------------------------
# n-gram entropy (GE)

def ngram_entropy_of_text(text: str, ns: Sequence[int] = (2, 3),
                          weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Arithmetic mean over n of weight_n · H_n, where H_n is the entropy in bits of the n-gram
    frequency distribution of the text's words. With the defaults this is H₂/3 + 2·H₃/3. A text
    with fewer than n words has H_n = 0 (as the reference)."""
    words = word_tokenize(text)
    hs = []
    for n in ns:
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        f = np.array(list(counts.values()), dtype=np.float64)
        hs.append(float(-(f / f.sum() * np.log2(f / f.sum())).sum()) if f.size else 0.0)
    return float(np.mean(np.array(hs) * np.array(weights)))


def n_gram_entropy(texts: Sequence[str]) -> float:
    """GE of a record: mean over its generated texts (the summary reports it ×100)."""
    if not texts:
        raise ValueError("no texts to measure")
    return float(np.mean([ngram_entropy_of_text(t) for t in texts]))


# ---------------------------------------------------------------------------------------------
# TF-IDF cosine (RS)

_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token_pattern


class TfIdf:
    """TF-IDF vectors as sklearn's `TfidfVectorizer` (defaults) computes them with a fitted
    vocabulary and idf: lowercase, tokens = `\\b\\w\\w+\\b`, raw counts of in-vocabulary tokens
    times idf, then l2 normalisation. Vectors are sparse dicts {column: weight}."""

    def __init__(self, idf: np.ndarray, vocab: dict):
        idf = np.asarray(idf, dtype=np.float64).reshape(-1)
        if vocab and max(vocab.values()) >= idf.size:
            raise ValueError(f"vocabulary column {max(vocab.values())} is out of range of idf "
                             f"(size {idf.size})")
        self.idf, self.vocab = idf, dict(vocab)

    @classmethod
    def from_files(cls, idf_path, vocab_path) -> "TfIdf":
        for p in (idf_path, vocab_path):
            if not Path(p).is_file():
                raise FileNotFoundError(f"TF-IDF file not found: {p} (official copies: "
                                        "rome_fast.eval.datasets.DATA_URLS)")
        try:  # never pickle: a data file must not run code
            idf = np.load(idf_path, allow_pickle=False)
            vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        except (ValueError, OSError, EOFError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"TF-IDF files {idf_path}, {vocab_path} do not load ({type(exc).__name__}: "
                             f"{exc}): download them again") from None
        if not isinstance(idf, np.ndarray) or not isinstance(vocab, dict):
            raise ValueError(f"{idf_path} must hold one array and {vocab_path} a JSON object (word: column)")
        return cls(idf, vocab)

    def vector(self, text: str) -> dict[int, float]:
        counts = Counter(self.vocab[w] for w in _TFIDF_TOKEN.findall(text.lower()) if w in self.vocab)
        v = {j: c * self.idf[j] for j, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {j: x / norm for j, x in v.items()} if norm > 0 else {}

    def similarity(self, a: str, b: str) -> float:
        """Cosine of the two texts' vectors. 0 when either has no in-vocabulary word (the
        reference divides by a zero norm there and gets NaN)."""
        va, vb = self.vector(a), self.vector(b)
        return float(sum(x * vb[j] for j, x in va.items() if j in vb))


def load_attribute_snippets(path) -> dict:
    """attribute_snippets.json as {relation_id: {target_id: [{"name", "text"}]}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute snippets not found: {path}")
    out: dict = {}
    for i, entry in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        if not isinstance(entry, dict) or not {"relation_id", "target_id", "samples"} <= set(entry):
            raise ValueError(f"{path}: entry {i} needs relation_id, target_id and samples")
        out.setdefault(entry["relation_id"], {}).setdefault(entry["target_id"], []).extend(entry["samples"])
    return out


@torch.no_grad()
def perplexity(model, tok, text: str, max_input_length: int = 100) -> float:
    """The reference's essence score: exp(-Σ log p(token_t | <t) / N) over the first
    max_input_length tokens of text, N counting all of them (the first token included, as the
    reference does)."""
    ids = list(tok(text)["input_ids"])[:max_input_length]
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
    total = logp.gather(1, x[0, 1:, None]).sum().item()
    return math.exp(-total / len(ids))
