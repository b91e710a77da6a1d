"""rome_fast.hooks: the reference's nethook names, signatures, defaults and behaviour, on a small
model written here (a tuple-returning module included) and on a tiny transformer."""
import inspect

import pytest
import torch
from torch import nn

from rome_fast import hooks
from rome_fast.hooks import (StopForward, Trace, TraceDict, get_module, get_parameter, in_execution_order,
                             invoke_with_optional_args, module_input_size, replace_module, set_requires_grad)

# The reference's signatures (parameter names, order, defaults), recorded as data; ours may add
# keywords after them only (`before`).
REFERENCE_SIGNATURES = {
    "Trace": [("module", inspect.Parameter.empty), ("layer", None), ("retain_output", True),
              ("retain_input", False), ("clone", False), ("detach", False), ("retain_grad", False),
              ("edit_output", None), ("stop", False)],
    "TraceDict": [("module", inspect.Parameter.empty), ("layers", None), ("retain_output", True),
                  ("retain_input", False), ("clone", False), ("detach", False), ("retain_grad", False),
                  ("edit_output", None), ("stop", False)],
    "get_module": [("model", inspect.Parameter.empty), ("name", inspect.Parameter.empty)],
    "get_parameter": [("model", inspect.Parameter.empty), ("name", inspect.Parameter.empty)],
    "replace_module": [("model", inspect.Parameter.empty), ("name", inspect.Parameter.empty),
                       ("new_module", inspect.Parameter.empty)],
    "set_requires_grad": [("requires_grad", inspect.Parameter.empty)],
}


