"""The reference's `experiments` package: `causal_trace` and `py.demo`."""
