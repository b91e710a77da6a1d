"""Noise for causal tracing (the rules are in docs/tracing.md).

The reference draws the corruption noise inside every single trace call from a fresh
`numpy.random.RandomState(1)`, so all restorations of a fact (and all facts with the same number
of subject tokens) see the same noise: common random numbers, which make the cells of a heat map
directly comparable. `draw_noise` reproduces that draw exactly; `resolve_noise` turns the
reference's `--noise_level` rules ("s3", "0.1", "u0.5", "t3", "m") into what `draw_noise` takes.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import torch

NoiseSpec = Union[float, Callable[[torch.Tensor], torch.Tensor]]

_RULE = re.compile(r"^([sut])([0-9]*\.?[0-9]+)?$")


def draw_noise(rows: int, tokens: int, width: int, noise: NoiseSpec = 0.1,
               uniform_noise: bool = False) -> torch.Tensor:
    """The reference's per-call noise: (rows, tokens, width), float64, CPU.

    A fresh RandomState(1) every call; standard normal draws (uniform in [-1, 1) with
    `uniform_noise`), then scaled: a float `noise` is the standard deviation, a callable is applied
    to the raw draws (the reference's `noise_fn`, e.g. a fitted multivariate Gaussian)."""
    return noise_draws(rows, tokens, width, noise, uniform_noise, count=1)[0]


def noise_draws(rows: int, tokens: int, width: int, noise: NoiseSpec = 0.1, uniform_noise: bool = False,
                count: int = 1) -> list[torch.Tensor]:
    """The first `count` consecutive draws of one fresh RandomState(1), each as `draw_noise`
    gives the first. The severed-path trace (`trace_with_repatch`) corrupts its two forward passes
    with the first and the second draw, as the reference's single generator does."""
    check_noise(noise)
    rs = np.random.RandomState(1)
    shape = (int(rows), int(tokens), int(width))
    out = []
    for _ in range(count):
        x = torch.from_numpy(rs.uniform(-1, 1, shape) if uniform_noise else rs.randn(*shape))
        if callable(noise):
            x = noise(x)
            if not bool(torch.isfinite(x).all()):
                raise ValueError("the noise function returned NaN or infinite values")
            out.append(x)
        else:
            out.append(float(noise) * x)
    return out


def check_noise(noise) -> None:
    """A resolved noise level is a finite number > 0 or a callable. Zero leaves the subject
    uncorrupted (every score would equal the clean probability, so no effect can be measured);
    NaN or infinite noise makes every probability NaN."""
    if callable(noise):
        return
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise ValueError(f"noise must be a number (the std) or a callable, not {noise!r}")
    _positive(float(noise), noise)


def _subject_token_ids(tokenizer, subject: str) -> list[int]:
    # Tokenised on its own, as make_inputs does (so a tokenizer's BOS is included, as in the
    # reference, and no leading space is added).
    return tokenizer.encode(subject)


@torch.no_grad()
def collect_embedding_std(mt, subjects: Iterable[str]) -> float:
    """One pooled, unbiased std over every element of the word embeddings of the subjects' tokens.

    The reference runs the whole model once per subject and records the embedding module's output;
    that output is a table lookup, so calling the embedding module directly gives the identical
    values without the forward passes."""
    subjects = [s for s in subjects]
    if not subjects:
        raise ValueError("collect_embedding_std needs at least one subject")
    emb = mt.adapter.embedding
    device = emb.weight.device
    pieces = []
    for s in subjects:
        if not isinstance(s, str) or not s:
            raise ValueError(f"subjects must be non-empty strings, got {s!r}")
        ids = torch.tensor([_subject_token_ids(mt.tokenizer, s)], device=device)
        pieces.append(emb(ids)[0])
    return torch.cat(pieces).std().item()


@torch.no_grad()
def embedding_mean_cov(mt, texts: Sequence[str], max_texts: int = 1000,
                       max_tokens: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of the word embeddings of the tokens of `texts`.

    The reference fits these on 1,000 WikiText-103 texts; pass any corpus (e.g. the lines of
    WikiText-2). Each text contributes at most `max_tokens` tokens."""
    emb = mt.adapter.embedding
    device = emb.weight.device
    texts = [t for t in texts if t and t.strip()][:max_texts]
    if not texts:
        raise ValueError("the noise rule 'm' needs a non-empty text corpus")
    d = emb.weight.shape[1]
    total = torch.zeros(d, dtype=torch.float64)
    outer = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    for t in texts:
        ids = mt.tokenizer.encode(t)[:max_tokens]
        if not ids:
            continue
        e = emb(torch.tensor([ids], device=device))[0].double().cpu()
        total += e.sum(0)
        outer += e.T @ e
        count += e.shape[0]
    if count < 2:
        raise ValueError("the corpus has fewer than two tokens: cannot fit a covariance")
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    return mean, cov


def gaussian_factor(cov: torch.Tensor) -> torch.Tensor:
    """W with W Wᵀ = cov (float64), from the SVD of cov as the reference builds it: cov is
    symmetric positive semi-definite, so its SVD is V S Vᵀ and W = V·sqrt(S)."""
    _, s, vh = torch.linalg.svd(cov.double())
    return vh.T * s.clamp_min(0).sqrt()[None, :]


def gaussian_transform(mean: torch.Tensor, cov: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps standard-normal draws z (..., d) to N(mean, cov): z @ Wᵀ + mean with W Wᵀ = cov, W
    built from the SVD of cov as the reference does (its 'm' rule)."""
    w = gaussian_factor(cov)
    mean = mean.double()

    def transform(z: torch.Tensor) -> torch.Tensor:
        return z.double() @ w.T + mean

    return transform


def student_t_transform(base: Callable[[torch.Tensor], torch.Tensor] | float,
                        degrees: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Student-t noise with `degrees` degrees of freedom and the variance of `base`.

    As the reference: Gaussian draws scaled by sqrt((d − 2)/u), u ~ χ²(d) from RandomState(2), one
    factor per (row, token) for up to 1,000 of them. `base` is the Gaussian (a std or a transform)."""
    if degrees <= 2:
        raise ValueError(f"Student-t noise needs more than 2 degrees of freedom (finite variance), got {degrees}")
    u = torch.from_numpy(np.random.RandomState(2).chisquare(df=degrees, size=1000))
    factors = ((degrees - 2) / u).sqrt()
    gauss = base if callable(base) else (lambda z, _s=float(base): _s * z)

    def transform(z: torch.Tensor) -> torch.Tensor:
        g = gauss(z)
        n = g.shape[:-1].numel()
        if n > factors.numel():
            raise ValueError(f"Student-t noise supports at most {factors.numel()} (row, token) pairs, got {n}")
        return factors[:n].reshape(g.shape[:-1] + (1,)) * g

    return transform


def resolve_noise(spec, mt=None, subjects: Iterable[str] | None = None,
                  texts: Sequence[str] | None = None) -> tuple[NoiseSpec, bool]:
    """A noise rule → the (noise, uniform_noise) pair `draw_noise` and the tracers take.

    Rules (the reference's `--noise_level`):
      a number, e.g. 0.1 or "0.1"  Gaussian with that std
      "sK" (default "s3")           Gaussian with std K·σ, σ = collect_embedding_std(mt, subjects)
      "uX"                          uniform in ±X
      "tD"                          Student-t, D degrees of freedom, variance σ² (σ as for "s"), or
                                    that of the fitted Gaussian when `texts` is given (the reference
                                    always uses the fitted one)
      "m"                           multivariate Gaussian fitted to the embeddings' mean and
                                    covariance over `texts` (a corpus; the reference uses WikiText)
    """
    letter, value = parse_noise_rule(spec, has_texts=texts is not None)
    if letter == "":
        return value, False
    if letter == "u":
        return value, True
    if letter == "m":
        if mt is None:
            raise ValueError("noise rule 'm' needs the model to fit the embedding covariance")
        return gaussian_transform(*embedding_mean_cov(mt, texts)), False
    if letter == "t" and texts is not None and mt is not None:
        return student_t_transform(gaussian_transform(*embedding_mean_cov(mt, texts)), value), False
    if mt is None or subjects is None:
        raise ValueError(f"noise rule {spec!r} is relative to the embeddings' std: pass the model "
                         "and the subjects to measure it on")
    sigma = collect_embedding_std(mt, subjects)
    if letter == "s":
        return value * sigma, False
    return student_t_transform(sigma, value), False


def parse_noise_rule(spec, has_texts: bool = False) -> tuple[str, float | None]:
    """(letter, value) of a noise rule, checked without a model, so a command line can refuse a
    bad rule before loading one: ("", std) for a number, ("s", K), ("u", X), ("t", D), ("m", None).
    has_texts: whether a text corpus is given (the 'm' rule needs one)."""
    bad = f"unknown noise rule {spec!r}: use a number, 'sK', 'uX', 'tD' or 'm'"
    if isinstance(spec, bool):
        raise ValueError(bad)
    if isinstance(spec, (int, float)):
        return "", _positive(float(spec), spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(bad)
    code = spec.strip()
    try:
        return "", _positive(float(code), spec)
    except ValueError as exc:
        if "noise level" in str(exc):  # a number, but not a usable one
            raise
    if code == "m":
        if not has_texts:
            raise ValueError("noise rule 'm' needs a text corpus (texts=, or --noise-corpus FILE on the "
                             "command line) to fit the embedding covariance")
        return "m", None
    m = _RULE.match(code)
    if not m:
        raise ValueError(bad)
    letter, value = m.group(1), m.group(2)
    if letter == "u" and value is None:
        raise ValueError("noise rule 'u' needs a half-width, e.g. 'u0.5'")
    if letter == "t":
        if value is None:
            raise ValueError("noise rule 't' needs degrees of freedom, e.g. 't3'")
        if float(value) <= 2:
            raise ValueError(f"Student-t noise needs more than 2 degrees of freedom (finite variance), got {spec!r}")
        return "t", float(value)
    return letter, _positive(float(value) if value is not None else 1.0, spec)


def _positive(x: float, spec) -> float:
    if not np.isfinite(x) or x <= 0:
        raise ValueError(f"noise level must be a finite number > 0, got {spec!r}"
                         + (": with no noise the subject is not corrupted, so there is no effect to measure"
                            if x == 0 else ""))
    return x


def noise_label(spec) -> str:
    """A short, file-name-safe label of a rule (for output folders, like the reference's n{rule})."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", str(spec))
