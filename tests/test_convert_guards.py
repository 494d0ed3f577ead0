"""Guarded rewrites: a converted block computes the original function for every way it is called.

Each block is converted in float64 (random BN statistics) and then called in every way its users may call
it, including the patterns no trace saw and after flipping attributes, and compared with the original block
called the same way. `fallback_calls` tells whether a call took the block's own forward (exact, slower).
"""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import batch_norm_count, count_ops, max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import FusedConv2d  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402

TOL = 1e-12  # float64: a real mistake shows as O(1)


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _convert(model):
    model = randomize_bn(model).double().eval()
    converted, report = fusedconv.convert(model, return_report=True, reparameterize=False)
    return model, converted, report


@torch.no_grad()
def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert max_rel_error(a, b) < TOL
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)


def _fallbacks(model) -> int:
    return sum(guard_table(m).fallback_calls for m in model.modules() if guard_table(m) is not None)


def _fused(report) -> list[str]:
    return [r.detail for r in report.fused]


class OptionalSkip(nn.Module):
    """`if skip is None: skip = x` (DLA's DlaBasic form): the add exists in both patterns."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x, skip=None):
        if skip is None:
            skip = x
        return self.relu(self.bn(self.conv(x)) + skip)


class OptionalAdd(nn.Module):
    """`if skip is not None: out = out + skip`: the add exists only when skip is given."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, x, skip=None):
        out = self.bn(self.conv(x))
        if skip is not None:
            out = out + skip
        return self.act(out)


@pytest.mark.parametrize("block", [OptionalSkip, OptionalAdd])
def test_optional_argument_passed_not_passed_and_by_keyword(block):
    original, converted, report = _convert(block())
    x, s = _t(2, 6, 8, 8), _t(2, 6, 8, 8, seed=1)
    assert isinstance(converted, block) and report.fused
    for args, kwargs in [((x,), {}), ((x, s), {}), ((x,), {"skip": s}), ((x, None), {}), ((x,), {"skip": None})]:
        _same(converted(*args, **kwargs), original(*args, **kwargs))
    assert report.guards and report.guards[0][1] == block.__name__


def test_is_none_form_fuses_the_add_for_both_patterns():
    original, converted, report = _convert(OptionalSkip())
    assert _fused(report) == ["bn+add+relu"] and converted.conv.residual_required
    x = _t(1, 6, 8, 8)
    converted(x), converted(x, x * 2)
    assert _fallbacks(converted) == 0  # both patterns traced: no call needs the slow path
    assert batch_norm_count(count_ops(converted, x)) == 0


def test_is_not_none_form_takes_the_exact_fallback_for_the_other_pattern():
    original, converted, report = _convert(OptionalAdd())
    x, s = _t(1, 6, 8, 8), _t(1, 6, 8, 8, seed=1)
    _same(converted(x, s), original(x, s))  # the traced pattern (skip given): fused with the add
    assert _fallbacks(converted) == 0
    _same(converted(x), original(x))  # no add: the block's own forward over role children
    assert _fallbacks(converted) == 1


class TwoWays(nn.Module):
    """The same block instance called with and without its optional argument in one forward."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        a = self.block(x)
        return self.block(a, x)


@pytest.mark.parametrize("block", [OptionalSkip, OptionalAdd])
def test_same_instance_called_two_ways(block):
    original, converted, _ = _convert(TwoWays(block()))
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))


class Flagged(nn.Module):
    """A plain attribute read by forward, flipped after convert."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.use_residual = True
        self.scale = 1.0

    def forward(self, x):
        y = self.bn(self.conv(x)) * self.scale
        if self.use_residual:
            y = y + x
        return self.relu(y)

    def describe(self):
        return f"Flagged(use_residual={self.use_residual})"


def test_flag_attribute_flipped_after_convert():
    original, converted, report = _convert(Flagged())
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))
    assert "self.use_residual=True" in report.guards[0][2][0]
    assert "guarded: <root> (Flagged)" in str(report) and report.to_dict()["guards"][0]["class"] == "Flagged"
    for m in (original, converted):
        m.use_residual = False
        m.scale = 0.5
    _same(converted(x), original(x))
    assert _fallbacks(converted) == 1
    assert converted.describe() == "Flagged(use_residual=False)"  # its own methods still work


