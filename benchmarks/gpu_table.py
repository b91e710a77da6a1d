"""The README's GPU table from the GPU suite's results file (benchmarks/gpu_suite.sh, docs/gpu.md).

    python benchmarks/gpu_table.py benchmarks/results/gpu_h200.json [--targets-only] > table.md

Prints markdown: a line on the run (device, torch, CUDA core, tests), each target with its
reference and fast figures, the measured value and met / missed / not measured, then (unless
--targets-only) every other measured row and the MEMIT rows. Reads JSON only: no torch needed."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def fmt(x, unit: str = "") -> str:
    """3 significant digits, thousands separated; '' for a missing value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, str):
        return x
    a = abs(x)
    s = f"{x:,.0f}" if a >= 1000 else f"{x:.3g}" if a >= 1e-3 or a == 0 else f"{x:.1e}"
    if unit == "x":
        return f"{s}x"
    if unit == "":
        return s
    return f"{s} {unit}"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _percent(x) -> str:
    return "" if x is None else f"{100 * x:.0f} %"


def measured(t: dict) -> str:
    if t.get("measured") is None:
        return ""
    if t["name"].endswith("_fraction"):
        return _percent(t["measured"])
    return fmt(t["measured"], t["unit"])


def target_text(t: dict) -> str:
    op = {">=": "≥", "<=": "≤"}[t["op"]]
    value = _percent(t["target"]) if t["name"].endswith("_fraction") else fmt(t["target"], t["unit"])
    return f"{op} {value}"


def table(res: dict, targets_only: bool = False) -> str:
    env = res.get("env") or {}
    backend = env.get("backend") or {}
    tests = res.get("tests") or {}
    suite = res.get("suite") or {}
    lines = [f"**rome_fast on {env.get('device_name', 'an unknown device')}** "
             f"({suite.get('mode', '?')} run, {suite.get('written', '?')}): torch {env.get('torch', '?')}"
             + (f", CUDA {env['torch_cuda']}" if env.get("torch_cuda") else "")
             + f", compiled CUDA core {'loaded' if backend.get('cuda_ext') else 'NOT loaded'}"
             + (f", CUDA tests {tests.get('passed', 0)} passed, {tests.get('failures', 0)} failed, "
                f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped" if tests.get("ran")
                else ", CUDA tests not run")
             + f". {suite.get('note', '')}.", ""]
    lines += ["| target (GPT-2 XL shape) | reference | fast | measured | target | |",
              "|---|---|---|---|---|---|"]
    for t in res.get("targets", []):
        unit = t.get("figure_unit", "")
        lines.append(f"| {cell(t['label'])} | {fmt(t.get('reference'), unit)} | {fmt(t.get('fast'), unit)} | "
                     f"{measured(t)} | {target_text(t)} | {t['status']} |")
    if not targets_only:
        lines += ["", "| model | measurement | reference | fast | ratio | note |", "|---|---|---|---|---|---|"]
        for name, part in (res.get("benchmarks") or {}).items():
            model = (part.get("model") or "") + (" (tiny stand-in)" if part.get("quick") and part.get("model") else "")
            if part.get("error"):
                lines.append(f"| {model} | {name} | | | | failed: {cell(part['error'][:160])} |")
            for r in part.get("rows", []):
                extra = [f"max abs dscore {r['max_abs_dscore']:.1e}" if r.get("max_abs_dscore") is not None else "",
                         f"rel. diff {r['max_rel_diff_update']:.1e}" if r.get("max_rel_diff_update") is not None else "",
                         f"rel. diff of C {r['rel_diff_mom2']:.1e}" if r.get("rel_diff_mom2") is not None else "",
                         r.get("note", "")]
                lines.append(f"| {model} | {cell(r['label'])} | {fmt(r.get('reference'), r.get('unit', ''))} | "
                             f"{fmt(r.get('fast'), r.get('unit', ''))} | {fmt(r.get('ratio'), 'x')} | "
                             f"{cell('; '.join(e for e in extra if e))} |")
        lines += memit_rows(res.get("memit") or {})
    return "\n".join(lines) + "\n"


def memit_rows(memit: dict) -> list[str]:
    """benchmarks/memit_gpu.py's rows (one file per invocation), as far as they are there."""
    rows = [(name, r) for name, m in memit.items() if isinstance(m, dict)
            for r in m.get("rows", []) if isinstance(r, dict)]
    if not rows:
        return []
    out = ["", "| MEMIT run | model | edits | backend | setup | z | layers | total | speedup | rel. diff |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        sec = r.get("seconds") or {}
        diff = r.get("rel_diff_update_max")
        out.append(f"| {cell(name)} | {cell(memit[name].get('model', ''))} | {r.get('edits', '')} | "
                   f"{cell(r.get('backend', ''))} | "
                   + " | ".join(fmt(sec.get(k), "s") for k in ("setup", "z", "layers", "total"))
                   + f" | {fmt(r.get('speedup'), 'x')} | {'' if diff is None else f'{diff:.1e}'} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="the suite's results file (gpu_<device>.json)")
    ap.add_argument("--targets-only", action="store_true", help="only the targets' table")
    args = ap.parse_args(argv)
    path = Path(args.results)
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"gpu_table.py: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(res, dict) or "targets" not in res:
        print(f"gpu_table.py: {path} is not a GPU suite results file (no 'targets')", file=sys.stderr)
        return 2
    sys.stdout.write(table(res, args.targets_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
