"""FusedConv3d's channels_last_3d route (fusedconv/cpu_conv3d.py `fused_call`) and the layout boundary on clips.

Inside a call the boundary switched to channels_last_3d, a FusedConv3d runs one `mkldnn::_convolution_pointwise`
(its `.binary` form with a residual) on its packed folded weight. Each such call is compared in float64 with the
original Conv3d -> BatchNorm3d(eval) -> activation; outside a switched call, with a gradient, a residual to
broadcast, or after an edit, the module must compute what it computed before. Whole models: a converted clip model
fed NCDHW input runs channels_last_3d inside, every conv on that route, and returns the original's values and
layout; a model that cannot run in channels_last_3d keeps NCDHW.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
import torch.nn as nn

import fusedconv
from fusedconv import cpu, cpu_boundary, cpu_conv3d
from fusedconv.activations import ActivationSpec
from fusedconv.fused_layers import FusedConv3d
from util import (KeepEveryOutput, OpCounter, conv3d_pair, conv3d_reference64, count_ops, count_ops_switched_off,
                  max_rel_error, randomize_bn)

pytestmark = pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise conv")
TOL_FP32 = 1e-5
CL3D = torch.channels_last_3d
POINTWISE = "_convolution_pointwise"


@contextlib.contextmanager
def switched():
    """As inside a converted model's call whose inputs the boundary made channels_last_3d."""
    stack = cpu_boundary._stack()
    stack.append(True)
    try:
        yield
    finally:
        stack.pop()


def _clip(c, size, seed=1):
    torch.manual_seed(seed)
    return torch.randn(1, c, *size).contiguous(memory_format=CL3D)


GEOMETRIES = [
    (8, 16, dict(kernel_size=3, padding=1), (2, 8, 8)),  # small: the route takes every conv in a switched call
    (16, 24, dict(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False), (4, 16, 16)),
    (24, 16, dict(kernel_size=(3, 1, 1), padding=(1, 0, 0)), (4, 8, 8)),
    (16, 32, dict(kernel_size=1, stride=2), (4, 8, 8)),
    (32, 32, dict(kernel_size=3, padding=2, dilation=2, groups=4), (2, 6, 6)),
]


@pytest.mark.parametrize("cin,cout,kwargs,size", GEOMETRIES)
@pytest.mark.parametrize("act,post", [("relu", False), ("leaky_relu", True), ("gelu_tanh", False),
                                      ("identity", False)])
def test_switched_call_is_one_onednn_op_matching_float64(cin, cout, kwargs, size, act, post):
    ref, fused = conv3d_pair(cin, cout, act, post, **kwargs)
    x = _clip(cin, size)
    with switched():
        counts = count_ops(fused, x)
        with torch.no_grad():
            y = fused(x)
    assert counts[POINTWISE] == 1 and counts["convolution"] == 0 and counts["mkldnn_convolution"] == 0, counts
    assert cpu_conv3d.routed(fused)
    assert y.is_contiguous(memory_format=CL3D)
    assert max_rel_error(y.double(), conv3d_reference64(ref, x)) < TOL_FP32


@pytest.mark.parametrize("act", ["relu", "identity", "silu"])
def test_switched_call_with_residual(act):
    # relu and identity are oneDNN post-ops after the add; silu runs in place after it.
    ref, fused = conv3d_pair(16, 16, act, kernel_size=3, padding=1)
    x, residual = _clip(16, (2, 8, 8)), _clip(16, (2, 8, 8), seed=2)
    before = residual.clone()
    with switched():
        counts = count_ops(fused, x, residual)
        with torch.no_grad():
            y = fused(x, residual)
    assert counts[POINTWISE] == 1 and counts["convolution"] == 0, counts
    assert max_rel_error(y.double(), conv3d_reference64(ref, x, residual)) < TOL_FP32
    assert torch.equal(residual, before)  # the residual is read, never written


def test_nchw_residual_is_read_in_the_output_layout():
    ref, fused = conv3d_pair(16, 16, "relu", kernel_size=3, padding=1)
    x, residual = _clip(16, (2, 8, 8)), _clip(16, (2, 8, 8), seed=2).contiguous()
    with switched(), torch.no_grad():
        y = fused(x, residual)
    assert max_rel_error(y.double(), conv3d_reference64(ref, x, residual)) < TOL_FP32


