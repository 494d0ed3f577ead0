"""FusedConv2d calls of the flat forward without the module machinery (fusedconv/graph/flat_fused.py).

The direct path runs only for float32 channels_last input on CPU (oneDNN), so a converted float32 model is compared
with itself with the direct path switched off (every fused call then goes through `FusedConv2d.__call__`, the path
the rest of the suite checks against PyTorch): the two must agree exactly, before and after every change a user can
make, and loosely with the unconverted model in float64 (a skipped or wrong conv shows as O(1)). Whether a call took
the direct path is counted by the calls of `cpu.eager_forward`, which only the module path makes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu, cpu_boundary, ops  # noqa: E402
from fusedconv.graph import flat_fused  # noqa: E402
from fusedconv.graph.flat import flat_check  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

torchvision = pytest.importorskip("torchvision")
# The direct path is the oneDNN route's: small convs take it too here (by default they stay on F.conv2d).
pytestmark = [pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise convs"),
              pytest.mark.usefixtures("onednn_small_convs")]

SIZE = (1, 3, 64, 64)  # the last layers at 2x2: at 1x1 a tensor is both layouts and takes F.conv2d
N_FUSED = 52  # FusedConv2d calls in one converted mobilenet_v2 forward


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _fused_leaves(model) -> flat_fused.FusedLeaves:
    check = flat_check(model)
    assert check is not None
    return check.fused


@contextlib.contextmanager
def _direct_off(model):
    """Every fused call of this model's flat graph through the module (the reference path)."""
    leaves = _fused_leaves(model)
    none = (None,) * len(leaves.leaves)
    leaves.states = lambda *inputs: none
    try:
        yield
    finally:
        leaves._compile()


@pytest.fixture
def mobilenet():
    model = randomize_bn(torchvision.models.mobilenet_v2(weights=None)).eval()
    converted = fusedconv.convert(model, reparameterize=False)
    with torch.no_grad():
        converted(_x(*SIZE))  # routes and packs every layer once
    return model, converted


def _reference(converted, x):
    with torch.no_grad(), _direct_off(converted):
        return converted(x)


def _run(converted, x):
    with torch.no_grad():
        return converted(x)


def test_direct_path_taken_and_exact(mobilenet, module_calls):
    model, converted = mobilenet
    x = _x(*SIZE, seed=1)
    with torch.no_grad():
        assert sum(s is not None for s in _fused_leaves(converted).states()) == N_FUSED
    y = _run(converted, x)
    assert module_calls[0] == 0
    assert guard_table(converted).fallback_calls == 0
    assert torch.equal(y, _reference(converted, x))
    assert module_calls[0] == N_FUSED  # the reference did go through the modules
    with torch.no_grad():
        assert max_rel_error(y.double(), copy.deepcopy(model).double()(x.double())) < 1e-3


def _edit_weight_inplace(m):
    m.weight.mul_(1.5)


def _edit_scale_inplace(m):
    m.scale.mul_(-2.0)


def _edit_shift_inplace(m):
    m.shift.add_(0.25)


def _edit_weight_data(m):
    m.weight.data = m.weight.data * 0.5


def _edit_scale_data(m):
    m.scale.data = m.scale.data + 1.0


def _edit_shift_data(m):
    m.shift.data = m.shift.data - 1.0


def _edit_weight_reassigned(m):
    m.weight = nn.Parameter(m.weight.detach() * 2.0)


def _edit_load_state_dict(m):
    sd = {k: v * 0.75 if k == "weight" else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd)


EDITS = [_edit_weight_inplace, _edit_scale_inplace, _edit_shift_inplace, _edit_weight_data, _edit_scale_data,
         _edit_shift_data, _edit_weight_reassigned, _edit_load_state_dict]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__[len("_edit_"):] for e in EDITS])
