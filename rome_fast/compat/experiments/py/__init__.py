"""The reference's `experiments.py` package: `demo`."""
