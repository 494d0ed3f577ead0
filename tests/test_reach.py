"""An armed converted model (fusedconv/graph/reach.py): convert's private copy skips the per-forward checks of its
modules and tensors until some code reaches into it, and every way in escapes it for good, so an edit made through
any of them is seen by the next forward. Each edit is made through one way in on the converted model and the same
edit on the original; both are compared in float64."""

from __future__ import annotations

import copy
import io
import os
import pickle
import sys

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.graph import reach  # noqa: E402
from fusedconv.graph.flat import flat_check  # noqa: E402
from fusedconv.graph.held_outputs import returns_held  # noqa: E402

torchvision = pytest.importorskip("torchvision")

# float64 proves the same function; float32 is where the fused layers' derived state (the folded weights, oneDNN's
# packed copies) is cached between calls, which a forward that skipped its checks would reuse after an edit. Every
# edit below changes the output by far more than the float32 tolerance (`_same` checks that too).
TOL = {torch.float64: 1e-12, torch.float32: 1e-4}


def _x(seed=0, dtype=torch.float64):
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _resnet18():
    return randomize_bn(torchvision.models.resnet18(weights=None)).eval().double()


@pytest.fixture(scope="module")
def original():
    return _resnet18()


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def pair(original, request):
    """(the original, its converted model after two forwards, both in float64 or both in float32)."""
    m = copy.deepcopy(original).to(request.param)
    fc = fusedconv.convert(m)
    with torch.no_grad():
        fc(_x(dtype=request.param)), fc(_x(dtype=request.param))
    assert reach.armed(fc) is not None
    m.before = _outputs(m, request.param)  # (a plain attribute of the original: its output before any edit)
    return m, fc


def _outputs(model, dtype, x=None):
    with torch.no_grad():
        return model(_x(1, dtype) if x is None else x.to(dtype))


def _same(m, fc, x=None, edited: bool = True) -> bool:
    """The converted model computes what the (edited) original does, and the edit changed the output."""
    dtype = next(m.parameters()).dtype  # (the original's: reading the converted model's would reach into it)
    ref = _outputs(m, dtype, x)
    before = getattr(m, "before", None)
    assert not edited or before is None or x is not None or max_rel_error(before, ref) > 100 * TOL[torch.float32]
    return max_rel_error(_outputs(fc, dtype, x), ref) < TOL[dtype]


def test_convert_arms_its_copy_and_keeps_it_armed_over_forwards(original):
    fc = fusedconv.convert(copy.deepcopy(original))
    assert reach.armed(fc) is not None
    assert type(fc).__name__ == "ResNet" and isinstance(fc, torchvision.models.ResNet)
    for seed in range(3):
        assert _same(original, fc, _x(seed))
    assert reach.armed(fc) is not None
    assert flat_check(fc) is not None  # (reading the check reaches into the model)
    assert reach.armed(fc) is None


def test_not_armed_in_place_frozen_or_unflattened(original):
    assert reach.armed(fusedconv.convert(copy.deepcopy(original), inplace=True)) is None
    assert reach.armed(fusedconv.convert(original, flatten=False)) is None
    frozen = fusedconv.convert(original, freeze=True)
    assert reach.armed(frozen) is None and reach.armed(frozen._model) is None


def _scale_conv1(conv):
    with torch.no_grad():
        conv.weight.mul_(1.5)


# Each way in hands back layer1[0].conv1 (or its weight): the edit goes through what it returned.
WAYS_IN = {
    "attribute": lambda m: m.layer1[0].conv1,
    "_modules": lambda m: m._modules["layer1"]._modules["0"].conv1,
    "vars": lambda m: vars(m)["_modules"]["layer1"][0].conv1,
    "__dict__": lambda m: m.__dict__["_modules"]["layer1"][0].conv1,
    "getattr": lambda m: getattr(m, "layer1")[0].conv1,
    "get_submodule": lambda m: m.get_submodule("layer1.0.conv1"),
    "modules": lambda m: dict(m.named_modules())["layer1.0.conv1"],
    "children": lambda m: list(m.children())[4][0].conv1,
    "apply": lambda m: _applied(m),
    "copy.copy": lambda m: copy.copy(m).layer1[0].conv1,
}


def _applied(m):
    seen = []
    m.apply(seen.append)
    return next(s for s in seen if s is m.get_submodule("layer1.0.conv1"))