@pytest.mark.parametrize("which", [0, 20, 51], ids=["stem", "middle", "last"])
def test_edit_after_forward_is_seen(mobilenet, module_calls, edit, which, monkeypatch):
    _, converted = mobilenet
    x = _x(*SIZE, seed=2)
    before = _run(converted, x)
    leaf = [m for m in _fused_leaves(converted).leaves if type(m) is FusedConv2d][which]
    with torch.no_grad():
        edit(leaf)
    module_calls[0] = 0
    checks = []
    real_check = cpu_boundary._check
    monkeypatch.setattr(cpu_boundary, "_check", lambda *a: checks.append(1) or real_check(*a))
    after = _run(converted, x)
    if edit is _edit_weight_reassigned:
        # A replaced tensor (its strides may differ) makes the layout boundary check the model again: the edited
        # layer goes through its module (and refolds) in the check's NCHW and channels_last forwards, and the
        # call itself then takes the direct path.
        assert checks == [1] and module_calls[0] == 2
    else:
        assert checks == [] and module_calls[0] == 1  # the edited layer went through its module; the others not
    assert not torch.equal(after, before)
    assert torch.equal(after, _reference(converted, x))
    module_calls[0] = 0
    assert torch.equal(_run(converted, x), after) and module_calls[0] == 0  # direct again, with the new fold


@pytest.mark.parametrize("which", [0, 10, 51], ids=["stem", "in_a_block", "last"])
def test_hook_on_a_fused_leaf_runs(mobilenet, module_calls, which):
    _, converted = mobilenet
    x = _x(*SIZE, seed=3)
    before = _run(converted, x)
    leaf = [m for m in _fused_leaves(converted).leaves if type(m) is FusedConv2d][which]
    seen = []
    handle = leaf.register_forward_hook(lambda m, args, out: seen.append(1) or out * 2.0)
    try:
        module_calls[0] = 0
        hooked = _run(converted, x)
        assert seen == [1] and module_calls[0] == N_FUSED  # a hook anywhere: every fused call is a module call
        assert not torch.equal(hooked, before)
        assert torch.equal(hooked, _reference(converted, x))
    finally:
        handle.remove()
    module_calls[0] = 0
    assert torch.equal(_run(converted, x), before) and module_calls[0] == 0


@pytest.mark.parametrize("register", ["register_full_backward_hook", "register_full_backward_pre_hook",
                                      "register_backward_hook"])
def test_backward_hook_on_a_fused_leaf_keeps_the_direct_path_without_grad(mobilenet, module_calls, register):
    """Without gradients a module call does nothing with its backward hooks, so they leave the direct path on;
    with gradients every call goes through the module and the hook runs in backward."""
    _, converted = mobilenet
    x = _x(*SIZE, seed=3)
    before = _run(converted, x)
    leaf = [m for m in _fused_leaves(converted).leaves if type(m) is FusedConv2d][10]
    seen = []
    handle = getattr(leaf, register)(lambda *args: seen.append(1))
    try:
        module_calls[0] = 0
        assert torch.equal(_run(converted, x), before) and module_calls[0] == 0 and seen == []
        converted(x.clone().requires_grad_()).sum().backward()  # (a fused layer's own weights are frozen)
        assert module_calls[0] == N_FUSED and seen == [1]
    finally:
        handle.remove()
        converted.zero_grad(set_to_none=True)


def test_instance_forward_patched_on_a_leaf(mobilenet, module_calls):
    _, converted = mobilenet
    x = _x(*SIZE, seed=4)
    before = _run(converted, x)
    leaf = [m for m in _fused_leaves(converted).leaves if type(m) is FusedConv2d][0]
    real = leaf.forward
    leaf.forward = lambda *a, **k: real(*a, **k) + 1.0
    module_calls[0] = 0
    patched = _run(converted, x)
    assert not torch.equal(patched, before)
    assert torch.equal(patched, _reference(converted, x))
    del leaf.forward
    assert torch.equal(_run(converted, x), before)


def _resnet18_pair(seed):
    """resnet18 with random BN statistics, converted, an input, and the converted model called on it once."""
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    converted = fusedconv.convert(model)
    x = _x(1, 3, 64, 64, seed=seed)
    _run(converted, x)
    return model, converted, x