def test_residual_to_broadcast_takes_the_usual_path():
    ref, fused = conv3d_pair(16, 16, "relu", kernel_size=3, padding=1)
    x, residual = _clip(16, (2, 8, 8)), torch.randn(1, 16, 1, 1, 1)
    with switched():
        counts = count_ops(fused, x, residual)
        with torch.no_grad():
            y = fused(x, residual)
    assert counts[POINTWISE] == 0, counts
    assert max_rel_error(y.double(), conv3d_reference64(ref, x, residual)) < TOL_FP32


def test_outside_a_switched_call_nothing_changes():
    ref, fused = conv3d_pair(16, 24, "relu", kernel_size=3, padding=1)
    x = _clip(16, (2, 8, 8))
    counts = count_ops(fused, x)
    with torch.no_grad():
        y, own = fused(x), ref(x)
    assert counts[POINTWISE] == 0 and not cpu_conv3d.routed(fused), counts
    assert y.stride() == own.stride()  # the layout the original conv returns
    assert max_rel_error(y.double(), conv3d_reference64(ref, x)) < TOL_FP32


def test_ncdhw_input_in_a_switched_call_takes_the_usual_path():
    _, fused = conv3d_pair(16, 24, "relu", kernel_size=3, padding=1)
    x = _clip(16, (2, 8, 8)).contiguous()
    with switched():
        counts = count_ops(fused, x)
    assert counts[POINTWISE] == 0, counts


@pytest.mark.parametrize("switch", ["fusedconv", "mkldnn"])
def test_switches_turn_the_route_off(switch):
    _, fused = conv3d_pair(16, 24, "relu", kernel_size=3, padding=1)
    x = _clip(16, (2, 8, 8))
    with switched():
        counts = count_ops_switched_off(switch, fused, x)
    assert counts[POINTWISE] == 0, counts


def test_gradient_takes_the_differentiable_path():
    ref, fused = conv3d_pair(8, 8, "relu", kernel_size=3, padding=1)
    x = _clip(8, (2, 6, 6)).requires_grad_()
    counter = OpCounter()
    with switched(), counter:
        y = fused(x)
    assert counter.counts[POINTWISE] == 0 and counter.counts["convolution"] == 1, counter.counts
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref64 = copy.deepcopy(ref).double()
    ref64(x64).sum().backward()
    assert max_rel_error(x.grad.double(), x64.grad) < TOL_FP32


def test_edits_repack():
    # An in-place weight edit, a new activation and a refresh after a `.data` write are each seen on the next call.
    ref, fused = conv3d_pair(16, 16, "relu", kernel_size=3, padding=1)
    x = _clip(16, (2, 8, 8))
    with switched(), torch.no_grad():
        fused(x)
        fused.weight.mul_(-0.5)
        ref[0].weight.mul_(-0.5)
        assert max_rel_error(fused(x).double(), conv3d_reference64(ref, x)) < TOL_FP32
        fused.act = ActivationSpec("silu")
        ref[2] = nn.SiLU()
        assert max_rel_error(fused(x).double(), conv3d_reference64(ref, x)) < TOL_FP32
        fused.shift.data.add_(1.0)
        ref[1].bias.data.add_(1.0)
        fused.refresh()
        assert max_rel_error(fused(x).double(), conv3d_reference64(ref, x)) < TOL_FP32


def test_copies_and_pickles_leave_the_packed_weight_behind():
    ref, fused = conv3d_pair(16, 16, "relu", kernel_size=3, padding=1)
    x = _clip(16, (2, 8, 8))
    with switched(), torch.no_grad():
        y = fused(x)
        assert cpu_conv3d.routed(fused)
        for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert "_onednn_3d" not in other.__dict__
            assert torch.equal(other(x), y) and cpu_conv3d.routed(other)
        fused.double()
        assert "_onednn_3d" not in fused.__dict__


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm3d(cout))
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class ClipNet(nn.Module):
    """A small r3d-like clip model; `dense` returns the last feature map (its layout must come back NCDHW),
    `view` flattens it with `.view`, which fails on channels_last_3d."""

    def __init__(self, dense=False, view=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, (3, 5, 5), (1, 2, 2), (1, 2, 2), bias=False), nn.BatchNorm3d(8),
                                  nn.ReLU())
        self.layers = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.head = nn.Linear(16 * 2 * 4 * 4, 5) if view else nn.Linear(16, 5)
        self.dense, self.view = dense, view

    def forward(self, x):
        y = self.layers(self.stem(x))
        if self.dense:
            return y
        if self.view:
            return self.head(y.view(y.shape[0], -1))
        return self.head(y.mean((2, 3, 4)))


