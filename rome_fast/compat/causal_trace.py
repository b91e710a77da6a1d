"""Shorter spelling of `rome_fast.compat.experiments.causal_trace` (kept for earlier users)."""
from .experiments.causal_trace import *  # noqa: F401,F403
from .experiments.causal_trace import __all__  # noqa: F401
