"""The CPU layout boundary of converted models (fusedconv/cpu_boundary.py).

NCHW float32 input to a converted model runs channels_last inside (each FusedConv2d on its oneDNN route) and comes
back in the original layout; models that are not layout-agnostic (a `.view()` that needs NCHW strides) stay in
NCHW; autograd, channels_last input, tracing and the off switch leave the model as written. The op-count test is
the profile the issue asks for: converted mobilenet_v2 on NCHW input runs no reference (`_slow_conv2d_forward`)
convolution and no per-layer layout copy.
"""

from __future__ import annotations

import copy
import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from util import OpCounter, global_draws, max_rel_error, randomize_bn, seed_global_generators

import fusedconv
from fusedconv import cpu, cpu_boundary
from fusedconv.modules import FusedConv2d

# The oneDNN route's mechanics on shapes small enough to run fast: small convs take it too here (by default they stay
# on F.conv2d, cpu.small_conv_macs).
pytestmark = [pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise conv ops"),
              pytest.mark.usefixtures("onednn_small_convs")]

TOL_FP32 = 1e-5
CL = torch.channels_last


def conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class FeatureNet(nn.Module):
    """Two conv blocks and a residual block; returns a 4-d feature map and a pooled vector."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn_relu(3, 8)
        self.b = conv_bn_relu(8, 8)
        self.c = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.a(x)
        z = torch.relu(self.c(self.b(y)) + y)
        return z, z.mean((2, 3))


class ViewNet(nn.Module):
    """Flattens a 4-d feature map with `.view`, which needs NCHW strides (fails on channels_last)."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn_relu(3, 4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        y = self.a(x)
        return self.fc(y.view(y.shape[0], -1))


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn_relu(3, 6)
        self.b = conv_bn_relu(3, 6)

    def forward(self, x, *, other):
        return self.a(x) + self.b(other)


def converted(model):
    model = randomize_bn(model, 1).eval()
    return model, fusedconv.convert(model)


def onednn_used(model) -> bool:
    states = [m._cpu_state for m in model.modules() if isinstance(m, FusedConv2d)]
    return bool(states) and all(s is not None and s.onednn_ok is True for s in states)


def is_channels_last(t):
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@torch.no_grad()
def test_nchw_input_runs_channels_last_inside_and_returns_nchw():
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(2, 3, 12, 12)
    for _ in range(2):  # first call checks the switch, the second uses it
        (z, v), (z_ref, v_ref) = fused(x), model(x)
        assert max_rel_error(z, z_ref) < TOL_FP32 and max_rel_error(v, v_ref) < TOL_FP32
        assert z.is_contiguous() and z.stride() == z_ref.stride()
        z.view(-1)  # the caller's `.view()` keeps working
    assert cpu_boundary.layout_used(fused, x) == "channels_last"
    assert onednn_used(fused)
    assert x.is_contiguous()  # the caller's input is not touched


@torch.no_grad()
def test_same_function_in_float64_on_the_nchw_route():
    """fp64 never switches (the oneDNN route is fp32 only): the converted model is the same function."""
    torch.manual_seed(0)
    model, fused = converted(FeatureNet().double())
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    (z, v), (z_ref, v_ref) = fused(x), model(x)
    assert max_rel_error(z, z_ref) < 1e-12 and max_rel_error(v, v_ref) < 1e-12
    assert z.is_contiguous()


@torch.no_grad()
def test_view_that_needs_nchw_keeps_the_model_in_nchw():
    torch.manual_seed(0)
    model, fused = converted(ViewNet())
    x = torch.randn(3, 3, 6, 6)
    for _ in range(2):
        assert max_rel_error(fused(x), model(x)) < TOL_FP32
    assert cpu_boundary.layout_used(fused, x) == "NCHW"
    assert list(fused.__dict__[cpu_boundary.ATTRIBUTE].checked.values()) == [False]


@torch.no_grad()
def test_keyword_and_positional_inputs_are_both_switched():
    torch.manual_seed(0)
    model, fused = converted(TwoInputNet())
    x, other = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    for _ in range(2):
        y = fused(x, other=other)
        assert max_rel_error(y, model(x, other=other)) < TOL_FP32 and y.is_contiguous()
    assert cpu_boundary.layout_used(fused, x, other=other) == "channels_last"
    assert onednn_used(fused)