def _converted(model, seed=0):
    torch.manual_seed(seed)
    randomize_bn(model, seed)
    model.eval()
    return model, fusedconv.convert(model)


@pytest.mark.parametrize("dense", [False, True])
def test_clip_model_runs_channels_last_3d_inside(dense):
    model, fused = _converted(ClipNet(dense=dense))
    x = torch.randn(1, 3, 4, 16, 16)
    assert cpu_boundary.layout_used(fused, x) == "channels_last_3d"
    counts = count_ops(fused, x)
    assert counts[POINTWISE] == 6 and counts["convolution"] == 0 and counts["mkldnn_convolution"] == 0, counts
    with torch.no_grad():
        y, own = fused(x), model(x)
        ref = copy.deepcopy(model).double()(x.double())
    assert max_rel_error(y.double(), ref) < TOL_FP32
    assert y.stride() == own.stride()  # turned back at the boundary: the original's layout


def test_clip_model_that_needs_ncdhw_keeps_it():
    model, fused = _converted(ClipNet(view=True))
    x = torch.randn(1, 3, 4, 16, 16)
    assert cpu_boundary.layout_used(fused, x) == "NCDHW"
    counts = count_ops(fused, x)
    assert counts[POINTWISE] == 0, counts
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        assert max_rel_error(fused(x).double(), ref) < TOL_FP32


def test_channels_last_3d_clip_whose_output_layout_would_change_is_taken_as_given():
    # The user's own layout, at batch 1: the original's last conv answers NCDHW there (PyTorch's reference kernel),
    # the route channels_last_3d, so the check keeps the call as given and each conv answers the original's layout.
    model, fused = _converted(ClipNet(dense=True))
    x = torch.randn(1, 3, 4, 16, 16).contiguous(memory_format=CL3D)
    assert cpu_boundary.layout_used(fused, x) == "as given"
    with torch.no_grad():
        assert count_ops(fused, x)[POINTWISE] == 0
        assert fused(x).stride() == model(x).stride()


@pytest.mark.parametrize("dense,batch", [(False, 1), (True, 2)])
def test_channels_last_3d_clip_runs_the_route_as_given(dense, batch):
    # Clips the user made channels_last_3d (PyTorch's CPU guide): switched without a copy where the check finds the
    # same values and layout (a classifier's output; at batch 2 the original's convs all answer channels_last_3d
    # too), and handed back as the model returns them, never turned NCDHW.
    model, fused = _converted(ClipNet(dense=dense))
    x = torch.randn(batch, 3, 4, 16, 16).contiguous(memory_format=CL3D)
    assert cpu_boundary.layout_used(fused, x) == "channels_last_3d"
    counts = count_ops(fused, x)
    assert counts[POINTWISE] == 6 and counts["convolution"] == 0, counts
    with torch.no_grad():
        y, own = fused(x), model(x)
        ref = copy.deepcopy(model).double()(x.double())
    assert max_rel_error(y.double(), ref) < TOL_FP32
    assert y.stride() == own.stride()


def test_two_d_routes_do_not_switch_clips():
    # A clip is switched only for a FusedConv3d route; a 2-D model's oneDNN routes count for 4-d inputs only.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()).eval()
    randomize_bn(model, 0)
    fused = fusedconv.convert(model)
    with torch.no_grad():
        fused(torch.randn(1, 32, 64, 64))
    assert cpu_boundary._routes_onednn(fused, {4}) and not cpu_boundary._routes_onednn(fused, {5})


