"""Readable lines about one trace: where restoring helps most, at the subject and at the last
token (printed by `rome-fast trace --prompt` and by the demo)."""
from __future__ import annotations

from .kinds import get_kind
from .results import TraceResult


def layer_band(layer: int, n_layers: int) -> str:
    third = layer * 3 // max(1, n_layers)
    return ("early", "middle", "late")[min(third, 2)]


def best_cells(r: TraceResult) -> dict:
    """Best cell at the subject tokens and at the last token, each as (token, layer, p, share of
    the drop restored), and the first layer from which the last token alone restores half. When
    the noise did not lower p(answer) there is no drop, and the shares are None."""
    gap = r.high_score - r.low_score
    share = (lambda p: (p - r.low_score) / gap if gap > 0 else None)
    subj = r.scores[r.subject_range[0]:r.subject_range[1]]
    flat = int(subj.argmax())
    st, sl = divmod(flat, subj.shape[1])
    st += r.subject_range[0]
    last = r.scores[-1]
    ll = int(last.argmax())
    half = [L for L in range(len(last)) if gap > 0 and share(float(last[L])) >= 0.5]
    return dict(subject=(st, sl, float(r.scores[st, sl]), share(float(r.scores[st, sl]))),
                last=(len(r.scores) - 1, ll, float(last[ll]), share(float(last[ll]))),
                last_half_from=half[0] if half else None)


def summarize_trace(result, kind, n_layers: int | None = None) -> list[str]:
    """Readable lines about one trace: its peak, the best subject cell and the last token."""
    r = result if isinstance(result, TraceResult) else TraceResult.from_dict(result)
    name = get_kind(kind).description
    if not r.correct_prediction:
        return [f"{name}: skipped, the model predicted {r.answer!r}, not the expected answer"]
    n_layers = n_layers or r.scores.shape[1]
    c = best_cells(r)
    t, layer, score = r.peak()
    lines = [f"{name}: strongest at {r.input_tokens[t]!r} (token {t}), layer {layer}, p = {score:.3f}"]
    for label, (tok, lay, p, frac) in (("subject", c["subject"]), ("last token", c["last"])):
        lines.append(f"    best at the {label}: {r.input_tokens[tok]!r} layer {lay} ({layer_band(lay, n_layers)}), "
                     f"p = {p:.3f}" + ("" if frac is None else f", {frac:.0%} of the drop restored"))
    if r.high_score <= r.low_score:
        lines.append(f"    the noise did not lower p(answer) (clean {r.high_score:.3f}, corrupted "
                     f"{r.low_score:.3f}): there is no drop to restore; try more noise")
    return lines
