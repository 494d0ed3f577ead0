"""The eager CPU path's common call (fusedconv/cpu.py: same tensors, unchanged, a signature seen before).

After the first call of a signature, FusedConv2d runs straight through to one oneDNN or F.conv2d call. These
tests call every route several times and check the later calls against nn.Conv2d -> nn.BatchNorm2d(eval) ->
activation (+ residual) computed in float64, that nothing the caller can see is written (input, residual,
earlier outputs, the module's own tensors), that hooks still fire, that the state_dict keys stay the same, that
an edit after oneDNN accepted the module repacks, and that torch.export still records standard aten ops.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import ACT_MODULES, max_rel_error, randomize_bn  # noqa: E402

from fusedconv import cpu  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

# The oneDNN route on shapes small enough to run fast: small convs take it too here (by default they stay on
# F.conv2d, cpu.small_conv_macs).
pytestmark = pytest.mark.usefixtures("onednn_small_convs")

TOL_FP32 = 1e-5
CL = torch.channels_last
CALLS = 3  # the first call routes and packs; the others take the common call


def make_block(act="relu", cin=8, cout=12, seed=0):
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), ACT_MODULES[act]).eval()
    randomize_bn(ref, seed)
    return ref, FusedConv2d.from_modules(ref[0], ref[1], ref[2])


def reference64(ref, x, residual=None):
    """Conv -> BN(eval) -> act (+ residual before the act) in float64."""
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        z = ref64[1](ref64[0](x.double()))
        return ref64[2](z if residual is None else z + residual.double())


def route_of(fused):
    state = fused._cpu_state
    return state.routes[next(reversed(state.routes))]


ROUTES = [
    pytest.param(CL, False, True, cpu.ONEDNN, id="onednn"),
    pytest.param(CL, True, True, cpu.ONEDNN, id="onednn-residual"),
    pytest.param(torch.contiguous_format, False, True, cpu.FOLDED, id="folded-nchw"),
    pytest.param(torch.contiguous_format, True, True, cpu.FOLDED, id="folded-nchw-residual"),
    pytest.param(CL, True, False, cpu.ONEDNN, id="channels_last-onednn-switched-off"),
]


@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
@pytest.mark.parametrize("fmt, with_residual, onednn_on, route", ROUTES)
def test_later_calls_match_float64_and_write_nothing_visible(act, fmt, with_residual, onednn_on, route):
    if route == cpu.ONEDNN and not cpu.available():
        pytest.skip("this PyTorch build has no oneDNN pointwise conv ops")
    ref, fused = make_block(act)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=fmt)
    residual = torch.randn(2, 12, 9, 9).contiguous(memory_format=fmt) if with_residual else None
    expected = reference64(ref, x, residual)
    x_before = x.clone()
    r_before = None if residual is None else residual.clone()
    own_before = {k: v.clone() for k, v in fused.state_dict().items()}
    outputs = []
    cpu.enabled = onednn_on
    try:
        with torch.no_grad():
            for _ in range(CALLS):
                outputs.append(fused(x, residual))
    finally:
        cpu.enabled = True
    assert route_of(fused) == route
    if onednn_on and route == cpu.ONEDNN:
        assert fused._cpu_state.onednn_ok is True
    first = outputs[0].clone()
    for y in outputs:
        assert max_rel_error(y.double(), expected) < TOL_FP32
        assert y.is_contiguous(memory_format=fmt)
    # Later calls allocate their own output: the caller's earlier results are left as they were.
    assert torch.equal(outputs[0], first)
    assert len({y.data_ptr() for y in outputs}) == len(outputs)
    assert torch.equal(x, x_before) and x.is_contiguous(memory_format=fmt)
    if residual is not None:
        assert torch.equal(residual, r_before)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, own_before[k]), f"{k} was written"
    assert set(fused.state_dict()) == {"weight", "scale", "shift"}


@pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise conv ops")
@pytest.mark.parametrize("edit", ["weight_data", "scale_in_place"])
def test_edit_after_onednn_accepted_is_repacked(edit):
    """The common call uses the packed weight without looking; an edit must make the next call repack."""
    _, fused = make_block("relu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        for _ in range(CALLS):
            fused(x)
        packed = fused._cpu_state.packed
        if edit == "weight_data":
            fused.weight.data = torch.randn_like(fused.weight)
        else:
            fused.scale.mul_(-2.0)
        outs = [fused(x) for _ in range(CALLS)]
    assert fused._cpu_state.packed is not packed and fused._cpu_state.onednn_ok is True
    # FusedConv2d's own definition, from its edited tensors, in float64: relu(conv(x, W) * scale + shift).
    w, scale, shift = (t.detach().double() for t in (fused.weight, fused.scale, fused.shift))
    conv = torch.nn.functional.conv2d(x.double(), w, None, 1, 1)
    expected = torch.relu(conv * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    for y in outs:
        assert max_rel_error(y.double(), expected) < TOL_FP32


def test_hooks_fire_on_every_call_and_can_change_the_input():
    ref, fused = make_block("relu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    seen = []
    fused.register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
    fused.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    with torch.no_grad():
        outs = [fused(x) for _ in range(CALLS)]
    assert len(seen) == CALLS
    expected = reference64(ref, x * 2.0)
    for y, s in zip(outs, seen):
        assert torch.equal(y, s) and max_rel_error(y.double(), expected) < TOL_FP32


def test_export_after_eager_calls_records_standard_aten_ops():
    """Eager calls fill the CPU state; torch.export must still see aten convolution, never the oneDNN op."""
    ref, fused = make_block("relu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    residual = torch.randn(1, 12, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        for _ in range(CALLS):
            fused(x, residual)
    program = torch.export.export(fused, (x, residual))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("convolution" in t or "conv2d" in t for t in targets), targets
    assert not any("mkldnn" in t for t in targets), targets
    with torch.no_grad():
        y = program.module()(x, residual)
    assert max_rel_error(y.double(), reference64(ref, x, residual)) < TOL_FP32


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_a_fold_the_dtype_cannot_hold_stays_on_the_general_path(fmt):
    """scale * weight overflows float32 although conv(x) * scale does not: the folded weight is refused, and
    every call (not only the first) takes the general path, which applies the scale to the conv output."""
    weight = torch.full((2, 2, 1, 1), 10.0)
    scale = torch.tensor([1e38, 1.0])
    shift = torch.tensor([0.5, -0.5])
    fused = FusedConv2d(weight, scale, shift, activation="relu")
    x = torch.full((1, 2, 3, 3), 1e-3).contiguous(memory_format=fmt)
    conv = torch.nn.functional.conv2d(x.double(), weight.double())
    expected = torch.relu(conv * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    with torch.no_grad():
        outs = [fused(x) for _ in range(CALLS)]
    for y in outs:
        assert torch.isfinite(y).all()
        assert max_rel_error(y.double(), expected) < TOL_FP32
    assert route_of(fused) == cpu.GENERIC
    with torch.no_grad():
        fused.scale.fill_(2.0)  # now the fold fits: the edit is seen and the signature is routed again
        outs = [fused(x) for _ in range(CALLS)]
    assert route_of(fused) != cpu.GENERIC
    expected = torch.relu(conv * 2.0 + shift.double().view(1, -1, 1, 1))
    for y in outs:
        assert max_rel_error(y.double(), expected) < TOL_FP32


@pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise conv ops")
def test_onednn_refusing_a_later_call_falls_back_and_is_remembered(monkeypatch):
    """oneDNN accepted the module, then raises for a new signature: that call and the later ones take
    F.conv2d (exact, channels_last kept) instead of surfacing oneDNN's error."""
    ref, fused = make_block("relu")
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x)
    assert fused._cpu_state.onednn_ok is True
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("oneDNN refused")

    monkeypatch.setattr(cpu, "_pointwise", broken)
    bigger = torch.randn(2, 8, 11, 11).contiguous(memory_format=CL)
    with torch.no_grad():
        outs = [fused(bigger) for _ in range(CALLS)]
    assert fused._cpu_state.onednn_ok is False and len(calls) == 1
    expected = reference64(ref, bigger)
    for y in outs:
        assert y.is_contiguous(memory_format=CL) and max_rel_error(y.double(), expected) < TOL_FP32
