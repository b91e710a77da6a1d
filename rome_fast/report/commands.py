"""`rome-fast report RUN_DIR [--out FILE.html]`."""
from __future__ import annotations


def _cmd_report(args) -> int:
    from .page import write_report
    out = write_report(args.run_dir, args.out, facts=args.facts)
    print(f"report: {out}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="an interactive HTML report of a trace or eval run (one offline file)",
                       description="Write one self-contained HTML file (no network needed) showing a trace "
                                   "run, an eval run, the demo's folder, or a folder holding several: "
                                   "interactive AIE figures, sortable tables, per-fact heat maps, failures.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the folder a trace, eval or demo run wrote")
    p.add_argument("--out", metavar="FILE.html", help="where to write it (default RUN_DIR/report.html)")
    p.add_argument("--facts", metavar="FILE", help="the known-facts JSON of the trace run, to show relation ids")
    p.set_defaults(func=_cmd_report)