@pytest.mark.parametrize("given", ["NCDHW", "channels_last_3d"])
def test_r3d_18_every_conv_on_the_route(given):
    torchvision = pytest.importorskip("torchvision")
    model, fused = _converted(torchvision.models.video.r3d_18())
    x = torch.randn(1, 3, 4, 32, 32)
    if given == "channels_last_3d":
        x = x.contiguous(memory_format=CL3D)
    assert cpu_boundary.layout_used(fused, x) == "channels_last_3d"
    counts = count_ops(fused, x)
    assert counts[POINTWISE] == 20 and counts["convolution"] == 0, counts
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        assert max_rel_error(fused(x).double(), ref) < TOL_FP32


def test_empty_and_too_small_inputs_keep_the_route_for_later_calls():
    # They answer (or raise) as the original does, and the route stays for the real clips before and after them.
    ref, fused = conv3d_pair(8, 8, "relu", kernel_size=3)
    empty = torch.randn(0, 8, 4, 6, 6).contiguous(memory_format=CL3D)
    small, x = _clip(8, (2, 2, 2)), _clip(8, (4, 6, 6))
    with switched(), torch.no_grad():
        for _ in range(2):
            with pytest.raises(RuntimeError):
                ref(small)
            with pytest.raises(RuntimeError):
                fused(small)  # too small for a 3x3x3 kernel
            assert fused(empty).shape == ref(empty).shape
            assert count_ops(fused, x)[POINTWISE] == 1
            assert max_rel_error(fused(x).double(), conv3d_reference64(ref, x)) < TOL_FP32


# ------------------------------------------------------------------ residuals written in place (flat_private_3d)
def _profiled_ops(fn, *args) -> dict:
    # The profiler, not a dispatch mode: a mode is an observer, under which no residual is written in place.
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    counts = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    return out, counts


def test_private_residual_is_written_in_place():
    ref, fused = conv3d_pair(16, 16, "relu", kernel_size=3, padding=1)
    x, residual = _clip(16, (2, 8, 8)), _clip(16, (2, 8, 8), seed=2)
    expected = conv3d_reference64(ref, x, residual)
    with switched(), torch.no_grad():
        y = fused(x, residual.clone(), residual_private=True)  # a tensor no one else holds
        assert max_rel_error(y.double(), expected) < TOL_FP32
        own = residual.clone()
        y = fused(x, own, residual_private=True)
        assert y.data_ptr() == own.data_ptr()  # the output is the residual's storage
        view = residual.clone()[:, :, :]  # a view: its base could be read elsewhere
        before = view.clone()
        y = fused(x, view, residual_private=True)
        assert torch.equal(view, before) and max_rel_error(y.double(), expected) < TOL_FP32
        y = fused(x, residual, residual_private=False)
        assert y.data_ptr() != residual.data_ptr()


class Features(ClipNet):
    """ClipNet returning the stem's output too: a residual that is also returned is never written in place."""

    def forward(self, x):
        s = self.stem(x)
        y = self.layers(s)
        return self.head(y.mean((2, 3, 4))), s


def test_flat_forward_writes_private_residuals_in_place():
    model, fused = _converted(ClipNet())
    x = torch.randn(1, 3, 4, 16, 16)
    assert cpu_boundary.layout_used(fused, x) == "channels_last_3d"
    y, counts = _profiled_ops(fused, x)
    # Block 1 adds the stem's output, block 2 its downsample's: both read by nothing after the add.
    assert counts.get("mkldnn::_convolution_pointwise_") == 2, counts
    assert counts.get("mkldnn::_convolution_pointwise") == 4, counts
    ref = copy.deepcopy(model).double()(x.double())
    assert max_rel_error(y.double(), ref) < TOL_FP32


def test_returned_residual_is_not_overwritten():
    model, fused = _converted(Features())
    x = torch.randn(1, 3, 4, 16, 16)
    assert cpu_boundary.layout_used(fused, x) == "channels_last_3d"
    (y, s), counts = _profiled_ops(fused, x)
    assert counts.get("mkldnn::_convolution_pointwise_") == 1, counts  # block 2's downsample only
    ref_y, ref_s = copy.deepcopy(model).double()(x.double())
    assert max_rel_error(y.double(), ref_y) < TOL_FP32 and max_rel_error(s.double(), ref_s) < TOL_FP32


