"""argparse types shared by the subcommands: a bad value is argparse's one-line usage error, before
any model is loaded."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: threads, samples, a window, a limit)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
