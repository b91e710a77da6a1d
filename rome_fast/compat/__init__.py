"""Drop-in modules with the reference's names: change `from experiments.causal_trace import …`
to `from rome_fast.compat.causal_trace import …`."""
