"""FusedConv2d on CPU for channel slices (fusedconv/cpu.py: ONEDNN_COPY / ONEDNN_COPY_NCHW, and FOLDED_COPY /
FOLDED_COPY_NCHW for small convs) and dilated convs on F.conv2d (the bias added after the conv).

A channel slice (`torch.split` / `chunk` in split-input blocks: SKNet, Res2Net, ShuffleNet) is dense in neither
layout, so F.conv2d runs PyTorch's slow reference kernels on it; the eager path copies it to channels_last and
runs oneDNN instead (a small conv: F.conv2d on the copy, since oneDNN's op costs more than such a conv), and must
still answer in the layout F.conv2d answers that input in, with the original chain's values, every call, and fall
back to F.conv2d when oneDNN is off. The shapes here are small: the oneDNN tests ask for that route on them
(`onednn_small_convs`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

from fusedconv import cpu  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

needs_onednn = pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise conv ops")
CL = torch.channels_last


def _block(cin=8, cout=12, dilation=1, seed=0):
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
                        nn.ReLU()).eval()
    randomize_bn(ref, seed)
    return ref, FusedConv2d.from_modules(ref[0], ref[1], ref[2])


def _slice(fmt, batch=1, channels=16, size=9):
    # The second half of the channels of a tensor in `fmt`: a view dense in neither layout.
    whole = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
    x = whole[:, channels // 2:]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    return x


def _reference64(ref, x):
    with torch.no_grad():
        return copy.deepcopy(ref).double()(x.double())


def _assert_like_f_conv2d(outputs, expected, plain):
    """The chain's values, in the layout PyTorch's own conv answered the same view in (`plain`)."""
    for y in outputs:
        assert max_rel_error(y, expected) < 1e-5
        assert y.is_contiguous(memory_format=CL) == plain.is_contiguous(memory_format=CL)
        assert y.is_contiguous() == plain.is_contiguous()


@needs_onednn
@pytest.mark.usefixtures("onednn_small_convs")
@pytest.mark.parametrize("fmt, batch, route", [(CL, 1, cpu.ONEDNN_COPY), (CL, 2, cpu.ONEDNN_COPY),
                                               (torch.contiguous_format, 2, cpu.ONEDNN_COPY_NCHW)])
@pytest.mark.parametrize("dilation", [1, 2])
def test_channel_slice_runs_onednn_in_f_conv2d_layout(fmt, batch, route, dilation):
    ref, fused = _block(dilation=dilation)
    x = _slice(fmt, batch)
    x_before = x.clone()
    with torch.no_grad():
        plain = ref[0](x)  # the layout PyTorch's own conv answers this view in
        outputs = [fused(x) for _ in range(3)]
    state = fused._cpu_state
    assert state.routes[next(reversed(state.routes))] == route
    assert state.onednn_ok is True
    _assert_like_f_conv2d(outputs, _reference64(ref, x), plain)
    assert torch.equal(x, x_before)


@needs_onednn
@pytest.mark.usefixtures("onednn_small_convs")
def test_channel_slice_with_residual():
    ref, fused = _block()
    x = _slice(CL)
    residual = torch.randn(1, 12, 9, 9).contiguous(memory_format=CL)
    r_before = residual.clone()
    with torch.no_grad():
        ys = [fused(x, residual) for _ in range(2)]
        z = copy.deepcopy(ref).double()
        expected = z[2](z[1](z[0](x.double())) + residual.double())
    for y in ys:
        assert max_rel_error(y, expected) < 1e-5 and y.is_contiguous(memory_format=CL)
    assert torch.equal(residual, r_before)


@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format])
def test_channel_slice_with_onednn_off_stays_on_f_conv2d(fmt):
    ref, fused = _block()
    x = _slice(fmt, batch=2)
    cpu.enabled = False
    try:
        with torch.no_grad():
            plain = ref[0](x)
            ys = [fused(x) for _ in range(2)]
    finally:
        cpu.enabled = True
    assert fused._cpu_state.onednn_ok is None  # oneDNN never ran
    for y in ys:
        assert max_rel_error(y, _reference64(ref, x)) < 1e-5
        assert y.is_contiguous(memory_format=CL) == plain.is_contiguous(memory_format=CL)


@needs_onednn
@pytest.mark.usefixtures("onednn_small_convs")
def test_onednn_refusal_on_a_slice_falls_back(monkeypatch):
    ref, fused = _block()
    x = _slice(CL)

    def refuse(*args, **kwargs):
        raise RuntimeError("oneDNN refuses this geometry")

    monkeypatch.setattr(cpu, "_pointwise", refuse)
    with torch.no_grad():
        ys = [fused(x) for _ in range(2)]
    assert fused._cpu_state.onednn_ok is False
    for y in ys:
        assert max_rel_error(y, _reference64(ref, x)) < 1e-5 and y.is_contiguous(memory_format=CL)


def _crop(fmt, size=10):
    # A spatial crop of a batch-1 tensor in `fmt` (a batch-1 channel slice of an NCHW tensor is contiguous).
    x = torch.randn(1, 8, size, size).contiguous(memory_format=fmt)[:, :, 1:, 1:]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    return x


@needs_onednn
@pytest.mark.parametrize("view, route", [(lambda: _slice(CL), cpu.FOLDED_COPY),
                                         (lambda: _crop(torch.contiguous_format), cpu.FOLDED_COPY_NCHW)])
@pytest.mark.parametrize("dilation", [1, 2])
def test_small_conv_on_a_view_runs_f_conv2d_on_a_copy(view, route, dilation, monkeypatch):
    # Batch 1 and 8 -> 12 channels at 9x9: under small_conv_macs, so no oneDNN op runs; F.conv2d gets a
    # channels_last copy (never the view) and the channels_last weight, and the output keeps F.conv2d's layout.
    ref, fused = _block(dilation=dilation)
    x = view()
    x_before = x.clone()
    with torch.no_grad():
        plain = ref[0](x)
    seen = []
    conv2d = cpu._conv2d

    def spy(inp, weight, *args):
        seen.append((inp.is_contiguous(memory_format=CL), weight.is_contiguous(memory_format=CL)))
        return conv2d(inp, weight, *args)

    def no_onednn(*args, **kwargs):
        raise AssertionError("a small conv took the oneDNN op")

    monkeypatch.setattr(cpu, "_conv2d", spy)
    monkeypatch.setattr(cpu, "_pointwise", no_onednn)
    with torch.no_grad():
        outputs = [fused(x) for _ in range(3)]
    state = fused._cpu_state
    assert state.routes[next(reversed(state.routes))] == route
    assert seen[1:] == [(True, True)] * 3  # (the first: the layout probe on the view, once per signature)
    _assert_like_f_conv2d(outputs, _reference64(ref, x), plain)
    assert torch.equal(x, x_before)


def test_small_conv_on_a_channel_slice_with_residual():
    ref, fused = _block()
    x = _slice(CL)
    residual = torch.randn(1, 12, 9, 9).contiguous(memory_format=CL)
    r_before, x_before = residual.clone(), x.clone()
    with torch.no_grad():
        ys = [fused(x, residual) for _ in range(2)]
        z = copy.deepcopy(ref).double()
        expected = z[2](z[1](z[0](x.double())) + residual.double())
    assert fused._cpu_state.routes[next(reversed(fused._cpu_state.routes))] in (cpu.FOLDED_COPY, cpu.FOLDED)
    for y in ys:
        assert max_rel_error(y, expected) < 1e-5 and y.is_contiguous(memory_format=CL)
    assert torch.equal(residual, r_before) and torch.equal(x, x_before)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_dilated_conv_on_f_conv2d_adds_its_bias_after(fmt, monkeypatch):
    # With oneDNN off every call is F.conv2d: a dilated conv runs without bias, then adds it (same values).
    ref, fused = _block(dilation=2)
    assert fused._cpu_state is None or fused._cpu_state.bias_after
    calls = []
    conv2d = cpu._conv2d

    def spy(x, weight, bias, *args):
        calls.append(bias is None)
        return conv2d(x, weight, bias, *args)

    monkeypatch.setattr(cpu, "_conv2d", spy)
    monkeypatch.setattr(cpu, "enabled", False)
    x = torch.randn(1, 8, 11, 11).contiguous(memory_format=fmt)
    with torch.no_grad():
        ys = [fused(x) for _ in range(2)]
    assert calls and all(calls)
    for y in ys:
        assert max_rel_error(y, _reference64(ref, x)) < 1e-5 and y.is_contiguous(memory_format=fmt)
    _, plain = _block(dilation=1)
    calls.clear()
    with torch.no_grad():
        plain(x)
    assert calls == [False]  # an undilated conv keeps the bias in the conv