class WithTuple(nn.Module):
    """Returns (hidden, extra) as transformers' attention modules do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x), None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 3)
        self.b = WithTuple()
        self.c = nn.Linear(3, 2)

    def forward(self, x):
        return self.c(self.b(self.a(x))[0])


@pytest.mark.parametrize("name", sorted(REFERENCE_SIGNATURES))
def test_reference_signatures(name):
    params = list(inspect.signature(getattr(hooks, name)).parameters.values())
    want = REFERENCE_SIGNATURES[name]
    assert [(p.name, p.default) for p in params[:len(want)]] == want
    assert [p.name for p in params[len(want):]] in ([], ["before"], ["models"])


def test_trace_defaults_keep_the_output_as_is():
    net, x = Net(), torch.randn(2, 3)
    with Trace(net, "a") as tr:
        y = net(x)
    assert tr.input is None and tr.output.requires_grad  # kept, not detached, not cloned
    torch.testing.assert_close(tr.output, net.a(x))
    with Trace(net, "a", retain_input=True, retain_output=False, detach=True) as tr:
        net(x)
    assert tr.output is None and torch.equal(tr.input, x) and not tr.input.requires_grad
    with Trace(net.a) as whole:  # layer=None traces the module itself
        net(x)
    torch.testing.assert_close(whole.output, net.a(x))
    assert y.shape == (2, 2)


def test_tuple_outputs_are_kept_and_edited_whole():
    net, x = Net(), torch.randn(2, 3)
    seen = []

    def edit(output):  # one argument: Trace's usual form
        seen.append(type(output))
        return (output[0] * 0, output[1])

    with Trace(net, "b", edit_output=edit, clone=True, detach=True) as tr:
        y = net(x)
    assert seen == [tuple] and isinstance(tr.output, tuple) and tr.output[1] is None
    assert torch.count_nonzero(tr.output[0]) == 0 and not tr.output[0].requires_grad
    torch.testing.assert_close(y, net.c(torch.zeros(2, 3)))


def test_trace_dict_edits_with_the_layer_name_dedups_and_stops():
    net, x = Net(), torch.randn(2, 3)
    calls = []

    def edit(out, layer):  # two arguments: TraceDict's usual form
        calls.append(layer)
        return out

    with TraceDict(net, ["a", "c", "a"], edit_output=edit, retain_input=True) as td:
        net(x)
    assert list(td) == ["a", "c"] and calls == ["a", "c"]
    torch.testing.assert_close(td["c"].input, net.b(net.a(x))[0])
    # stop at the last distinct name given: the forward ends quietly there, nothing after runs
    after = []
    handle = net.c.register_forward_hook(lambda *a: after.append(1))
    with TraceDict(net, ["a", "b", "a"], stop=True) as td:
        net(x)
        raise AssertionError("the forward should have stopped")
    handle.remove()
    assert after == [] and td["b"].output is not None
    # a StopForward the traces did not ask for is not swallowed
    with pytest.raises(StopForward):
        with Trace(net, "a"):
            raise StopForward()


def test_before_keeps_the_input_without_running_the_module():
    net, x = Net(), torch.randn(2, 3)
    ran = []
    net.b.lin.register_forward_hook(lambda *a: ran.append(1))
    with Trace(net, "b.lin", retain_input=True, stop=True, before=True) as tr:
        net(x)
    assert ran == [] and tr.output is None
    torch.testing.assert_close(tr.input, net.a(x))
    with pytest.raises(ValueError, match="no output to edit"):
        Trace(net, "b", edit_output=lambda o: o, before=True)


def test_retain_grad():
    net, x = Net(), torch.randn(2, 3)
    with Trace(net, "a", retain_grad=True) as tr:
        net(x).sum().backward()
    assert tr.output.grad is not None and tr.output.grad.shape == (2, 3)


def test_module_helpers():
    net = Net()
    assert get_module(net, "b.lin") is net.b.lin and get_module(net, "") is net
    assert get_parameter(net, "c.bias") is net.c.bias
    with pytest.raises(LookupError):
        get_module(net, "nope")
    with pytest.raises(LookupError):
        get_parameter(net, "a.nope")
    new = nn.Linear(3, 3)
    replace_module(net, "b.lin", new)
    assert net.b.lin is new
    t = torch.zeros(3)
    set_requires_grad(True, net, t)
    assert t.requires_grad and all(p.requires_grad for p in net.parameters())
    set_requires_grad(False, net)
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(TypeError):
        set_requires_grad(True, "a")
    assert in_execution_order(net, ["c", "a"]) == ["a", "c"]
    assert module_input_size(net, "c") == 3


def test_invoke_with_optional_args():
    assert invoke_with_optional_args(lambda x: x, output=1, layer=2) == 1
    assert invoke_with_optional_args(lambda out, name: (out, name), output=1, layer=2) == (1, 2)
    assert invoke_with_optional_args(lambda layer, output: (layer, output), output=1, layer=2) == (2, 1)
    assert invoke_with_optional_args(lambda a, b=5: (a, b), 1) == (1, 5)
    assert invoke_with_optional_args(lambda *, layer: layer, output=1, layer=2) == 2
    assert invoke_with_optional_args(lambda *a: a, 1, 2) == (1, 2)
    with pytest.raises(TypeError, match="needs an argument"):
        invoke_with_optional_args(lambda a, b: a, 1)


def test_on_a_transformer(tiny_models):
    """Blocks and attention of a real family through the hooks: inputs, tuple outputs, edits."""
    mt = tiny_models["gpt2"]
    a = mt.adapter
    ids = mt.tokenizer("The Eiffel Tower is", return_tensors="pt").input_ids
    with torch.no_grad(), TraceDict(mt.model, [a.attn_name(1), a.rewrite_name(2)], retain_input=True) as td:
        clean = mt.model(ids).logits
    assert isinstance(td[a.attn_name(1)].output, tuple)  # attention returns (output, weights)
    assert td[a.rewrite_name(2)].input.shape[-1] == a.key_size

    def zero_attn(output, layer):
        output[0][:] = 0
        return output

    with torch.no_grad(), TraceDict(mt.model, [a.attn_name(1)], edit_output=zero_attn):
        edited = mt.model(ids).logits
    assert (edited - clean).abs().max() > 1e-3