@pytest.mark.parametrize("way", sorted(WAYS_IN))
def test_an_edit_through_any_way_in_is_seen(pair, way):
    m, fc = pair
    conv = WAYS_IN[way](fc)
    assert reach.armed(fc) is None  # escaped, for good
    _scale_conv1(conv)
    _scale_conv1(m.layer1[0].conv1)
    assert _same(m, fc)


def _shift_bn1(m):
    with torch.no_grad():
        m.layer1[0].bn1.bias.add_(0.5)  # what adding 0.5 to the fused layer's shift computes


# Each way in hands back a tensor of layer1[0].conv1 (the fused layer: weight, and shift = BN bias - mean * scale),
# edited in place; `mirror` makes the same edit on the original.
TENSOR_WAYS = {
    "parameters": (lambda m: dict(m.named_parameters())["layer1.0.conv1.weight"], lambda t: t.mul_(1.5),
                   lambda m: _scale_conv1(m.layer1[0].conv1)),
    "state_dict": (lambda m: m.state_dict()["layer1.0.conv1.weight"], lambda t: t.mul_(1.5),
                   lambda m: _scale_conv1(m.layer1[0].conv1)),
    "buffers": (lambda m: dict(m.named_buffers())["layer1.0.conv1.shift"], lambda t: t.add_(0.5), _shift_bn1),
}


@pytest.mark.parametrize("way", sorted(TENSOR_WAYS))
def test_an_in_place_tensor_edit_through_any_way_in_is_seen(pair, way):
    m, fc = pair
    get, edit, mirror = TENSOR_WAYS[way]
    t = get(fc)
    assert reach.armed(fc) is None
    with torch.no_grad():
        edit(t)
    mirror(m)
    assert _same(m, fc)


def test_module_replaced_and_hook_registered_are_seen(pair):
    m, fc = pair
    for model in (m, fc):
        model.layer2[0].relu = nn.Hardtanh(0.0, 0.5)
    assert _same(m, fc)
    for model in (m, fc):
        model.layer3.register_forward_hook(lambda mod, args, out: out * 2)
    assert _same(m, fc)


def test_a_root_hook_editing_the_model_each_call_is_seen(pair):
    m, fc = pair

    def hook(model, args):
        with torch.no_grad():
            model.layer4[1].conv2.weight.mul_(1.1)

    for model in (m, fc):
        model.register_forward_pre_hook(hook)
    for seed in range(3):
        assert _same(m, fc, _x(seed))


def test_a_forward_with_gradients_escapes(pair):
    m, fc = pair
    y = fc(_x(dtype=m.before.dtype))
    assert reach.armed(fc) is None
    # autograd hands the parameters out: an edit through them is seen
    stack, leaves = [y.grad_fn], []
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if hasattr(nxt, "variable"):
                leaves.append(nxt.variable)
            else:
                stack.append(nxt)
    weight = next(v for v in leaves if v is fc.fc.weight)  # (the fused layers' tensors need no gradient)
    for w in (weight, m.fc.weight):
        with torch.no_grad():
            w.mul_(1.5)
    assert _same(m, fc)


class _Watcher(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("how", ["mode", "subclass", "global_hook", "other_input"])
def test_a_forward_others_see_into_escapes(pair, how):
    m, fc = pair
    x = _x(dtype=m.before.dtype)
    with torch.no_grad():
        if how == "mode":
            with _Watcher():
                fc(x)
        elif how == "subclass":
            fc(x.as_subclass(_Sub))
        elif how == "global_hook":
            handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: None)
            try:
                fc(x)
            finally:
                handle.remove()
        else:
            fc(torch.randn(2, 3, 48, 40, dtype=x.dtype))  # another signature, which the flat guard covers
    if how == "other_input":
        assert reach.armed(fc) is not None  # a new input signature is no reach
    else:
        assert reach.armed(fc) is None
    assert _same(m, fc, edited=False)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