class Downsampled(nn.Module):
    """torchvision-style `self.downsample is None`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.downsample = None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn(self.conv(x)) + identity)


def test_downsample_none_style_block_and_a_submodule_set_after_convert():
    original, converted, report = _convert(Downsampled())
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))
    assert any("self.downsample is None" in g for g in report.guards[0][2])
    ds = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
    randomize_bn(ds.double().eval(), seed=3)
    original.downsample, converted.downsample = ds, copy.deepcopy(ds)
    _same(converted(x), original(x))
    assert _fallbacks(converted) == 1


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()

    def forward(self, x, *, gain=1.0, activate=True, mode="sum"):
        y = self.bn(self.conv(x)) * gain
        if mode == "sum":
            y = y + x
        return self.act(y) if activate else y


def test_keyword_only_non_tensor_arguments():
    original, converted, _ = _convert(KeywordOnly())
    x = _t(2, 6, 8, 8)
    calls = [{}, {"gain": 2.0}, {"activate": False}, {"mode": "none"}, {"gain": 1, "activate": True},
             {"activate": 1}]
    for kwargs in calls:
        _same(converted(x, **kwargs), original(x, **kwargs))
    assert _fallbacks(converted) == len(calls) - 1  # only the defaults were traced


class ListInput(nn.Module):
    """A list input whose length changes what forward does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, xs):
        y = self.bn(self.conv(torch.cat(xs, 1)[:, :6]))
        if len(xs) > 1:
            y = y + xs[1]
        return self.relu(y)


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, d):
        y = self.bn(self.conv(d["x"]))
        if "skip" in d:
            y = y + d["skip"]
        return self.relu(y)


class CatRoot(nn.Module):
    """DLA's DlaRoot form: a list passed straight to torch.cat (traceable; any length works)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, xs):
        return self.relu(self.bn(self.conv(torch.cat(xs, 1)[:, :12])))


def test_list_and_dict_inputs_of_varying_length_and_keys():
    x, s = _t(2, 6, 8, 8), _t(2, 6, 8, 8, seed=1)
    original, converted, _ = _convert(ListInput())
    for xs in ([x], [x, s], [x, s, x]):
        _same(converted(xs), original(xs))
    original, converted, _ = _convert(DictInput())
    for d in ({"x": x}, {"x": x, "skip": s}):
        _same(converted(d), original(d))
    original, converted, report = _convert(CatRoot())
    assert _fused(report) == ["bn+relu"]
    for xs in ([x, s], [x, s, x]):
        _same(converted(xs), original(xs))
    assert _fallbacks(converted) == 0


class TypeTested(nn.Module):
    """forward tests its input's type: the trace takes the tensor branch, the guard requires a tensor; a second
    trace takes the list branch (guard: a list); a tuple matches neither."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            x = x[0] * 2
        return self.relu(self.bn(self.conv(x)) + x)


def test_type_tested_input():
    original, converted, report = _convert(TypeTested())
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))
    assert _fallbacks(converted) == 0
    _same(converted([x]), original([x]))
    assert _fallbacks(converted) == 0
    _same(converted((x,)), original((x,)))
    assert _fallbacks(converted) == 1
    assert "x is a tensor" in report.guards[0][2][0]
    assert "x is a list" in report.guards[0][2][1]