def _edits_a_later_layer_then(run, later):
    """An instance-level forward: user code that edits a later fused layer's weight in place, then runs `run`."""
    def forward(*args, **kwargs):
        later.weight.mul_(2.0)
        return run(*args, **kwargs)
    return forward


@pytest.mark.parametrize("leaf_kind", ["torch_layer", "fused_layer"])
def test_instance_forward_editing_a_later_layer_mid_forward_is_seen_on_that_call(module_calls, leaf_kind):
    """An instance-level forward on any leaf is user code running inside the forward: the edit it makes to a
    layer that runs after it must reach that very call's output (a direct call checked before the forward would
    run the stale packed weight); so no call of that forward is direct."""
    model, converted, x = _resnet18_pair(seed=8)
    for m in (model, converted):
        leaf = m.maxpool if leaf_kind == "torch_layer" else m.layer1[0].conv2
        leaf.forward = _edits_a_later_layer_then(leaf.forward, m.layer2[0].conv1)
    with torch.no_grad():  # (the first call after the edit checks the layout boundary again: forward three times)
        assert max_rel_error(_run(converted, x), model(x)) < 1e-4
    module_calls[0] = 0
    for _ in range(2):  # the edit lands every call: each output against the original's, call by call
        with torch.no_grad():
            assert max_rel_error(_run(converted, x), model(x)) < 1e-4
    assert module_calls[0] == 2 * 20  # resnet18: 20 FusedConv2d, every one a module call


def test_class_forward_of_a_torch_leaf_patched_mid_forward_is_seen_on_that_call(module_calls, monkeypatch):
    """A torch.nn leaf class's forward patched (instrumentation does this) is user code inside the forward too."""
    model, converted, x = _resnet18_pair(seed=9)
    later = {id(m.maxpool): m.layer2[0].conv1 for m in (model, converted)}  # each pool edits its own model
    real = nn.MaxPool2d.forward

    def forward(self, *args):
        later[id(self)].weight.mul_(2.0)
        return real(self, *args)

    monkeypatch.setattr(nn.MaxPool2d, "forward", forward)
    with torch.no_grad():  # (the first call after the patch checks the layout boundary again: forward three times)
        assert max_rel_error(_run(converted, x), model(x)) < 1e-4
    module_calls[0] = 0
    for _ in range(2):
        with torch.no_grad():
            assert max_rel_error(_run(converted, x), model(x)) < 1e-4
    assert module_calls[0] == 2 * 20
    monkeypatch.undo()
    with torch.no_grad():  # (and the first after undoing it)
        assert max_rel_error(_run(converted, x), model(x)) < 1e-4
    module_calls[0] = 0
    with torch.no_grad():
        assert max_rel_error(_run(converted, x), model(x)) < 1e-4
    assert module_calls[0] == 0  # direct again


_EDITED_BY_WRAPPED: dict = {}  # which layer `_wrapped_edit` edits, per model (by the id of the model's pool)


def _wrapped_edit(x, pool_id):
    """User code torch.fx keeps as one call in the graph (torch.fx.wrap below): it edits a later layer."""
    _EDITED_BY_WRAPPED[pool_id].weight.mul_(2.0)
    return x


torch.fx.wrap("_wrapped_edit")


class _WrappedCallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.head(_wrapped_edit(self.stem(x), id(self)))


def test_user_function_the_graph_calls_makes_the_forward_impure(module_calls):
    """A function torch.fx.wrap keeps as a call is user code inside the flat forward: no direct calls there."""
    model = randomize_bn(_WrappedCallNet()).eval()
    converted = fusedconv.convert(model)
    assert flat_check(converted) is not None and not _fused_leaves(converted).pure
    x = _x(1, 3, 16, 16, seed=10)
    _EDITED_BY_WRAPPED[id(converted)] = nn.Conv2d(1, 1, 1)
    _run(converted, x)  # the first call of a signature runs forward three times (fusedconv/cpu_boundary.py)
    for m in (model, converted):
        _EDITED_BY_WRAPPED[id(m)] = m.head[0]
    module_calls[0] = 0
    for _ in range(2):
        with torch.no_grad():
            assert max_rel_error(_run(converted, x), model(x)) < 1e-4
    assert module_calls[0] == 2 * 2