def test_observers_keep_what_they_saw():
    # A dispatch mode keeping every op's output, or FusedConv3d's forward patched to keep its outputs: no residual
    # is written in place under them, so each kept tensor still holds what the op returned.
    model, fused = _converted(ClipNet())
    x = torch.randn(1, 3, 4, 16, 16)
    ref = copy.deepcopy(model).double()(x.double())
    with torch.no_grad():
        fused(x)  # the boundary's check, without observers
        keeper = KeepEveryOutput()
        with keeper:
            y = fused(x)
    assert max_rel_error(y.double(), ref) < TOL_FP32
    assert keeper.kept and all(torch.equal(t, c) for t, c in zip(keeper.kept, keeper.copies))

    kept = []
    forward = FusedConv3d.forward

    def keeping(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        kept.append((out, out.clone()))
        return out

    FusedConv3d.forward = keeping
    try:
        with torch.no_grad():
            fused(x)  # (the first call after the patch checks the layout boundary again: forward three times)
            del kept[:]
            y = fused(x)
    finally:
        FusedConv3d.forward = forward
    assert max_rel_error(y.double(), ref) < TOL_FP32
    assert len(kept) == 6 and all(torch.equal(t, copy) for t, copy in kept)


class ViewKept(ClipNet):
    """ClipNet reading a view of the stem's output taken before the blocks, after them: the stem's output is not
    private."""

    def forward(self, x):
        s = self.stem(x)
        v = s[:, :2]
        y = self.layers(s)
        return self.head(y.mean((2, 3, 4))) + v.mean()


def test_residual_with_a_view_taken_is_not_overwritten():
    model, fused = _converted(ViewKept())
    x = torch.randn(1, 3, 4, 16, 16)
    assert cpu_boundary.layout_used(fused, x) == "channels_last_3d"
    y, counts = _profiled_ops(fused, x)
    assert counts.get("mkldnn::_convolution_pointwise_") == 1, counts  # block 2's downsample only
    assert max_rel_error(y.double(), copy.deepcopy(model).double()(x.double())) < TOL_FP32


def test_instance_forward_keeping_its_output_is_respected():
    model, fused = _converted(ClipNet())
    x = torch.randn(1, 3, 4, 16, 16)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        fused(x)
        stem = fused.stem[0] if isinstance(fused.stem, nn.Sequential) else fused.stem
        kept = []

        def keeping(*args, **kwargs):
            out = type(stem).forward(stem, *args, **kwargs)
            kept.append((out, out.clone()))
            return out

        stem.forward = keeping
        fused(x)  # (the first call after the edit checks the layout boundary again: forward three times)
        del kept[:]
        y = fused(x)
    assert max_rel_error(y.double(), ref(x.double())) < TOL_FP32
    assert len(kept) == 1 and torch.equal(*kept[0])


class FrameNet(nn.Module):
    """A 2-D model fed clips, which it folds into a batch of frames; counts its forwards."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        n, c, t, h, w = x.shape
        return self.body(x.transpose(1, 2).reshape(n * t, c, h, w)).mean((1, 2, 3))


def test_clips_into_a_two_d_model_are_not_checked():
    # No FusedConv3d could take a route: the clip stays NCDHW without the check's two extra forwards.
    model, fused = _converted(FrameNet())
    x = torch.randn(1, 16, 2, 32, 32)
    fused.calls = 0
    with torch.no_grad():
        y = fused(x)
    assert fused.calls == 1 and cpu_boundary.layout_used(fused, x) == "NCDHW"
    assert max_rel_error(y.double(), copy.deepcopy(model).double()(x.double())) < TOL_FP32


def test_given_layout_is_part_of_the_signature():
    # The same clip shape NCDHW (switched, turned back) and channels_last_3d (taken as given: see above) are
    # checked apart.
    model, fused = _converted(ClipNet(dense=True))
    x = torch.randn(1, 3, 4, 16, 16)
    x_cl = x.contiguous(memory_format=CL3D)
    assert cpu_boundary.layout_used(fused, x) == "channels_last_3d"
    assert cpu_boundary.layout_used(fused, x_cl) == "as given"
    with torch.no_grad():
        assert fused(x_cl).stride() == model(x_cl).stride()
        assert fused(x).stride() == model(x).stride()
