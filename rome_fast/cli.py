"""`rome-fast` command line: info, trace, aggregate, demo, eval, eval-summary, stats, edit, report."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_info(args) -> int:
    from . import backend_info
    info = backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "why":
            for line in value:
                print(f"  note: {line}")
        else:
            print(f"{key:>14}: {value}")
    if args.model:
        from .models import load_model
        mt = load_model(args.model)
        a = mt.adapter
        print(f"{'model':>14}: {mt!r}")
        print(f"{'shape':>14}: hidden {a.hidden_size}, key {a.key_size}, layers {a.num_layers}")
        print(f"{'rewrite':>14}: {a.rewrite_template} ({a.weight_layout})")
    return 0


def _add_info(sub) -> None:
    info = sub.add_parser("info", help="what is compiled and usable here")
    info.add_argument("--json", action="store_true", help="print the dict as JSON")
    info.add_argument("--model", help="also load a model and describe its adapter (e.g. smollm2-135m)")
    info.set_defaults(func=_cmd_info)


# Each feature registers its own subcommands: a function `add_parsers(subparsers)` that sets
# `func` on every parser it adds (func(args) -> exit code).
from .trace.commands import add_parsers as _add_trace  # noqa: E402  (trace, aggregate)
from .demo import add_parsers as _add_demo  # noqa: E402  (demo)
from .eval.commands import add_parsers as _add_eval  # noqa: E402  (eval, eval-summary)
from .edit.commands import add_parsers as _add_edit  # noqa: E402  (stats, edit)
from .report.commands import add_parsers as _add_report  # noqa: E402  (report)

SUBCOMMANDS = [_add_info, _add_trace, _add_demo, _add_eval, _add_edit, _add_report]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rome-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv=None) -> int:
    """Run a subcommand. Bad input (ValueError, a file that cannot be read or written: OSError, a
    missing optional package: ModuleNotFoundError) is one `rome-fast: error:` line and exit code 2;
    Ctrl-C one line and exit code 130; ROME_FAST_DEBUG=1 shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        if os.environ.get("ROME_FAST_DEBUG", "") not in ("", "0"):
            raise
        print(f"rome-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # every file is written atomically and an edit restores its weights on the way out, so
        # there is nothing to report but where to pick up
        if os.environ.get("ROME_FAST_DEBUG", "") not in ("", "0"):
            raise
        print("rome-fast: interrupted; finished files are kept (the same command resumes a run)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