class _StochasticDepthNet(_WrappedCallNet):
    def __init__(self):
        super().__init__()
        self.drop = torchvision.ops.StochasticDepth(0.2, "row")

    def forward(self, x):
        return self.head(self.drop(self.stem(x)))


def test_library_function_the_graph_calls_keeps_the_forward_pure():
    """torchvision's stochastic_depth (EfficientNetV2's blocks), which torch.fx keeps as a call, is not user code."""
    converted = fusedconv.convert(randomize_bn(_StochasticDepthNet()).eval())
    assert "torchvision_ops_stochastic_depth_stochastic_depth" in guard_table(converted).entries[0].src
    assert _fused_leaves(converted).pure


class _EditOnPool(TorchFunctionMode):
    """User code run on every torch function of the forward: on the max pool, doubles a later layer's weight."""

    def __init__(self, later):
        super().__init__()
        self.later = later

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if "max_pool2d" in getattr(func, "__name__", ""):
            self.later.weight.mul_(2.0)
        return func(*args, **(kwargs or {}))


class _RebindOnPool(TorchDispatchMode):
    """User code run on every aten op: on the max pool, replaces a later layer's weight by twice it (an in-place
    write here would move no version counter: the documented `.data`-like case that `fusedconv.refresh` is for)."""

    def __init__(self, later):
        super().__init__()
        self.later = later

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "max_pool2d" in str(func):
            self.later.weight = nn.Parameter(self.later.weight * 2.0, requires_grad=False)
        return func(*args, **(kwargs or {}))


class _EditingTensor(torch.Tensor):
    """An input whose first op edits a later layer (`_SUBCLASS_EDITS`), and whose ops return plain tensors."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunction():
            for t in _SUBCLASS_EDITS.pop("weights", ()):
                t.mul_(2.0)
            out = func(*args, **(kwargs or {}))
        return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out


_SUBCLASS_EDITS: dict = {}


@pytest.mark.parametrize("mode", [_EditOnPool, _RebindOnPool])
def test_mode_editing_a_later_layer_mid_forward_is_seen_on_that_call(module_calls, mode):
    """A torch function or dispatch mode runs user code on every op of the forward: an edit it makes to a later
    layer must reach that call's output, so no call under a mode is direct; after the mode, calls are direct."""
    model, converted, x = _resnet18_pair(seed=11)
    module_calls[0] = 0
    for _ in range(2):
        with torch.no_grad():
            with mode(model.layer2[0].conv1):
                ref = model(x)
            with mode(converted.layer2[0].conv1):
                out = converted(x)
        assert max_rel_error(out, ref) < 1e-4
    assert module_calls[0] == 2 * 20  # resnet18: 20 FusedConv2d, every one a module call
    # (A weight the mode replaced makes the layout boundary check the model again on the next call, whose check
    # forwards go through the edited module: that call first.)
    _run(converted, x)
    module_calls[0] = 0
    with torch.no_grad():
        assert max_rel_error(_run(converted, x), model(x)) < 1e-4
    assert module_calls[0] == 0


def test_default_device_mode_keeps_the_direct_calls(module_calls):
    """`with torch.device(...)` (and torch.set_default_device) install torch's own DeviceContext mode, which only
    fills in factory functions' device: not user code, the calls stay direct."""
    model, converted, x = _resnet18_pair(seed=12)
    module_calls[0] = 0
    with torch.device("cpu"), torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-4
    assert module_calls[0] == 0


