"""The reference's `dsets`: `KnownsDataset`, `CounterFactDataset`, `MENDQADataset`,
`AttributeSnippets`, reading `<data_dir>/<file>`. A missing file is fetched into data_dir as the
reference does (`rome_fast.data.fetch`: the official URL, checked); known_1000.json ships with
rome_fast, so the known facts need no network."""
from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

from torch.utils.data import Dataset

from ...data import BUNDLED, bundled, fetch
from ...eval.datasets import zsre_record


def _local(data_dir, name: str) -> Path:
    """data_dir/name, put there first if missing (copied from the package, or downloaded)."""
    path = Path(data_dir) / name
    if path.is_file():
        return path
    if name in BUNDLED:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundled(name), path)
        return path
    return fetch(name, data_dir)


def _read(data_dir, name: str):
    path = _local(data_dir, name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): delete it to fetch it again") from None


class KnownsDataset(Dataset):
    """The known facts (known_1000.json): records with known_id, subject, attribute, template,
    prediction, prompt, relation_id."""

    def __init__(self, data_dir, *args, **kwargs):
        self.data = _read(data_dir, "known_1000.json")

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        return self.data[item]


class CounterFactDataset(Dataset):
    """CounterFact (counterfact.json), the first `size` records when size is given."""

    def __init__(self, data_dir, size=None, *args, **kwargs):
        self.data = _read(data_dir, "counterfact.json")
        if size is not None:
            self.data = self.data[:size]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        return self.data[item]


class MENDQADataset:
    """zsRE (zsre_mend_eval.json) as CounterFact-style records: the rewrite from `src` and
    `answers[0]`, the paraphrase `rephrase`, and one neighbourhood prompt per token of the NQ
    answer `loc_ans` (the question, "?", the answer's tokens so far → the next token)."""

    def __init__(self, data_dir, tok, *args, **kwargs):
        raw = _read(data_dir, "zsre_mend_eval.json")
        self._data = []
        for i, record in enumerate(raw):
            case = zsre_record(record, i, f"zsre_mend_eval.json record {i}").to_dict()
            del case["dataset"]
            # special tokens left out: a BOS would otherwise open every neighbourhood answer
            ans = tok(" " + record["loc_ans"], add_special_tokens=False)["input_ids"]
            case["neighborhood_prompts"] = [{"prompt": record["loc"] + "?" + tok.decode(ans[:j]),
                                             "target": tok.decode(ans[j])} for j in range(len(ans))]
            self._data.append(case)

    def __getitem__(self, item):
        return self._data[item]

    def __len__(self):
        return len(self._data)


class AttributeSnippets:
    """Wikipedia snippets (attribute_snippets.json) by relation and target: `snips[rid][tid]` is
    the list of {name, text} samples; `snippets_list` the file's records."""

    def __init__(self, data_dir):
        self.snippets_list = _read(data_dir, "attribute_snippets.json")
        snips = collections.defaultdict(lambda: collections.defaultdict(list))
        for el in self.snippets_list:
            snips[el["relation_id"]][el["target_id"]].extend(el["samples"])
        self._data = snips

    def __getitem__(self, item):
        return self._data[item]


__all__ = ["AttributeSnippets", "CounterFactDataset", "KnownsDataset", "MENDQADataset"]
