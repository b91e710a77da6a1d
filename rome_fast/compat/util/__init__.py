"""The reference's `util` package: `nethook`, `generate`, `globals`, `logit_lens`."""
