"""Sequential editing side by side: ROME (one by one), MEMIT and AlphaEdit, from the run folders of
`rome-fast eval --sequential --num-edits N` (AlphaEdit's protocol, docs/alphaedit.md §Measured).

    rome-fast eval --method memit     --num-edits 100 --sequential --limit 2000 --out runs/memit
    rome-fast eval --method alphaedit --num-edits 100 --sequential --limit 2000 --out runs/alphaedit --skip-pre
    rome-fast eval --method rome      --num-edits 100 --sequential --limit 2000 --out runs/rome --skip-pre
    python benchmarks/alphaedit_sequential.py runs/memit runs/alphaedit runs/rome \\
        --json benchmarks/results/alphaedit_sequential_smollm2.json --png benchmarks/results/alphaedit_sequential_smollm2.png

Writes one JSON (per method: metrics after the last batch, also by the batch that edited each record,
edit wall time, the monitor's curves;
"unedited": the "pre" metrics of whichever run measured them), one figure (the three monitors) and
prints a Markdown table."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rome_fast.eval.monitor import load_monitor, plot_monitors
from rome_fast.eval.runner import summarize

COLS = ["S", "ES", "PS", "NS", "GE", "rewrite_acc", "paraphrase_acc", "neighborhood_acc"]


def _cell(v):
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else f"{v['mean']:.1f} ± {v['ci95']:.1f}"


def _first_last(by_batch) -> str:
    """ES of the records of the first and of the last batch, both measured after the last batch:
    how much of the oldest edits survived the later ones."""
    es = [b["ES"]["mean"] for b in by_batch if "ES" in b]
    return f"{es[0]:.1f} / {es[-1]:.1f}" if es else "-"


def collect(dirs) -> dict:
    runs, unedited, models = {}, None, set()
    for d in map(Path, dirs):
        s = summarize(d, print_table=False)
        mon = load_monitor(d / "monitor.json")
        cfg = json.loads((d / "run.json").read_text(encoding="utf-8"))
        edits = s["chunks"]["edits"]
        models.add(cfg["model"])
        runs[cfg["method"]] = {
            "dir": d.name, "cases": s["n"], "edits": edits, "batch": cfg["num_edits"], "batches": s["chunks"]["chunks"],
            "post": s["post"], "edit_seconds": s["chunks"]["edit_seconds"],
            "seconds_per_edit": s["chunks"]["seconds_per_edit"], "backend": cfg.get("backend") or "fast",
            # a batch slowed by other jobs or a pause inflates the total; the median is the honest rate
            "median_batch_seconds": statistics.median(b["seconds"] for b in mon["batches"]) if mon["batches"] else None,
            "generation_interval": cfg.get("generation_interval"), "hparams": cfg.get("hparams"),
            "data_sha256": cfg.get("data_sha256"), "monitor": mon,
            "post_by_batch": s.get("post_by_batch", [])}
        if s["pre"] and unedited is None:
            unedited = {"from": d.name, "cases": s["n"], "metrics": s["pre"]}
    if len(models) > 1:
        raise SystemExit(f"the runs edit different models {sorted(models)}: compare runs of one model")
    return {"model": models.pop() if models else None, "runs": runs, "unedited": unedited}


def table(res) -> str:
    rows = [["", "edits (batch)"] + COLS + ["ES first / last batch", "edit time (s)", "median batch (s)", "final KL",
                                            "final GE (monitor)"]]
    if res["unedited"]:
        rows.append(["unedited", "-"] + [_cell(res["unedited"]["metrics"].get(c)) for c in COLS] + ["-", "-", "-", "0", "-"])
    for m, r in res["runs"].items():
        last = r["monitor"]["batches"][-1] if r["monitor"]["batches"] else {}
        rows.append([m, f"{r['edits']} ({r['batch']})"] + [_cell(r["post"].get(c)) for c in COLS] +
                    [_first_last(r["post_by_batch"]), f"{r['edit_seconds']:.0f}", _cell(r["median_batch_seconds"]), f"{last.get('kl', float('nan')):.4f}",
                     f"{last.get('ngram_entropy', float('nan')):.3f}"])
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="run folders of rome-fast eval --sequential --num-edits")
    ap.add_argument("--json", required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--note", default="", help="how the runs were made (machine, load), kept in the JSON")
    args = ap.parse_args(argv)
    res = collect(args.dirs)
    res["note"] = args.note
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    plot_monitors({m: r["monitor"] for m, r in res["runs"].items()}, args.png,
                  title=f"sequential CounterFact edits on {res['model']}: collapse monitor")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
