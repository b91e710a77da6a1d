"""Tracing kinds: what one cell of a causal trace restores. Every part of the package that knows
about kinds (engine, reference path, api, runner, aggregate, plots, demo, command line) reads this
registry, so a new kind is one `register_kind(TraceKind(...))` with its restore rule.

A cell (token t, layer L) of kind k restores, at token t, the clean value of either
* the block output (`part=None`, the residual stream: "hidden states"), or
* the output of the module the adapter names with `part` (e.g. "mlp_name"), hooked in each layer
  of the restored window.
Its restore rule (`plan`) says which layers are restored, [lo, hi), and the first layer whose
input differs from the corrupted run (`start`): the fast engine runs a cell from there on, since
everything below is the corrupted run's (docs/tracing.md).

Hidden states are spelled "hidden" throughout the package. The reference's spellings are accepted
where users call in (`get_kind(None)`, `get_kind("")`) and written where the reference writes them
(`stored`: "" in result dicts and files)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence


class Span(NamedTuple):
    start: int  # first layer whose input differs from the corrupted run
    lo: int     # restored layers [lo, hi)
    hi: int


def window_bounds(layer: int, window: int, num_layers: int) -> tuple[int, int]:
    """The reference's restore window plotted at `layer`: [L − ⌊w/2⌋, L + ⌈w/2⌉) clipped to the
    model, i.e. L−5 … L+4 for w = 10."""
    return max(0, layer - window // 2), min(num_layers, layer - (-window // 2))


def single_layer(layer: int, window: int, num_layers: int) -> Span:
    """Restore block `layer`'s output: the input of block layer+1 is the first that differs."""
    return Span(layer + 1, layer, layer + 1)


def layer_window(layer: int, window: int, num_layers: int) -> Span:
    """Restore a module's output in every layer of the window around `layer`: the window's first
    block is the first whose output differs, its input is still the corrupted run's."""
    lo, hi = window_bounds(layer, window, num_layers)
    return Span(lo, lo, hi)


@dataclass(frozen=True)
class TraceKind:
    name: str                  # in code, on the command line, in summaries: "hidden", "mlp", "attn"
    stored: str                # the reference's spelling in result dicts and files ("" = hidden)
    suffix: str                # of the reference's case files: knowledge_{id}{suffix}.npz
    part: str | None           # the adapter's name getter of the restored module; None: block output
    plan: Callable[[int, int, int], Span]  # (layer, window, num_layers) -> Span
    cmap: str                  # matplotlib colour map of its heat maps
    label: str                 # its name in figure titles: "MLP"
    single_title: str          # title of one fact's heat map
    single_xlabel: str         # x label of one fact's heat map ({model}, {window} filled in)
    aie_xlabel: str            # x label of the averaged figures
    description: str           # one line for printed summaries

    @property
    def argument(self) -> str | None:
        """The reference's spelling as a `kind=` argument (None for hidden states)."""
        return self.stored or None

    def module_name(self, adapter, layer: int) -> str:
        """The module whose output a cell restores at `layer` (for part=None, the block)."""
        return getattr(adapter, self.part or "layer_name")(layer)


KINDS: dict[str, TraceKind] = {}


def register_kind(kind: TraceKind) -> TraceKind:
    if kind.name in KINDS or any(k.stored == kind.stored or k.suffix == kind.suffix for k in KINDS.values()):
        raise ValueError(f"a tracing kind named {kind.name!r} (or stored or suffixed the same) exists")
    KINDS[kind.name] = kind
    return kind


# the reference's spellings of hidden states, accepted where users call in
_HIDDEN_ALIASES = (None, "", "None")


def get_kind(kind) -> TraceKind:
    """The registered kind for a name, a TraceKind, or a reference spelling (None / "" = hidden)."""
    if isinstance(kind, TraceKind):
        return kind
    if kind in _HIDDEN_ALIASES:
        kind = "hidden"
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use None or 'hidden' (hidden states), "
                         + ", ".join(repr(k) for k in KINDS if k != "hidden"))
    return KINDS[kind]


def kind_names(kinds: str | Sequence | None = "all") -> list[str]:
    """Names of the kinds asked for: "all", one spelling, or a sequence of them."""
    if kinds == "all":
        return list(KINDS)
    if kinds is None or isinstance(kinds, (str, TraceKind)):
        kinds = (kinds,)
    return [get_kind(k).name for k in kinds]


def stored_kind(value) -> str:
    """The reference's stored spelling of a kind read from a dict or file (unknown ones kept)."""
    value = None if value is None else str(value)
    try:
        return get_kind(value).stored
    except ValueError:
        return value


register_kind(TraceKind(
    "hidden", "", "", None, single_layer, "Purples", "hidden state",
    "Impact of restoring state after corrupted input", "single restored layer within {model}",
    "single restored layer", "Hidden states (one layer restored)"))
register_kind(TraceKind(
    "mlp", "mlp", "_mlp", "mlp_name", layer_window, "Greens", "MLP",
    "Impact of restoring MLP after corrupted input", "center of interval of {window} restored MLP layers",
    "center of interval of restored MLP layers", "MLP outputs (10-layer window)"))
register_kind(TraceKind(
    "attn", "attn", "_attn", "attn_name", layer_window, "Reds", "Attn",
    "Impact of restoring Attn after corrupted input", "center of interval of {window} restored Attn layers",
    "center of interval of restored Attn layers", "Attention outputs (10-layer window)"))