class Basic(nn.Module):
    """A DlaBasic-like block: conv-bn-relu, conv-bn (+ shortcut, defaulting to x) -relu."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, shortcut=None, children=None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)


class Tree(nn.Module):
    """A DlaTree-like node: tree1(x, shortcut) then tree2(x1) with no shortcut."""

    def __init__(self):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.tree1 = Basic(4, 8)
        self.tree2 = Basic(8, 8)

    def forward(self, x):
        shortcut = self.project(x)
        x1 = self.tree1(x, shortcut)
        return self.tree2(x1) + x1


def test_dla_like_tree():
    original, converted, report = _convert(Tree())
    x = _t(2, 4, 8, 8)
    _same(converted(x), original(x))
    assert _fallbacks(converted) == 0
    assert sorted(_fused(report)) == ["bn", "bn+add+relu", "bn+add+relu", "bn+relu", "bn+relu"]
    assert converted.tree1.conv2.residual_required and converted.tree2.conv2.residual_required
    # `children` changes nothing the graph computes: its two patterns merge; `shortcut`'s two stay apart.
    described = guard_table(converted.tree2).describe()
    assert len(described) == 2 and [d.split(";")[0] for d in described] == ["shortcut is not None", "shortcut is None"]
    assert batch_norm_count(count_ops(converted, x)) == 0


def test_guarded_block_copies_pickles_and_keeps_its_class():
    original, converted, _ = _convert(Tree())
    x = _t(2, 4, 8, 8)
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(converted), torch.load(buf, weights_only=False)):
        assert isinstance(clone.tree2, Basic) and type(clone.tree2).__name__ == "Basic"
        table = guard_table(clone.tree2)
        assert table is not guard_table(converted.tree2)
        assert all(installed is not None for _, installed, _ in table.roles)
        assert table.roles[0][1] is clone.tree2.conv1  # roles follow the copy, not the source
        _same(clone(x), original(x))
        _same(clone.tree2(x[:, :4].repeat(1, 2, 1, 1)), original.tree2(x[:, :4].repeat(1, 2, 1, 1)))
        clone.tree2.relu = nn.ReLU()  # user surgery on the copy: takes the fallback, stays exact
        y = _t(1, 8, 8, 8)
        original.tree2.relu = nn.ReLU()
        _same(clone.tree2(y), original.tree2(y))


def test_fused_module_with_a_residual_requires_one():
    _, converted, _ = _convert(OptionalSkip())
    x = _t(1, 6, 8, 8)
    with pytest.raises(TypeError, match="residual"):
        converted.conv(x)
    plain = FusedConv2d(torch.randn(6, 6, 3, 3, dtype=torch.float64), padding=1)
    assert plain(x).shape == x.shape  # a hand-built module without residual keeps working


@pytest.mark.slow
def test_timm_dla34_float64():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("dla34", pretrained=False)).double().eval()
    converted, report = fusedconv.convert(model, return_report=True)
    x = _t(1, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-9
    assert not report.skipped
    assert batch_norm_count(count_ops(converted, x)) == 0
    assert _fallbacks(converted) == 0  # tree1(x, shortcut) and tree2(x1) both ran a fused specialization
    basics = [m for m in converted.modules() if type(m).__name__ == "DlaBasic"]
    assert basics and all(m.conv2.residual_required for m in basics)


@pytest.mark.slow
def test_hooks_on_conv_bn_and_activation_keep_firing():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.resnet18()).double().eval()
    seen: dict = {}

    def record(name):
        def hook(module, inputs, output=None):
            seen.setdefault(name, []).append((inputs[0] if output is None else output).clone())
        return hook

    model.layer2[0].bn2.register_forward_hook(record("bn2"))
    model.layer3[0].conv1.register_forward_hook(record("conv1"))
    model.layer1[1].relu.register_forward_pre_hook(record("relu"))
    converted, report = fusedconv.convert(model, return_report=True)
    x = _t(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        expected = {k: list(v) for k, v in seen.items()}
        seen.clear()
        _same(converted(x), ref)
    assert {k: len(v) for k, v in seen.items()} == {k: len(v) for k, v in expected.items()} == \
        {"bn2": 1, "conv1": 1, "relu": 2}
    for k in expected:
        _same(seen[k], expected[k])
    reasons = [r.detail for r in report.skipped]
    assert sum("hooks" in r for r in reasons) == 2
    assert len(report.fused) == 19  # the hooked relu only stays out of its epilogues


@pytest.mark.slow
def test_timm_hook_feature_extractor():
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("resnet18", pretrained=False, features_only=True,
                                           feature_cls="hook")).double().eval()
    converted = fusedconv.convert(model)
    x = _t(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert len(ref) == 5 and len(out) == 5
    _same(out, ref)


class OptionalFlag(nn.Module):
    """`getattr(self, "skip", False)`: an attribute absent at convert time and set later."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.bn(self.conv(x))
        if getattr(self, "skip", False):
            y = y + x
        return self.relu(y)


def test_attribute_absent_at_convert_and_set_later():
    original, converted, report = _convert(OptionalFlag())
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))
    assert "self.skip is not set" in report.guards[0][2][0]
    original.skip = converted.skip = True
    _same(converted(x), original(x))
    assert _fallbacks(converted) == 1


@pytest.mark.slow
def test_guarded_blocks_compile_fullgraph_and_export():
    original, converted, _ = _convert(Tree())
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        ref = original(x)
        _same(torch.compile(converted, fullgraph=True)(x), ref)
        _same(torch.export.export(converted, (x,)).module()(x), ref)