class Keeper(nn.Module):
    """A forward that hands one of its modules out on request (a call the flat forward does not cover)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block()
        self.store = []

    def forward(self, x, keep: bool = False):
        y = self.block(self.stem(x))
        if keep:
            self.store.append(self.block.conv)
        return y


def test_a_call_the_flat_forward_does_not_cover_escapes():
    m = randomize_bn(Keeper()).eval().double()
    fc = fusedconv.convert(m)
    assert reach.armed(fc) is not None
    with torch.no_grad():
        fc(_x(), keep=True)
    assert reach.armed(fc) is None
    _scale_conv1(fc.store[0])
    _scale_conv1(m.block.conv)
    assert _same(m, fc)


def test_copies_and_pickles_are_not_armed_and_the_original_escapes(pair):
    m, fc = pair
    dup = copy.deepcopy(fc)
    assert reach.armed(dup) is None and reach.armed(fc) is None
    fc2 = fusedconv.convert(copy.deepcopy(m))
    buf = io.BytesIO()
    torch.save(fc2, buf)
    assert reach.armed(fc2) is None
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert reach.armed(loaded) is None
    for model in (dup, loaded, pickle.loads(pickle.dumps(fc))):
        _scale_conv1(model.layer1[0].conv1)
    _scale_conv1(m.layer1[0].conv1)
    for model in (dup, loaded):
        assert _same(m, model)
    assert reach.armed(fc2) is None and _same(m, fc2, edited=False) is False  # (fc2 was not edited)


def test_refresh_escapes(pair):
    m, fc = pair
    fusedconv.refresh(fc)
    assert reach.armed(fc) is None
    assert _same(m, fc, edited=False)


class Anchors(nn.Module):
    """Returns a buffer (a view of it): the caller holds a way into the model without reaching in."""

    def __init__(self, view: bool):
        super().__init__()
        self.view = view
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block()
        self.register_buffer("anchors", torch.randn(4, 2))

    def forward(self, x):
        y = self.block(self.stem(x))
        return y, (self.anchors.view(2, 4) if self.view else self.anchors)


@pytest.mark.parametrize("view", [False, True])
def test_a_model_returning_a_tensor_it_holds_is_not_armed(view):
    m = randomize_bn(Anchors(view)).eval().double()
    fc = fusedconv.convert(m)
    assert flat_check(fc) is not None and flat_check(fc).returns_held
    fc2 = fusedconv.convert(m)
    assert reach.armed(fc2) is None
    with torch.no_grad():
        _, anchors = fc2(_x())
        anchors.mul_(2)  # an edit of the model through its output
        m.anchors.mul_(2)
        assert torch.equal(fc2(_x())[1], m(_x())[1])


def test_returns_held_follows_views_not_new_tensors():
    import torch.fx as fx

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.ones(3))

        def forward(self, x):
            return x + self.b, (self.b + 0 * x.sum(), self.b.unsqueeze(0).contiguous())

    net = Net()
    gm = fx.symbolic_trace(net)
    assert returns_held(gm.graph, gm)

    class Fresh(Net):
        def forward(self, x):
            return x + self.b, (self.b * x.sum()).unsqueeze(0)

    gm = fx.symbolic_trace(Fresh())
    assert not returns_held(gm.graph, gm)


def test_a_model_with_hooked_modules_is_not_armed(original):
    m = copy.deepcopy(original)
    m.layer1[0].register_forward_hook(lambda mod, args, out: None)
    assert reach.armed(fusedconv.convert(m)) is None


def test_the_layout_boundary_first_call_is_no_reach(original):
    fc = fusedconv.convert(copy.deepcopy(original).float())
    x = _x(dtype=torch.float32)
    with torch.no_grad():
        fc(x)
    assert reach.armed(fc) is not None
    assert fusedconv.cpu_boundary.layout_used(fc, x) in ("channels_last", "NCHW")
    assert reach.armed(fc) is not None


def test_the_layout_boundary_check_under_a_tracer_escapes(original):
    """A debugger or profiler runs user code between any two lines of fusedconv's own reads of the model."""
    fc = fusedconv.convert(copy.deepcopy(original).float())
    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: None)
    try:
        with torch.no_grad():
            fc(_x(dtype=torch.float32))
    finally:
        sys.settrace(previous)
    assert reach.armed(fc) is None


def test_a_compiled_function_editing_the_model_escapes_it(original):
    m = copy.deepcopy(original).float()
    fc = fusedconv.convert(copy.deepcopy(m))
    x = _x(dtype=torch.float32)
    with torch.no_grad():
        fc(x), fc(x)
    assert reach.armed(fc) is not None

    def edit(model):
        model.layer1[0].conv1.weight.mul_(1.5)

    with torch.no_grad():
        torch.compile(edit, backend="eager")(fc)
        m.layer1[0].conv1.weight.mul_(1.5)
    assert reach.armed(fc) is None
    assert _same(m, fc, edited=False)


