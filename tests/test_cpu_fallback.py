"""FusedConv2d's oneDNN CPU fast path (fusedconv/cpu.py) against PyTorch itself.

The fast path runs for float32 channels_last input on CPU: a oneDNN conv with a pre-packed folded weight and the
activation (and the residual add) as post-ops. Each case compares it with nn.Conv2d -> nn.BatchNorm2d(eval,
random statistics) -> activation (+ residual) and checks the path really ran (`_cpu_state.onednn_ok`), that the output
keeps the input's memory format, that NCHW input and grad-requiring input stay on the F.conv2d fallback, and
that a changed weight is repacked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import ACT_MODULES, max_rel_error, randomize_bn  # noqa: E402

from fusedconv import cpu  # noqa: E402
from fusedconv.activations import ACTIVATIONS  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

# The oneDNN route's mechanics on shapes small enough to run fast: small convs take it too here (by default they stay
# on F.conv2d, cpu.small_conv_macs).
pytestmark = [pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise conv ops"),
              pytest.mark.usefixtures("onednn_small_convs")]

TOL_FP32 = 1e-5
CL = torch.channels_last


def make_block(cin=8, cout=12, k=3, stride=1, padding=1, dilation=1, groups=1, act="relu", seed=0):
    """A reference Conv2d -> BatchNorm2d(eval, random stats) -> activation and its FusedConv2d."""
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False),
                        nn.BatchNorm2d(cout), ACT_MODULES[act]).eval()
    randomize_bn(ref, seed)
    return ref, FusedConv2d.from_modules(ref[0], ref[1], ref[2])


def run_both(ref, fused, x, residual=None):
    with torch.no_grad():
        y = fused(x, residual)
        z = ref[1](ref[0](x))
        expected = ref[2](z if residual is None else z + residual)
    return y, expected


def is_channels_last(t):
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def test_every_activation_is_covered():
    assert set(ACT_MODULES) == set(ACTIVATIONS)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_activation_and_residual_channels_last(act, with_residual):
    ref, fused = make_block(act=act)
    # Scaled so pre-activations span well past relu6's clamp and into every activation's interesting range.
    x = (4 * torch.randn(2, 8, 9, 10)).contiguous(memory_format=CL)
    residual = (4 * torch.randn(2, 12, 9, 10)).contiguous(memory_format=CL) if with_residual else None
    y, expected = run_both(ref, fused, x, residual)
    assert fused._cpu_state.onednn_ok is True, "the oneDNN path did not run"
    if act == "relu6":
        assert bool((expected == 6).any()), "inputs too small to exercise the clamp"
    assert max_rel_error(y, expected) < TOL_FP32
    assert is_channels_last(y)


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups", [
    (8, 12, 1, 1, 0, 1, 1),      # pointwise
    (8, 8, 3, 1, 1, 1, 8),       # depthwise
    (16, 32, 3, 2, 1, 1, 4),     # grouped, strided
    (8, 12, 3, 1, 2, 2, 1),      # dilated
    (8, 12, 5, 2, 0, 1, 1),      # no padding, stride 2
    (8, 24, 3, 1, 1, 1, 8),      # depthwise with channel multiplier
    (6, 10, (1, 3), (1, 2), (0, 1), 1, 1),  # non-square kernel / stride / padding
])
@pytest.mark.parametrize("with_residual", [False, True])
def test_geometry(cin, cout, k, stride, padding, dilation, groups, with_residual):
    ref, fused = make_block(cin, cout, k, stride, padding, dilation, groups, act="relu6", seed=1)
    x = (4 * torch.randn(2, cin, 11, 13)).contiguous(memory_format=CL)
    out_shape = ref[0](x).shape
    residual = torch.randn(out_shape) if with_residual else None  # NCHW residual with channels_last input
    y, expected = run_both(ref, fused, x, residual)
    assert fused._cpu_state.onednn_ok is True
    assert y.shape == expected.shape
    assert max_rel_error(y, expected) < TOL_FP32
    assert is_channels_last(y)


def test_nchw_input_stays_on_standard_fallback_and_stays_nchw():
    ref, fused = make_block(act="silu")
    x = torch.randn(1, 8, 9, 9)
    y, expected = run_both(ref, fused, x, torch.randn(1, 12, 9, 9))
    assert fused._cpu_state.onednn_ok is None, "NCHW input must not take the oneDNN path (it was measured slower)"
    assert max_rel_error(y, expected) < TOL_FP32
    assert y.is_contiguous()


def test_varying_input_sizes_reuse_the_packed_weight():
    ref, fused = make_block(act="relu")
    for shape in [(1, 8, 9, 9), (3, 8, 17, 5), (1, 8, 3, 3)]:
        x = torch.randn(shape).contiguous(memory_format=CL)
        y, expected = run_both(ref, fused, x)
        assert max_rel_error(y, expected) < TOL_FP32
    assert fused._cpu_state.onednn_ok is True


def test_weight_change_is_repacked():
    ref, fused = make_block(act="relu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    run_both(ref, fused, x)
    first_packed = fused._cpu_state.packed
    with torch.no_grad():
        fused.weight.mul_(-2.0)
        ref[0].weight.mul_(-2.0)
    y, expected = run_both(ref, fused, x)
    assert fused._cpu_state.packed is not first_packed
    assert max_rel_error(y, expected) < TOL_FP32


def test_grad_requiring_input_uses_autograd_fallback():
    ref, fused = make_block(act="relu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL).requires_grad_()
    y = fused(x)
    y.sum().backward()
    assert x.grad is not None and fused._cpu_state.onednn_ok is None


def test_disabled_switch_and_results_agree():
    ref, fused = make_block(act="hardswish")
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)
    residual = torch.randn(2, 12, 9, 9).contiguous(memory_format=CL)
    y_fast, expected = run_both(ref, fused, x, residual)
    cpu.enabled = False
    try:
        y_plain, _ = run_both(ref, fused, x, residual)
    finally:
        cpu.enabled = True
    assert max_rel_error(y_fast, expected) < TOL_FP32
    assert max_rel_error(y_plain, expected) < TOL_FP32


def test_failure_falls_back_and_is_remembered(monkeypatch):
    ref, fused = make_block(act="relu")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("oneDNN refused")

    # Both oneDNN entry points (the plain call and the one with a residual) refuse.
    monkeypatch.setattr(cpu, "_pointwise", broken)
    monkeypatch.setattr(cpu, "_pointwise_binary", broken)
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    for _ in range(2):
        y, expected = run_both(ref, fused, x)
        assert max_rel_error(y, expected) < TOL_FP32
        assert is_channels_last(y)
    assert fused._cpu_state.onednn_ok is False and len(calls) == 1
    ref, fused = make_block(act="relu", seed=1)
    residual = torch.randn(1, 12, 9, 9).contiguous(memory_format=CL)
    for _ in range(2):
        y, expected = run_both(ref, fused, x, residual)
        assert max_rel_error(y, expected) < TOL_FP32
        assert is_channels_last(y)
    assert fused._cpu_state.onednn_ok is False and len(calls) == 2


def test_converted_resnet_block_channels_last():
    torchvision = pytest.importorskip("torchvision")
    import fusedconv
    model = torchvision.models.resnet18(weights=None).eval()
    randomize_bn(model, 3)
    # layer1 only (small): a real stem + residual blocks through convert().
    small = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1).eval()
    converted = fusedconv.convert(small).to(memory_format=CL)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad():
        y, expected = converted(x), small(x)
    assert any(getattr(getattr(m, "_cpu_state", None), "onednn_ok", None) is True for m in converted.modules())
    assert max_rel_error(y, expected) < TOL_FP32
    assert is_channels_last(y)


def test_jit_trace_records_standard_conv():
    """torch.jit.trace (used by the legacy ONNX exporter) must record aten convolution, not the oneDNN op."""
    ref, fused = make_block(act="relu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        traced = torch.jit.trace(fused, (x,), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "mkldnn::_convolution_pointwise" not in graph and "aten::_convolution" in graph
    with torch.no_grad():
        y, expected = traced(x), ref(x)
    assert max_rel_error(y, expected) < TOL_FP32


def test_inference_mode_then_no_grad():
    ref, fused = make_block(act="silu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    with torch.inference_mode():
        y_inf = fused(x)
    y, expected = run_both(ref, fused, x)
    assert fused._cpu_state.onednn_ok is True
    assert max_rel_error(y_inf, expected) < TOL_FP32 and max_rel_error(y, expected) < TOL_FP32


def test_deepcopy_and_pickle_after_packing():
    """The packed oneDNN weight is derived state: copies drop it and rebuild their own."""
    import copy
    import io
    ref, fused = make_block(act="relu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    run_both(ref, fused, x)
    assert fused._cpu_state.packed is not None
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        assert clone._cpu_state is None
        assert set(clone.state_dict()) == {"weight", "scale", "shift"}
        y, expected = run_both(ref, clone, x)
        assert max_rel_error(y, expected) < TOL_FP32


def test_validation_and_routing_run_once_per_input_signature(monkeypatch):
    ref, fused = make_block(act="relu")
    calls = []
    real = cpu.check_inputs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu, "check_inputs", counting)
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    for _ in range(3):
        y, expected = run_both(ref, fused, x)
        assert max_rel_error(y, expected) < TOL_FP32
    assert len(calls) == 1
    run_both(ref, fused, torch.randn(1, 8, 9, 9))  # a new signature (NCHW) is validated once more
    assert len(calls) == 2
    with pytest.raises(ValueError, match="input: expected 8 channels"):  # bad input still raises every time
        fused(torch.randn(1, 5, 9, 9).contiguous(memory_format=CL))
    with pytest.raises(TypeError, match="input: expected dtype"):
        fused(torch.randn(1, 8, 9, 9, dtype=torch.float64).contiguous(memory_format=CL))


@pytest.mark.parametrize("edit", ["scale_in_place", "weight_data_swap", "load_state_dict", "new_shift_tensor"])
def test_every_documented_edit_is_seen_on_the_onednn_route(edit):
    ref, fused = make_block(act="relu")
    _, other = make_block(act="relu", seed=5)
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        before = fused(x)
        if edit == "scale_in_place":
            fused.scale.mul_(-1.5)
        elif edit == "weight_data_swap":
            fused.weight.data = torch.randn_like(fused.weight)
        elif edit == "load_state_dict":
            fused.load_state_dict(other.state_dict())
        else:
            fused.shift = fused.shift + 3.0
        after = fused(x)
    fresh = FusedConv2d(fused.weight, fused.scale, fused.shift, padding=1, activation="relu")
    with torch.no_grad():
        expected = fresh(x.contiguous())  # NCHW: the F.conv2d route, built from the edited tensors
    assert max_rel_error(after, expected) < TOL_FP32
    assert max_rel_error(after, before) > 1e-3
    assert fused._cpu_state.onednn_ok is True