class ExactTypeTested(nn.Module):
    """forward reads its input's class without isinstance: a trace would see the Proxy's class and take the
    branch no real call takes (here `* 2`); no guard can tell, so the forward is not traced (not rewritten)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        if type(x) is torch.Tensor:
            return torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.bn(self.conv(x))) * 2


class ClassAttributeTested(ExactTypeTested):
    def forward(self, x):
        if x.__class__ is torch.Tensor:
            return torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.bn(self.conv(x))) * 2


def _is_plain_tensor(x) -> bool:
    return type(x) is torch.Tensor


class HelperTypeTested(ExactTypeTested):
    """The same test in a module-level helper the forward calls."""

    def forward(self, x):
        if _is_plain_tensor(x):
            return torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.bn(self.conv(x))) * 2


class Wrapper(nn.Module):
    """The class test one level down, inside a container the flat forward would trace through."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.inner = HelperTypeTested()

    def forward(self, x):
        return self.inner(self.stem(x))


@pytest.mark.parametrize("block", [ExactTypeTested, ClassAttributeTested, HelperTypeTested, Wrapper])
def test_class_read_without_isinstance_is_never_rewritten_wrongly(block):
    original, converted, report = _convert(block())
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))
    assert any("type()" in n or "reads the class" in n for n in report.notes), report.notes


@pytest.mark.parametrize("block", [ExactTypeTested, HelperTypeTested, Wrapper])
def test_class_read_found_while_a_profiler_holds_the_hook(block):
    # With sys.setprofile taken by someone else the tracer scans the code a forward can reach instead.
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(event))
    try:
        original, converted, report = _convert(block())
    finally:
        sys.setprofile(None)
    assert calls  # the other profiler kept its hook
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))
    assert any("type()" in n for n in report.notes), report.notes


class ValueTypeTested(nn.Module):
    """forward tests the type of a value it computed: while tracing that value is a Proxy of unknown type, so the
    trace would bake in the non-tensor branch (`* 2`) for every call; the forward is not traced."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)) + x)
        if isinstance(y, torch.Tensor):
            return y
        return y * 2


class ValueTypeWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.inner = ValueTypeTested()

    def forward(self, x):
        return self.inner(self.stem(x))


@pytest.mark.parametrize("block", [ValueTypeTested, ValueTypeWrapper])
def test_type_test_of_a_computed_value_is_never_rewritten_wrongly(block):
    original, converted, report = _convert(block())
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))
    assert any("tests the type of a computed value" in n for n in report.notes), report.notes


def test_type_test_without_source_text():
    # The isinstance call is found from the bytecode's positions, so code without a source file counts too.
    namespace = {"torch": torch}
    exec(compile("def forward(self, x):\n"
                 "    if isinstance(x, torch.Tensor):\n"
                 "        return torch.relu(self.bn(self.conv(x)) + x)\n"
                 "    return torch.relu(self.bn(self.conv(x[0])) + x[0]) * 2\n", "<generated>", "exec"), namespace)
    block = type("Generated", (ValueTypeTested,), {"forward": namespace["forward"]})()
    original, converted, report = _convert(block)
    x = _t(2, 6, 8, 8)
    _same(converted(x), original(x))
    assert report.fused and guard_table(converted) is not None
    assert _fallbacks(converted) == 0


class _Doubled(nn.Module):
    def forward(self, w):
        return 2.0 * w


@torch.no_grad()
def test_parametrized_fused_layer_after_convert():
    """A parametrization registered on a fused layer after convert (its weight computed on every access) is run
    by the converted model's next forward, as by the original's."""
    import torch.nn.utils.parametrize as parametrize

    torchvision = pytest.importorskip("torchvision")
    model, converted, _ = _convert(torchvision.models.resnet18(weights=None))
    x = _t(1, 3, 32, 32)
    converted(x), converted(x)
    for m in (model, converted):
        parametrize.register_parametrization(m.layer1[0].conv1, "weight", _Doubled())
    assert max_rel_error(converted(x), model(x)) < TOL


@pytest.mark.parametrize("name", ["mobilenetv2_100", "efficientnet_b0", "mixnet_s", "resnet18d"])
def test_every_guarded_timm_blocks_fallback_computes_the_original(name):
    # A call that misses a block's guard runs the block's own forward over stand-ins of the children convert changed
    # (graph/roles.py). Called directly on each guarded block, with the input the original model gave it: the
    # original block's output (timm's norm-act BNs included, whose activation the stand-in must apply).
    timm = pytest.importorskip("timm")
    from bench.zoo import fallback_errors

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name).eval(), example=torch.randn(2, 3, 32, 32)).double()
    converted = fusedconv.convert(model)
    errors = fallback_errors(model, converted, _t(2, 3, 32, 32))
    assert len(errors) >= 8
    assert max(errors.values()) < TOL, {p: e for p, e in errors.items() if not e < TOL}