def test_tensor_subclass_input_running_code_mid_forward_is_seen_on_that_call(module_calls):
    """A tensor subclass's __torch_function__ runs on the ops its instances take part in: user code inside the
    forward, even when it hands plain tensors on."""
    model, converted, x = _resnet18_pair(seed=13)
    module_calls[0] = 0
    for _ in range(2):
        with torch.no_grad():
            _SUBCLASS_EDITS["weights"] = [model.layer2[0].conv1.weight]
            ref = model(x.as_subclass(_EditingTensor))
            _SUBCLASS_EDITS["weights"] = [converted.layer2[0].conv1.weight]
            out = converted(x.as_subclass(_EditingTensor))
        assert not _SUBCLASS_EDITS and type(out) is torch.Tensor
        assert max_rel_error(out, ref) < 1e-4
    assert module_calls[0] == 2 * 20


def test_plain_arguments():
    t = torch.zeros(1)
    sub = t.as_subclass(_EditingTensor)
    assert flat_fused.plain_arguments((t, None, 3, 0.5, "a", [t, (t, 2)], {"k": t}, torch.Size([1])))
    for bad in (sub, [t, sub], (t, [sub]), {"k": sub}, nn.Parameter(t), object()):
        assert not flat_fused.plain_arguments((t, bad)), bad


def test_class_forward_patched(mobilenet, module_calls, monkeypatch):
    _, converted = mobilenet
    x = _x(*SIZE, seed=5)
    before = _run(converted, x)
    real = FusedConv2d.forward
    monkeypatch.setattr(FusedConv2d, "forward", lambda self, *a, **k: real(self, *a, **k) * 0.5)
    module_calls[0] = 0
    patched = _run(converted, x)
    assert module_calls[0] == N_FUSED
    assert not torch.equal(patched, before)


@pytest.mark.parametrize("switch", ["cpu_disabled", "use_kernel_patched"])
def test_switches_send_calls_to_the_module(mobilenet, module_calls, monkeypatch, switch):
    _, converted = mobilenet
    x = _x(*SIZE, seed=6)
    direct = _run(converted, x)
    if switch == "cpu_disabled":
        monkeypatch.setattr(cpu, "enabled", False)
    else:
        monkeypatch.setattr(ops, "use_kernel", lambda x, w: False)
    module_calls[0] = 0
    y = _run(converted, x)
    assert module_calls[0] == N_FUSED
    assert max_rel_error(y, direct) < 1e-4


def test_grad_mode_takes_the_module_path(mobilenet, module_calls):
    model, converted = mobilenet
    x = _x(*SIZE, seed=7)
    module_calls[0] = 0
    y = converted(x)  # no torch.no_grad(): the parameters require grad
    assert module_calls[0] == N_FUSED
    assert y.requires_grad
    y.sum().backward()
    assert max_rel_error(y.detach(), _run(converted, x)) < 1e-4


def test_new_input_size_then_direct(mobilenet, module_calls):
    _, converted = mobilenet
    x = _x(1, 3, 72, 80, seed=8)
    module_calls[0] = 0
    y = _run(converted, x)
    assert module_calls[0] > 0  # the new signatures are validated and routed by the modules
    assert torch.equal(y, _reference(converted, x))
    module_calls[0] = 0
    assert torch.equal(_run(converted, x), y) and module_calls[0] == 0
    module_calls[0] = 0
    _run(converted, _x(*SIZE))  # the first size is still routed
    assert module_calls[0] == 0


def test_float64_input_goes_through_the_modules(mobilenet, module_calls):
    model, converted = mobilenet
    x = _x(*SIZE, seed=9, dtype=torch.float64)
    reference = copy.deepcopy(converted).double()
    module_calls[0] = 0
    with torch.no_grad():
        y = reference(x)
        # Folded in float32 by convert, then cast: float32's rounding of scale / shift, not a mistake's O(1).
        assert max_rel_error(y, copy.deepcopy(model).double()(x)) < 1e-6
    assert module_calls[0] >= N_FUSED