@torch.no_grad()
def test_channels_last_input_is_left_alone_and_stays_channels_last():
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(1, 3, 10, 10).contiguous(memory_format=CL)
    z, _ = fused(x)
    assert is_channels_last(z) and max_rel_error(z, model(x)[0]) < TOL_FP32
    assert fused.__dict__[cpu_boundary.ATTRIBUTE].checked == {}  # nothing to check: no switch needed


def test_autograd_input_is_left_alone():
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(1, 3, 10, 10, requires_grad=True)
    z, _ = fused(x)
    z.sum().backward()
    assert x.grad is not None and z.is_contiguous()
    assert fused.__dict__[cpu_boundary.ATTRIBUTE].checked == {}


@torch.no_grad()
def test_off_switch_and_failures_keep_the_stack_balanced():
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(1, 3, 10, 10)
    cpu.enabled = False
    try:
        assert cpu_boundary.layout_used(fused, x) == "NCHW"
        assert max_rel_error(fused(x)[0], model(x)[0]) < TOL_FP32
    finally:
        cpu.enabled = True
    with pytest.raises(ValueError, match="input"):
        fused(torch.randn(1, 5, 10, 10))  # wrong channel count: the usual error, and the hooks unwind
    assert cpu_boundary._stack() == []
    fused(x)
    assert cpu_boundary._stack() == []


