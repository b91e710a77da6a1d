"""What the report shows of the demo's edit (edit.json, written by `rome_fast.edit.demo`): the
request, and each probe prompt's completion and target probabilities before and after."""
from __future__ import annotations

from pathlib import Path

from .runs import Warnings, is_number, read_json


def edit_view(run, warnings: Warnings) -> dict | None:
    path = Path(run.path) / "edit.json"
    data = read_json(path, warnings)
    if not isinstance(data, dict) or not isinstance(data.get("before"), list) \
            or not isinstance(data.get("after"), list):
        if data is not None:
            warnings.add(path, "expected the demo's edit record ({request, before: [...], after: [...]})")
        return None
    before = [r for r in data["before"] if isinstance(r, dict)]
    after = {str(r.get("prompt")): r for r in data["after"] if isinstance(r, dict)}
    probs = sorted({k for r in before for k in r if k.startswith("p(")})
    cols = [dict(label="prompt", type="str"), dict(label="completion before", type="str"),
            dict(label="completion after", type="str")]
    for k in probs:
        cols += [dict(label=f"{k} before", type="num", digits=4), dict(label=f"{k} after", type="num", digits=4)]
    rows = []
    for r in before:
        a = after.get(str(r.get("prompt")), {})
        row = [str(r.get("prompt", "")), str(r.get("completion", "")), str(a.get("completion", ""))]
        for k in probs:
            row += [r.get(k) if is_number(r.get(k)) else None, a.get(k) if is_number(a.get(k)) else None]
        rows.append(row)
    request = data.get("request") if isinstance(data.get("request"), dict) else {}
    target = request.get("target_new")
    settings = {"prompt": str(request.get("prompt", "")).replace("{}", str(request.get("subject", ""))),
                "subject": request.get("subject"),
                "new target": target.get("str") if isinstance(target, dict) else target,
                "layers": data.get("layers"), "seconds": data.get("seconds")}
    return dict(type="edit", label=run.label, title="ROME edit", settings=settings,
                probes=dict(columns=cols, rows=rows))
