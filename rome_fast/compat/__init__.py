"""Drop-in modules with the reference's module paths, names, signatures and defaults
(docs/dropin.md): change only the imports, e.g. `from experiments.causal_trace import …` to
`from rome_fast.compat.experiments.causal_trace import …`, and the same for `rome`,
`util.nethook`, `util.generate`, `util.globals`, `dsets` and `experiments.py.demo`."""
