"""Evaluation data: CounterFact (the reference's full records and the compact one-paraphrase
format), zsRE question answering, and the known-facts set, read into one record type.

Every loader takes a local path. The official ROME data files are listed in `DATA_URLS` for users
who are online (`rome_fast.data.fetch(name)`, or `download(name, dest_dir)`); nothing is fetched
unless asked, and an offline download fails with a message that says what to fetch and where to
put it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data import DATA_URLS, fetch
from ..files import parse_json, read_text

# zsRE has no true object for the edited fact; the reference stores this placeholder.
ZSRE_TARGET_TRUE = "<|endoftext|>"
NQ_PREFIX = "nq question: "


@dataclass
class EvalRecord:
    """One edit case, in the layout of the reference's CounterFact records.

    requested_rewrite: {"prompt": template with "{}", "subject", "target_new": {"str", "id"?},
        "target_true": {"str", "id"?}, "relation_id"?}.
    neighborhood_prompts: [{"prompt", "target"}]: a prompt about another subject and the answer
        the model should keep giving (CounterFact: the true object; zsRE: the NQ answer).
    attribute_prompts / generation_prompts: only full CounterFact records have them.
    """
    case_id: int
    dataset: str  # "counterfact" | "zsre"
    requested_rewrite: dict
    paraphrase_prompts: list = field(default_factory=list)
    neighborhood_prompts: list = field(default_factory=list)
    attribute_prompts: list = field(default_factory=list)
    generation_prompts: list = field(default_factory=list)

    @property
    def subject(self) -> str:
        return self.requested_rewrite["subject"]

    @property
    def rewrite_prompt(self) -> str:
        return self.requested_rewrite["prompt"].format(self.subject)

    @property
    def target_new(self) -> str:
        return self.requested_rewrite["target_new"]["str"]

    @property
    def target_true(self) -> str:
        return self.requested_rewrite["target_true"]["str"]

    def request(self) -> dict:
        """The edit request for `apply_rome_to_model` (a copy: editors may annotate it)."""
        return json.loads(json.dumps(self.requested_rewrite))

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Validation helpers: a malformed record names its position and what is wrong with it.

def _need(rec: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; it has {sorted(rec)}")


def _str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {what} must be a non-empty string, got {value!r}")
    return value


def _target(value: Any, what: str, where: str) -> dict:
    """A target as {"str": ..., "id"?: ...}; a bare string is accepted."""
    if isinstance(value, str):
        value = {"str": value}
    if not isinstance(value, dict) or "str" not in value:
        raise ValueError(f"{where}: {what} must be a string or an object with 'str', got {value!r}")
    _str(value["str"], f"{what}.str", where)
    return dict(value)


def _str_list(value: Any, what: str, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where}: {what} must be a list of strings, got {type(value).__name__}")
    return [_str(v, f"{what}[{i}]", where) for i, v in enumerate(value)]


def _template(prompt: str, subject: str, where: str) -> str:
    if prompt.count("{}") != 1:
        raise ValueError(f"{where}: the rewrite prompt must contain '{{}}' exactly once: {prompt!r}")
    try:
        prompt.format(subject)
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"{where}: the rewrite prompt is not a valid template ({exc}): {prompt!r}")
    return prompt


# ---------------------------------------------------------------------------------------------
# CounterFact

def counterfact_record(rec: dict, where: str = "record") -> EvalRecord:
    """One CounterFact record, full (reference `counterfact.json`) or compact, as an EvalRecord.

    Compact records (keys case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
    locality_prompt, locality_ground_truth) convert as data/README.md says: the template is
    `prompt.replace(subject, "{}")`, target_true = ground_truth, one paraphrase, one
    neighbourhood prompt whose answer is locality_ground_truth. They carry no attribute or
    generation prompts (see the runner for how fluency is measured on them)."""
    if isinstance(rec, dict) and "requested_rewrite" in rec:
        return _counterfact_full(rec, where)
    _need(rec, ["case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                "locality_prompt", "locality_ground_truth"], where)
    subject = _str(rec["subject"], "subject", where)
    prompt = _str(rec["prompt"], "prompt", where)
    if subject not in prompt:
        raise ValueError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}")
    if "{" in prompt or "}" in prompt:
        raise ValueError(f"{where}: braces in the prompt cannot be made into a template: {prompt!r}")
    rewrite = {"prompt": prompt.replace(subject, "{}"), "subject": subject,
               "target_new": _target(rec["target_new"], "target_new", where),
               "target_true": _target(rec["ground_truth"], "ground_truth", where)}
    return EvalRecord(
        case_id=_case_id(rec["case_id"], where), dataset="counterfact", requested_rewrite=rewrite,
        paraphrase_prompts=[_str(rec["rephrase_prompt"], "rephrase_prompt", where)],
        neighborhood_prompts=[{
            "prompt": _str(rec["locality_prompt"], "locality_prompt", where),
            "target": _str(rec["locality_ground_truth"], "locality_ground_truth", where)}])


def _case_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: case_id must be a non-negative integer, got {value!r}")
    return value


def _counterfact_full(rec: dict, where: str) -> EvalRecord:
    _need(rec, ["case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"], where)
    rr = rec["requested_rewrite"]
    _need(rr, ["prompt", "subject", "target_new", "target_true"], f"{where}.requested_rewrite")
    subject = _str(rr["subject"], "requested_rewrite.subject", where)
    rewrite = dict(rr)
    rewrite["prompt"] = _template(_str(rr["prompt"], "requested_rewrite.prompt", where), subject, where)
    rewrite["target_new"] = _target(rr["target_new"], "requested_rewrite.target_new", where)
    rewrite["target_true"] = _target(rr["target_true"], "requested_rewrite.target_true", where)
    # Neighbourhood subjects share the relation and the *true* object of the edited fact.
    neighbours = [{"prompt": p, "target": rewrite["target_true"]["str"]}
                  for p in _str_list(rec["neighborhood_prompts"], "neighborhood_prompts", where)]
    return EvalRecord(
        case_id=_case_id(rec["case_id"], where), dataset="counterfact", requested_rewrite=rewrite,
        paraphrase_prompts=_str_list(rec["paraphrase_prompts"], "paraphrase_prompts", where),
        neighborhood_prompts=neighbours,
        attribute_prompts=_str_list(rec.get("attribute_prompts", []), "attribute_prompts", where),
        generation_prompts=_str_list(rec.get("generation_prompts", []), "generation_prompts", where))


def load_counterfact(path, limit: int | None = None) -> list[EvalRecord]:
    """CounterFact records from a JSON list in either format (detected per record)."""
    raw = _read_json_list(path)
    out = [counterfact_record(r, f"{path}: record {i}") for i, r in enumerate(raw[:limit])]
    _unique_ids(out, path)
    return out


# ---------------------------------------------------------------------------------------------
# zsRE

def zsre_record(rec: dict, case_id: int, where: str = "record", target: str = "answers") -> EvalRecord:
    """One zsRE record ({subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond}) as an
    edit request, as the reference maps it:

    - prompt = src with the subject replaced by "{}";
    - target_new = answers[0] (the reference's choice; `alt`, the counterfactual answer that
      MEND/EasyEdit edit towards, is NOT used unless target="alt");
    - target_true = "<|endoftext|>", a placeholder (zsRE states no true object);
    - paraphrase = [rephrase];
    - neighbourhood = the NQ question `loc + "?"` with answer `loc_ans`. The reference expands it
      into one prompt per token j of tok(" " + loc_ans); the metric does the same by teacher
      forcing (see metrics.zsre_token_accuracy).
    `pred` and `cond` are not used."""
    _need(rec, ["subject", "src", "rephrase", "answers", "loc", "loc_ans"], where)
    subject = _str(rec["subject"], "subject", where)
    src = _str(rec["src"], "src", where)
    if subject not in src:
        raise ValueError(f"{where}: subject {subject!r} does not occur in src {src!r}")
    if "{" in src or "}" in src:
        raise ValueError(f"{where}: braces in src cannot be made into a template: {src!r}")
    loc = _str(rec["loc"], "loc", where)
    if NQ_PREFIX not in loc:  # the reference asserts this too: a sign of a mis-built file
        raise ValueError(f"{where}: loc should contain {NQ_PREFIX!r}, got {loc!r}")
    if target == "answers":
        answers = rec["answers"]
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{where}: answers must be a non-empty list, got {answers!r}")
        new = _str(answers[0], "answers[0]", where)
    elif target == "alt":
        new = _str(rec.get("alt"), "alt", where)
    else:
        raise ValueError(f"target must be 'answers' (the reference) or 'alt', got {target!r}")
    rewrite = {"prompt": src.replace(subject, "{}"), "subject": subject,
               "target_new": {"str": new}, "target_true": {"str": ZSRE_TARGET_TRUE}}
    return EvalRecord(
        case_id=case_id, dataset="zsre", requested_rewrite=rewrite,
        paraphrase_prompts=[_str(rec["rephrase"], "rephrase", where)],
        neighborhood_prompts=[{"prompt": loc + "?", "target": _str(rec["loc_ans"], "loc_ans", where)}])


def load_zsre(path, limit: int | None = None, target: str = "answers") -> list[EvalRecord]:
    """zsRE records; case_id is the position in the file (as in the reference)."""
    raw = _read_json_list(path)
    return [zsre_record(r, i, f"{path}: record {i}", target) for i, r in enumerate(raw[:limit])]


# ---------------------------------------------------------------------------------------------
# Known facts (causal tracing)

def load_known_facts(path, limit: int | None = None) -> list[dict]:
    """known_1000.json records ({known_id, subject, attribute, template, prediction, prompt,
    relation_id}), validated: the subject must occur in the prompt."""
    raw = _read_json_list(path)[:limit]
    for i, r in enumerate(raw):
        where = f"{path}: record {i}"
        _need(r, ["known_id", "subject", "attribute", "prompt"], where)
        if _str(r["subject"], "subject", where) not in _str(r["prompt"], "prompt", where):
            raise ValueError(f"{where}: subject {r['subject']!r} does not occur in {r['prompt']!r}")
    return raw


# ---------------------------------------------------------------------------------------------
# Files

def load_dataset(name: str, path, limit: int | None = None) -> list[EvalRecord]:
    """`name` is "counterfact" or "zsre"."""
    if name in ("counterfact", "cf"):
        return load_counterfact(path, limit)
    if name == "zsre":
        return load_zsre(path, limit)
    raise ValueError(f"unknown dataset {name!r}; use 'counterfact' or 'zsre'")


def _read_json_list(path) -> list:
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name in DATA_URLS:
            hint = f"; download it from {DATA_URLS[path.name]} (or rome_fast.data.fetch({path.name!r}))"
        raise FileNotFoundError(f"data file not found: {path}{hint}")
    raw = parse_json(read_text(path, "data file"), path, "a JSON list of records")
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    return raw


def _unique_ids(records: list[EvalRecord], path) -> None:
    seen = set()
    for r in records:
        if r.case_id in seen:  # case files are named by id: duplicates would overwrite each other
            raise ValueError(f"{path}: duplicate case_id {r.case_id}")
        seen.add(r.case_id)


def download(name: str, dest_dir, timeout: float = 60.0) -> Path:
    """Fetch one official data file into dest_dir (checked and kept if already there)."""
    return fetch(name, dest_dir, timeout=timeout)