@torch.no_grad()
def test_jit_trace_sees_the_model_as_written():
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(1, 3, 10, 10)
    traced = torch.jit.trace(fused, (x,), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "mkldnn::_convolution_pointwise" not in graph
    assert max_rel_error(traced(x)[0], model(x)[0]) < TOL_FP32


@torch.no_grad()
def test_deepcopy_and_pickle_keep_the_boundary():
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(1, 3, 10, 10)
    fused(x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        z, _ = clone(x)
        assert z.is_contiguous() and max_rel_error(z, model(x)[0]) < TOL_FP32
        assert onednn_used(clone)


def op_counts_per_forward(model, x, runs: int = 2) -> Counter:
    """Operator counts per forward from torch.profiler (internal ops included, e.g. the conv algorithm chosen)."""
    with torch.no_grad():
        model(x)  # first call: the boundary check, routing and packing
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    counts = Counter(e.name for e in prof.events())
    return Counter({k: v // runs for k, v in counts.items()})


def test_mobilenet_v2_profile_has_no_reference_conv_and_no_layer_copies():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(weights=None), 2).eval()
    fused = fusedconv.convert(model)
    layers = sum(isinstance(m, FusedConv2d) for m in fused.modules())
    # The bench's size: at smaller ones the smallest convs stay on F.conv2d by design (cpu.small_conv_macs).
    x = torch.randn(1, 3, 224, 224)
    counts = op_counts_per_forward(fused, x)
    eager = op_counts_per_forward(model, x)
    assert eager["aten::_slow_conv2d_forward"] > 0, "this input no longer reaches the reference conv in eager"
    assert counts["aten::_slow_conv2d_forward"] == 0, counts
    assert counts["aten::convolution"] == 0, counts
    # Every conv is one oneDNN call; all 10 residual blocks write into their identity residual (the flat forward
    # proves each block input dead after its block: fusedconv/graph/flat.py), the other calls allocate their output.
    in_place = counts["mkldnn::_convolution_pointwise_"]
    assert counts["mkldnn::_convolution_pointwise"] + in_place == layers == 52
    assert in_place == 10, counts
    # Layout copies: the input once at the boundary, plus the copies the eager model makes too (its head).
    assert counts["aten::copy_"] <= eager["aten::copy_"] + 1, (counts, eager)
    with torch.no_grad():
        assert max_rel_error(fused(x), model(x)) < 1e-4


def _mostly_unfused(n_plain: int) -> nn.Sequential:
    # One Conv -> BN -> ReLU block (fused by convert), then n_plain pre-activation BN -> ReLU -> Conv blocks
    # (dpn68's order) whose conv no BN follows: convert leaves those convs as they are.
    layers = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Tanh()]
    for _ in range(n_plain):
        layers += [nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()]
    return randomize_bn(nn.Sequential(*layers).eval())


@pytest.mark.parametrize("n_plain, boundary", [(9, True), (10, False)])
def test_boundary_only_where_fused_convs_are_one_in_ten(n_plain, boundary):
    model = _mostly_unfused(n_plain)
    fused = fusedconv.convert(model)
    assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == 1
    assert (cpu_boundary._enter in fused._forward_pre_hooks.values()) is boundary
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        assert cpu_boundary.layout_used(fused, x) == ("channels_last" if boundary else "NCHW")
        y = fused(x)
    assert max_rel_error(y, expected) < 1e-4 and y.is_contiguous()


@pytest.mark.parametrize("where", ("inner", "global"))
@torch.no_grad()
def test_hooks_inside_see_each_call_once_and_the_check_waits_for_a_call_without_them(where):
    # The check's two extra forwards would run a user's feature-collecting hook three times on the first call.
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(2, 3, 12, 12)
    seen = []
    layers = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    if where == "inner":
        handles = [m.register_forward_hook(lambda m, a, out: seen.append(out.shape)) for m in layers]
    else:
        handles = [nn.modules.module.register_module_forward_hook(
            lambda m, a, out: seen.append(out.shape) if isinstance(m, FusedConv2d) else None)]
    try:
        for _ in range(2):
            seen.clear()
            z, _ = fused(x)
            assert len(seen) == len(layers)  # each layer once per call
            assert max_rel_error(z, model(x)[0]) < TOL_FP32
        assert not cpu_boundary._boundary(fused).checked  # nothing decided while hooks were there
    finally:
        for h in handles:
            h.remove()
    fused(x)
    assert cpu_boundary.layout_used(fused, x) == "channels_last"


class _CountConvs(TorchFunctionMode):
    """Counts conv calls (a user's op counter)."""

    def __init__(self):
        super().__init__()
        self.convs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.convs += "conv" in getattr(func, "__name__", "")
        return func(*args, **(kwargs or {}))


def _conv_ops(counts) -> int:
    # The aten / oneDNN convolution ops an OpCounter saw (the first call's fold runs other ops, once).
    return sum(n for op, n in counts.items() if "conv" in op)


@pytest.mark.parametrize("mode", (_CountConvs, OpCounter))
@torch.no_grad()
def test_a_mode_sees_each_call_once_and_the_check_waits_for_a_call_without_it(mode):
    # Under a torch function / dispatch mode the check's two extra forwards would be counted too.
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(2, 3, 12, 12)
    counts = []
    for _ in range(2):
        with mode() as m:
            z, _ = fused(x)
        counts.append(m.convs if mode is _CountConvs else _conv_ops(m.counts))
        assert max_rel_error(z, model(x)[0]) < TOL_FP32
    assert counts[0] == counts[1] > 0  # the first call counted once, like the second
    assert not cpu_boundary._boundary(fused).checked  # nothing decided under the mode
    with torch.device("cpu"):  # torch's own default-device mode is not one: the check runs
        fused(x)
    assert cpu_boundary.layout_used(fused, x) == "channels_last"


class _Noisy(nn.Module):
    """Adds noise between two fused blocks, drawn from torch's, Python's or numpy's global generator, or from a
    torch.Generator the module holds."""

    def __init__(self, source):
        super().__init__()
        self.a = conv_bn_relu(3, 8)
        self.b = conv_bn_relu(8, 8)
        self.source = source
        if source == "own generator":
            self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        y = self.a(x)
        if self.source == "torch":
            noise = torch.randn_like(y)
        elif self.source == "own generator":
            noise = torch.randn(y.shape, generator=self.generator)
        elif self.source == "python":
            noise = random.random()
        else:
            noise = float(np.random.rand())
        return self.b(y + 0.5 * noise)


def _seed_all(seed, *models):
    seed_global_generators(seed)
    for m in models:
        if hasattr(m, "generator"):
            m.generator.manual_seed(seed)


@pytest.mark.parametrize("source", ("torch", "python", "numpy", "own generator"))
@torch.no_grad()
def test_a_forward_drawing_random_numbers_returns_the_originals_draws_on_the_first_call(source):
    # The check's extra forwards would draw first: the call would return other noise than the original's for the
    # same seed, and leave the generators elsewhere.
    torch.manual_seed(0)
    model, fused = converted(_Noisy(source))
    x = torch.randn(1, 3, 12, 12)
    for _ in range(2):
        _seed_all(1, model)
        expected, expected_next = model(x), global_draws()
        _seed_all(1, fused)
        y, after = fused(x), global_draws()
        assert max_rel_error(y, expected) < TOL_FP32
        assert after == expected_next
    # Global draws are replayed for each layout, so the outputs compare: a scalar draw is the same in both, and the
    # switch is taken; torch.randn_like fills a channels_last tensor in memory order, other values per element, so
    # the outputs differ and the check keeps NCHW. A generator of the model's own cannot be replayed: NCHW.
    assert cpu_boundary.layout_used(fused, x) == ("channels_last" if source in ("python", "numpy") else "NCHW")


@torch.no_grad()
def test_a_hook_on_the_root_does_not_stop_the_check():
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    calls = []
    fused.register_forward_hook(lambda m, a, out: calls.append(1))
    x = torch.randn(2, 3, 12, 12)
    fused(x)
    assert calls == [1]  # the check calls the root's forward, not the module: its hooks run once
    assert cpu_boundary.layout_used(fused, x) == "channels_last"


class StatefulNet(FeatureNet):
    """A forward that updates the model's state: a buffer counted in place, a buffer replaced, a plain tensor
    attribute written in place, an int attribute, and a cache attribute set on first use."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("total", torch.zeros(()))
        self.seen = torch.zeros(())
        self.n = 0

    def forward(self, x):
        self.calls += 1
        self.total = self.total + x.sum()
        self.seen.add_(1)
        self.n += 1
        if not hasattr(self, "cache"):
            self.cache = x.shape
        return super().forward(x)


@torch.no_grad()
def test_the_layout_check_leaves_the_state_its_forwards_change_as_one_call_would():
    """Found by bench/random_sweep.py --dtype float32: the first call's two check forwards updated a buffer the
    forward counts calls in, so the converted model's count ran ahead of the original's (0.86 relative)."""
    model, fused = converted(StatefulNet())
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        want, got = model(x), fused(x)
    assert cpu_boundary.layout_used(fused, x) == "channels_last"  # (the check ran and took the switch)
    assert max_rel_error(got[0], want[0]) < TOL_FP32
    for name in ("calls", "total", "seen"):
        assert torch.allclose(getattr(fused, name), getattr(model, name)), name
    assert fused.n == model.n == 3 and fused.cache == model.cache


class NoisyNet(FeatureNet):
    """Noise shaped like the input (`randn_like`) before the convs, scaled by a setting."""

    def __init__(self):
        super().__init__()
        self.noise = 0.0

    def forward(self, x):
        return super().forward(x + self.noise * torch.randn_like(x))


@torch.no_grad()
def test_a_forward_drawing_from_torch_stays_nchw_and_draws_what_the_original_draws():
    """Found by bench/random_sweep.py --dtype float32: `randn_like` on a channels_last input draws other numbers than
    on the NCHW one (it fills memory order); the check compared one sample whose output did not show it (there, a
    ReLU had zeroed it), took the switch, and later calls differed from the original by 0.1-0.2 (outputs ~0.5).
    Here the first call's noise is scaled by 0, so that its sample cannot show it either."""
    model, fused = converted(NoisyNet())
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    assert max_rel_error(fused(x)[0], model(x)[0]) < TOL_FP32  # (the signature's check)
    assert cpu_boundary.layout_used(fused, x) == "NCHW"
    model.noise = fused.noise = 0.5
    for seed in (1, 2):
        torch.manual_seed(seed)
        want = model(x)
        torch.manual_seed(seed)
        got = fused(x)
        assert max_rel_error(got[0], want[0]) < TOL_FP32


class ReadsLayout(nn.Module):
    """Reads its input's layout: what a model the boundary checked as layout-agnostic may become after an edit."""

    def forward(self, x):
        return x * 2.0 if x.is_contiguous() else x


@pytest.mark.parametrize("edit", ["appended", "forward_set"])
@torch.no_grad()
def test_a_model_edited_after_the_check_is_checked_again(edit):
    torch.manual_seed(0)
    model, fused = converted(FeatureNet())
    x = torch.randn(1, 3, 10, 10)
    fused(x), fused(x)
    assert cpu_boundary.layout_used(fused, x) == "channels_last"
    for m in (model, fused):
        if edit == "appended":
            m.b.append(ReadsLayout())  # a module added that reads its input's layout
        else:
            m.b.forward = lambda y, seq=m.b: ReadsLayout()(nn.Sequential.forward(seq, y))  # a forward set on it
    for _ in range(2):
        assert max_rel_error(fused(x)[0], model(x)[0]) < TOL_FP32
    assert cpu_boundary.layout_used(fused, x) == "NCHW"  # checked again: the model now reads the layout


@torch.no_grad()
def test_weights_moved_to_channels_last_after_the_check_give_the_originals_layout():
    torch.manual_seed(0)
    model, fused = converted(nn.Sequential(conv_bn_relu(3, 8), conv_bn_relu(8, 8), nn.Conv2d(8, 4, 1)))
    x = torch.randn(1, 3, 10, 10)
    fused(x), fused(x)
    assert cpu_boundary.layout_used(fused, x) == "channels_last"
    for m in (model, fused):
        m.to(memory_format=CL)
    ref = model(x)
    assert is_channels_last(ref)  # (PyTorch's conv answers a channels_last weight in channels_last)
    for _ in range(2):
        out = fused(x)
        assert out.stride() == ref.stride() and max_rel_error(out, ref) < TOL_FP32


def _counted_checks(monkeypatch) -> list:
    """A list that gets one entry per layout check (`cpu_boundary._check`) from now on."""
    checks = []
    real = cpu_boundary._check
    monkeypatch.setattr(cpu_boundary, "_check", lambda *a: checks.append(1) or real(*a))
    return checks


@torch.no_grad()
def test_a_reach_alone_keeps_the_decisions(monkeypatch):
    """A reach changes nothing in the model: its signatures are not checked again (the root's class going back from
    the armed one counts as the same)."""
    torch.manual_seed(0)
    _, fused = converted(FeatureNet())
    checks = _counted_checks(monkeypatch)
    x = torch.randn(1, 3, 10, 10)
    fused(x), fused(x)
    vars(fused)  # a reach
    fused(x)
    fused.b[0]  # another, through a submodule
    fused(x)
    assert len(checks) == 1 and cpu_boundary.layout_used(fused, x) == "channels_last"


@torch.no_grad()
def test_a_frozen_models_decisions_hold_without_walking_its_modules(monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(FeatureNet(), 1).eval()
    frozen = fusedconv.convert(model, freeze=True)
    x = torch.randn(1, 3, 10, 10)
    frozen(x)
    walks = []
    real = cpu_boundary._tree
    monkeypatch.setattr(cpu_boundary, "_tree", lambda m: walks.append(1) or real(m))
    for _ in range(3):
        assert max_rel_error(frozen(x)[0], model(x)[0]) < TOL_FP32
    assert walks == [] and cpu_boundary.layout_used(frozen, x) == "channels_last"


class FlaggedNoiseNet(FeatureNet):
    """Noise shaped like the input, drawn only while a setting asks for it (off when the boundary checks)."""

    def __init__(self):
        super().__init__()
        self.noisy = False

    def forward(self, x):
        if self.noisy:
            x = x + torch.randn_like(x)
        return super().forward(x)


class DropoutNet(FeatureNet):
    """A Dropout on the feature map, in eval mode when the boundary checks (MC dropout turns it on later)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        z, v = super().forward(x)
        return self.drop(z), v


def _switched_then(model_cls, edit):
    """Converted `model_cls`, two calls (the check takes the switch), then `edit` on both models: the converted
    model must draw what the original draws for the same seed on every later call."""
    torch.manual_seed(0)
    model, fused = converted(model_cls())
    x = torch.randn(1, 3, 10, 10)
    fused(x), fused(x)
    assert cpu_boundary.layout_used(fused, x) == "channels_last"
    for m in (model, fused):
        edit(m)
    for seed in (1, 2):
        torch.manual_seed(seed)
        want = model(x)
        torch.manual_seed(seed)
        got = fused(x)
        assert max_rel_error(got[0], want[0]) < TOL_FP32 and got[0].stride() == want[0].stride()
    return fused, x


@torch.no_grad()
def test_a_setting_assigned_after_the_check_is_checked_again():
    """An attribute-only edit (no module replaced, no forward set): the model now draws noise shaped like its input,
    which channels_last would fill in another order (before: 6.6 max abs difference, silently)."""
    fused, x = _switched_then(FlaggedNoiseNet, lambda m: setattr(m, "noisy", True))
    assert cpu_boundary.layout_used(fused, x) == "NCHW"


@torch.no_grad()
def test_a_dropout_turned_on_after_the_check_draws_the_originals_mask():
    """MC dropout: `model.drop.train()` on one module only (the fused layers stay in eval, nothing warns)."""
    fused, x = _switched_then(DropoutNet, lambda m: m.drop.train())
    assert cpu_boundary.layout_used(fused, x) == "NCHW"


@torch.no_grad()
def test_a_weight_replaced_by_a_channels_last_one_gives_the_originals_layout():
    def edit(m):
        conv = m.c[0]  # (the fused layer in the converted model)
        conv.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=CL), requires_grad=False)

    _switched_then(FeatureNet, edit)


class CountingNet(FeatureNet):
    """Counts its calls in a private attribute (which the boundary's check does not put back): the model changes on
    every call."""

    def __init__(self):
        super().__init__()
        self._calls = 0

    def forward(self, x):
        self._calls += 1000  # (beyond the small ints Python keeps once: a new object on every call)
        return super().forward(x)


def _steady_calls(model_cls, calls, monkeypatch):
    """`calls` calls of the converted `model_cls`, each against the original: (the checks they ran, the converted
    model, the input)."""
    torch.manual_seed(0)
    model, fused = converted(model_cls())
    checks = _counted_checks(monkeypatch)
    x = torch.randn(1, 3, 10, 10)
    for _ in range(calls):
        assert max_rel_error(fused(x)[0], model(x)[0]) < TOL_FP32
    return checks, fused, x


@torch.no_grad()
def test_a_model_changing_on_every_call_stops_switching(monkeypatch):
    checks, fused, x = _steady_calls(CountingNet, 8, monkeypatch)
    assert len(checks) == cpu_boundary._CHANGED_CALLS_BEFORE_PINNED
    assert cpu_boundary._boundary(fused).pinned and cpu_boundary.layout_used(fused, x) == "NCHW"


@torch.no_grad()
def test_a_forward_replacing_its_own_state_keeps_the_switch(monkeypatch):
    """A public counter and a buffer the forward replaces on every call are the model's own state, which the check
    saw change: no edit, the decision holds."""
    checks, fused, x = _steady_calls(StatefulNet, 5, monkeypatch)
    assert len(checks) <= 2 and cpu_boundary.layout_used(fused, x) == "channels_last"


@torch.no_grad()
def test_a_fused_layers_own_caches_are_no_edit(monkeypatch):
    """A call under torch.inference_mode rebuilds a fused transposed conv's fold cache (an attribute of its own):
    found by bench/zoo.py on smp's Linknet, whose every later call checked the layout again once the model had
    been reached into."""
    torch.manual_seed(0)
    model, fused = converted(nn.Sequential(conv_bn_relu(3, 8), nn.ConvTranspose2d(8, 8, 2, 2, bias=False),
                                           nn.BatchNorm2d(8), nn.ReLU(), conv_bn_relu(8, 8)))
    assert any(type(m).__name__ == "FusedConvTranspose2d" for m in fused.modules())
    x = torch.randn(1, 3, 10, 10)
    fused(x), fused(x)
    vars(fused)  # a reach: from now on the boundary compares the model on every call
    with torch.inference_mode():
        fused(x)
    checks = _counted_checks(monkeypatch)
    for _ in range(2):
        assert max_rel_error(fused(x), model(x)) < TOL_FP32
    assert checks == [] and cpu_boundary.layout_used(fused, x) == "channels_last"
