"""The suite's rule (conftest.py): a FutureWarning or DeprecationWarning raised by a call our code
makes fails the test; one raised by a third-party library about its own internal calls does not."""
import inspect
import sys

import pytest
import torch

from conftest import DeprecatedCallError, deprecated_caller

FAKE_LIBRARY = '''
import sys, warnings

def old_api():
    warnings.warn("old_api is deprecated", FutureWarning, stacklevel=2)

def uses_old_api_itself():
    old_api()

def raiser_frame():
    return sys._getframe()

def calls_raiser_itself():
    return raiser_frame()
'''


@pytest.fixture
def fakelib(tmp_path, monkeypatch):
    (tmp_path / "fakelib_deprecations.py").write_text(FAKE_LIBRARY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fakelib_deprecations
    yield fakelib_deprecations
    sys.modules.pop("fakelib_deprecations", None)


def test_who_made_the_call(fakelib):
    assert deprecated_caller(fakelib.raiser_frame()) is not None          # called from this test
    assert deprecated_caller(fakelib.calls_raiser_itself()) is None       # the library's own call


def test_our_deprecated_call_fails_theirs_passes(fakelib):
    with pytest.raises(DeprecatedCallError, match="old_api is deprecated"):
        fakelib.old_api()
    fakelib.uses_old_api_itself()  # warns, but is not ours to fix


def test_a_real_deprecated_transformers_argument_fails(tiny_models):
    """The warning that started this rule: a block called with transformers' old cache name."""
    block = tiny_models["llama"].adapter.block(0)
    params = inspect.signature(type(block).forward).parameters
    if "cache" not in params:
        pytest.skip("this transformers version still takes past_key_values")
    h = torch.zeros(1, 2, tiny_models["llama"].adapter.hidden_size)
    with pytest.raises(DeprecatedCallError, match="past_key_values"):
        block(h, past_key_values=None)