def test_copies_are_direct_and_independent(mobilenet, module_calls):
    _, converted = mobilenet
    x = _x(*SIZE, seed=10)
    y = _run(converted, x)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(converted), torch.load(buffer, weights_only=False)):
        assert torch.equal(_run(twin, x), y)  # first call: the copy's modules route and pack
        module_calls[0] = 0
        assert torch.equal(_run(twin, x), y) and module_calls[0] == 0
        leaf = [m for m in _fused_leaves(twin).leaves if type(m) is FusedConv2d][3]
        with torch.no_grad():
            leaf.weight.mul_(3.0)
        assert not torch.equal(_run(twin, x), y)
        assert torch.equal(_run(converted, x), y)


def _routed_conv(residual_shape):
    torch.manual_seed(0)
    m = FusedConv2d(torch.randn(8, 4, 3, 3), torch.rand(8) + 0.5, torch.randn(8), padding=1, activation="relu")
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    r = torch.randn(*residual_shape).contiguous(memory_format=torch.channels_last)
    return m, x, r


def test_fused_call_unrouted_residual_goes_to_the_module():
    m, x, r = _routed_conv((1, 8, 6, 6))
    with torch.no_grad():
        expected = m(x, r)
        state = m._cpu_state
        assert torch.equal(flat_fused.fused_call(state, m, x, r), expected)
        # A residual of another shape, which no route was made for: the module call, which adds it as the original
        # modules would broadcast it (its unfused path), not oneDNN's route for the routed shape.
        small = torch.randn(1, 8, 1, 1).contiguous(memory_format=torch.channels_last)
        want = torch.relu(F.conv2d(x.double(), m.weight.double(), None, 1, 1) * m.scale.double().view(1, -1, 1, 1)
                          + m.shift.double().view(1, -1, 1, 1) + small.double())
        assert max_rel_error(flat_fused.fused_call(state, m, x, small), want) < 1e-5
        with pytest.raises(ValueError, match="residual"):  # one that does not broadcast: the module's check
            flat_fused.fused_call(state, m, x, torch.randn(1, 8, 1, 2).contiguous(memory_format=torch.channels_last))


def test_fused_call_nchw_input_keeps_the_module_route():
    m, x, _ = _routed_conv((1, 8, 6, 6))
    with torch.no_grad():
        m(x)
        y = flat_fused.fused_call(m._cpu_state, m, x.contiguous())
    assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_error(y, m(x.contiguous())) == 0


def test_impure_graph_has_no_direct_calls():
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    m = FusedConv2d(torch.randn(4, 4, 1, 1), torch.ones(4), torch.zeros(4))
    leaves = flat_fused.FusedLeaves((m, Custom()), (0,), frozenset(), flat_fused.pure_leaf(Custom()))
    with torch.no_grad():
        m(torch.randn(1, 4, 2, 2).contiguous(memory_format=torch.channels_last))
        assert leaves.states() == (None, None)
        relu = nn.ReLU()
        pure = flat_fused.FusedLeaves((m, relu), (0,), frozenset(), True)
        assert pure.states() == (m._cpu_state, None)
        relu.__class__ = type("ReLUWithUserCode", (nn.ReLU,), {"forward": lambda self, x: x * 2})
        assert pure.states() == (None, None)  # a leaf no longer of its pure class: no direct call anywhere


def test_leaves_of_unimportable_classes_are_not_pure_and_pickle():
    # A guarded subclass convert makes carries its original's name but is not that class: not pure, and the
    # FusedLeaves holding it must still pickle (it keeps no class objects for a graph that is not pure).
    Local = type("ReLU", (nn.ReLU,), {"__module__": "torch.nn.modules.activation"})
    m = FusedConv2d(torch.randn(4, 4, 1, 1), torch.ones(4), torch.zeros(4))
    assert not flat_fused.pure_leaf(Local()) and flat_fused.pure_leaf(nn.ReLU()) and flat_fused.pure_leaf(m)
    leaves = flat_fused.FusedLeaves((m, nn.ReLU()), (0,), frozenset(), False)
    copied = copy.deepcopy(leaves)
    assert copied.states() == (None, None) and copied.leaves[0] is not m
    buffer = io.BytesIO()
    torch.save(leaves, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).states() == (None, None)