def test_repr_and_eval_of_an_eval_model_are_no_reach(original):
    fc = fusedconv.convert(copy.deepcopy(original))
    assert "FusedConv2d" in repr(fc) and reach.armed(fc) is not None
    assert fc.eval() is fc and fc.train(False) is fc and reach.armed(fc) is not None
    fc.train()  # flags change: a reach
    assert reach.armed(fc) is None and fc.training and fc.layer1[0].conv1.training


def test_eval_with_a_module_in_training_mode_is_a_reach(original):
    m = copy.deepcopy(original)
    m.layer1[0].bn1.train()  # (test-time adaptation: convert leaves a training-mode BN as it is)
    fc = fusedconv.convert(m)
    if reach.armed(fc) is None:
        pytest.skip("not armed")  # (a training-mode module keeps its own forward: no flat graph over it)
    fc.eval()
    assert reach.armed(fc) is None and not fc.layer1[0].bn1.training


# A conversion that changes the model's values in place of its tensors but leaves dtypes and layout as they were
# (float64: through float32 and back; float32: through float16 and back), so states kept from before it would still
# fit every call's signature and compute with the old values.
CONVERSIONS = {
    "to": lambda m, dtype: m.to(torch.float32 if dtype == torch.float64 else torch.float16).to(dtype),
    "float_double": lambda m, dtype: (m.float().double() if dtype == torch.float64 else m.half().float()),
    "to_channels_last": lambda m, dtype: m.to(memory_format=torch.channels_last).to(
        torch.float32 if dtype == torch.float64 else torch.float16).to(dtype),
}


@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
def test_a_conversion_keeps_the_model_armed_and_its_forwards_use_the_converted_tensors(pair, conversion):
    m, fc = pair
    dtype = next(m.parameters()).dtype
    twin = fusedconv.convert(copy.deepcopy(m))
    vars(twin)  # a reach: the twin runs its full checks on every call (the reference)
    x = _x(1, dtype)
    before = _outputs(fc, dtype, x)
    for model in (fc, twin):
        assert CONVERSIONS[conversion](model, dtype) is model
    assert reach.armed(fc) is not None and reach.armed(twin) is None
    for _ in range(3):  # the third forward runs on the states kept anew
        after = _outputs(fc, dtype, x)
        assert max_rel_error(after, _outputs(twin, dtype, x)) < TOL[dtype]
    # The conversion changed the output by more than the tolerance: states kept from before it would be caught.
    assert max_rel_error(before, after) > 3 * TOL[dtype]
    assert reach.armed(fc) is not None
    _scale_conv1(fc.layer1[0].conv1)  # a reach after the conversion escapes as before
    _scale_conv1(twin.layer1[0].conv1)
    assert reach.armed(fc) is None and max_rel_error(_outputs(fc, dtype, x), _outputs(twin, dtype, x)) < TOL[dtype]


def test_requires_grad_false_keeps_the_model_armed(pair):
    m, fc = pair
    assert fc.requires_grad_(False) is fc and reach.armed(fc) is not None
    assert _same(m, fc, edited=False)


class OwnApply(nn.Module):
    """A module whose `_apply` is user code (it sees every tensor the conversion makes)."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.seen.append(self.conv)
        return out

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Marked(torch.Tensor):
    """A tensor subclass: a buffer of this type sees the conversion's ops on it (its __torch_function__)."""

    def __deepcopy__(self, memo):
        return self.as_subclass(torch.Tensor).clone().as_subclass(Marked)


def _with_marked_buffer():
    m = _resnet18()
    m.register_buffer("marker", torch.zeros(1).as_subclass(Marked))
    return m


@pytest.mark.parametrize("case", ["own_apply", "subclass_buffer", "mode", "class_to"])
def test_a_conversion_that_runs_user_code_escapes(case):
    if case == "own_apply":
        m = randomize_bn(nn.Sequential(OwnApply(), nn.Conv2d(8, 8, 1))).eval().double()
    elif case == "subclass_buffer":
        m = _with_marked_buffer().eval()
    else:
        m = _resnet18()
    if case == "class_to":
        # A class with its own to(): user code over the model, so the conversion is a reach like any other.
        m.__class__ = type("OwnTo", (type(m),), {"to": lambda self, *a, **k: nn.Module.to(self, *a, **k)})
    fc = fusedconv.convert(m)
    x = _x(0)
    with torch.no_grad():
        fc(x), fc(x)
    if reach.armed(fc) is None:
        pytest.skip("not armed")
    if case == "mode":
        with _Watcher():
            fc.to(torch.float64)
    else:
        fc.to(torch.float64)
    assert reach.armed(fc) is None
