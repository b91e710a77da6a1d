"""Target vectors z kept on disk as they are computed, so a long z step resumes where it stopped.

The z step is nearly all of a mass edit's time (hours for a thousand requests on a CPU). With a
checkpoint folder, `compute_zs` writes each finished group of requests as one safetensors file
(atomically: a temporary file, synced, renamed) and, when called again, optimises only the
requests that no file holds. A request's z depends on the model, the hyperparameters and the
context templates, never on which other requests share its group, so the groups of a resumed run
need not be the first run's.

The folder's `identity.json` records what the vectors belong to: the model (its config and a
strided sample of every parameter), the full bytes of the weights the edit changes (so a
sequential run's batches are told apart), the hyperparameters and the templates. A folder that
belongs to something else is refused, not mixed in."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ...files import (content_sha256, parse_json, read_text, remove_stale_temporaries, save_tensors_atomic,
                      tensors_sha256, write_json_atomic)
from .compute_z import ZInfo

IDENTITY = "identity.json"


def request_key(request: dict) -> str:
    """What a request's z depends on: its prompt, subject and new target."""
    return content_sha256([request["prompt"], request["subject"], request["target_new"]["str"]])


def identity(model, hparams, templates, weight_names) -> dict:
    from ..fast_stats import model_fingerprint
    return {"model": model_fingerprint(model),
            "edited_weights_sha256": tensors_sha256({n: model.get_parameter(n) for n in weight_names}),
            "hparams": content_sha256(hparams.to_dict()), "templates": content_sha256(templates)}


class ZCheckpoint:
    """A folder of finished target vectors for one (model state, hparams, templates)."""

    def __init__(self, folder, ident: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / IDENTITY
        if path.is_file():
            saved = parse_json(read_text(path, "z checkpoint"), path, "a z checkpoint's identity")
            diff = sorted(k for k in ident if not isinstance(saved, dict) or saved.get(k) != ident[k])
            if diff:
                raise ValueError(f"{self.folder} holds target vectors of another edit (its {', '.join(diff)} "
                                 "differ): delete the folder or give another one")
        else:
            write_json_atomic(path, ident)
        self.resumed_seconds = 0.0
        remove_stale_temporaries(self.folder)

    def load(self, device) -> dict:
        """{request key: ZInfo} of every saved group; `resumed_seconds` becomes the time that
        computing them took."""
        from safetensors import safe_open
        found, seconds = {}, 0.0
        for f in sorted(self.folder.glob("z_*.safetensors")):
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    meta = st.metadata() or {}
                    t = {n: st.get_tensor(n).to(device) for n in ("z", "h_init", "delta")}
                info = json.loads(meta["info"])
            except Exception as exc:  # a file this package did not write whole
                raise ValueError(f"{f} is not a readable z checkpoint file ({type(exc).__name__}): delete it "
                                 "to compute its requests again") from None
            for j, (key, steps, losses, lookup) in enumerate(zip(info["keys"], info["steps"], info["losses"],
                                                                 info["lookups"])):
                found[key] = ZInfo(t["z"][j], t["h_init"][j], t["delta"][j], [tuple(x) for x in losses], steps,
                                   lookup)
            seconds += float(info["seconds"])
        self.resumed_seconds = seconds
        return found

    def save(self, keys: list[str], infos: list[ZInfo], seconds: float) -> None:
        n = len(list(self.folder.glob("z_*.safetensors")))
        name = f"z_{n:05d}_{time.time_ns() % 10**9:09d}.safetensors"
        info = {"keys": keys, "steps": [i.steps for i in infos], "losses": [list(map(list, i.losses)) for i in infos],
                "lookups": [list(i.lookup_idxs) for i in infos], "seconds": seconds}
        save_tensors_atomic(self.folder / name, {k: torch.stack([getattr(i, k).detach() for i in infos])
                                                 for k in ("z", "h_init", "delta")}, {"info": json.dumps(info)})