class _SmallNet(nn.Module):
    """Convs small enough for the F.conv2d routes at 16x16 (cpu.small_conv_macs), a residual block included."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())

    def forward(self, x):
        s = self.stem(x)
        return self.head(torch.relu(self.conv2(self.conv1(s)) + s))


@pytest.mark.parametrize("case", ["nchw_small", "channels_last_small", "float64"])
def test_f_conv2d_routes_called_directly_and_exact(case, module_calls, monkeypatch):
    """Convs the modules route to F.conv2d (NCHW input where the boundary keeps NCHW, small convs on channels_last,
    float64) run that route from the flat graph too (`cpu.folded_call`), with the module call's exact result."""
    monkeypatch.setattr(cpu, "small_conv_macs", 4_000_000)  # the default, over this file's onednn_small_convs
    torch.manual_seed(0)
    model = randomize_bn(_SmallNet()).eval()
    dtype = torch.float64 if case == "float64" else torch.float32
    converted = fusedconv.convert(copy.deepcopy(model).to(dtype), reparameterize=False)
    x = _x(1, 3, 16, 16, dtype=dtype)
    if case == "channels_last_small":
        x = x.contiguous(memory_format=torch.channels_last)
    _run(converted, x)  # routes every layer (and checks the layout boundary)
    routes = {r for m in converted.modules() if type(m) is FusedConv2d for r in m._cpu_state.routes.values()}
    assert routes <= {cpu.FOLDED, cpu.FOLDED_CL} and not any(cpu.routes_onednn(m) for m in converted.modules())
    module_calls[0] = 0
    y = _run(converted, x)
    assert module_calls[0] == 0 and guard_table(converted).fallback_calls == 0
    ref = _reference(converted, x)
    assert module_calls[0] == 4  # the reference went through the modules
    assert torch.equal(y, ref) and y.stride() == ref.stride()
    with torch.no_grad():
        assert max_rel_error(y.double(), copy.deepcopy(model).double()(x.double())) < 1e-5
    # An edit after the forward is seen by the next direct call.
    with torch.no_grad():
        for m in converted.modules():
            if type(m) is FusedConv2d:
                m.scale.mul_(-1.25)
                break
        model_edit = _reference(converted, x)
    assert torch.equal(_run(converted, x), model_edit) and not torch.equal(model_edit, ref)


class _SplitNet(nn.Module):
    """A Res2Net-like split: each half of a channels_last tensor (a view dense in neither layout) into its own
    small conv + BN + ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):
        s = self.stem(x)
        left, right = torch.split(s, 16, dim=1)
        return torch.cat([self.a(left), self.b(right)], 1)


def test_small_convs_on_channel_slices_called_directly_and_exact(module_calls, monkeypatch):
    """The channel slices' small convs (cpu.FOLDED_COPY: a channels_last copy, then F.conv2d) run from the flat
    graph too (`cpu.copied_folded_call`), with the module call's exact result."""
    monkeypatch.setattr(cpu, "small_conv_macs", 4_000_000)  # the default, over this file's onednn_small_convs
    torch.manual_seed(0)
    model = randomize_bn(_SplitNet()).eval()
    converted = fusedconv.convert(copy.deepcopy(model), reparameterize=False)
    x = _x(1, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    _run(converted, x)
    routes = [m._cpu_state.routes[next(reversed(m._cpu_state.routes))] for m in (converted.a[0], converted.b[0])]
    assert routes == [cpu.FOLDED_COPY] * 2
    module_calls[0] = 0
    y = _run(converted, x)
    assert module_calls[0] == 0
    ref = _reference(converted, x)
    assert module_calls[0] == 3
    assert torch.equal(y, ref) and y.stride() == ref.stride()
    with torch.no_grad():
        assert max_rel_error(y.double(), copy.deepcopy(model).double()(x.double())) < 1e-5
