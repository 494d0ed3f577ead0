"""A converted padding conv (TF "SAME", fusedconv/same_padding.py) under tracing and through the Triton op.

torch.export, ONNX export (run by onnxruntime) and torch.compile of a small model with a timm Conv2dSame chain
must see the pad, then the conv; under TRITON_INTERPRET=1 a FusedConv2d with an asymmetric static pre-pad and
one with the dynamic "same" pre-pad run through `fusedconv::conv_bn_act` (the route a CUDA tensor takes) and
match a float64 reference.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from util import max_rel_error, randomize_bn

import fusedconv
from fusedconv import FusedConv2d, ops, same_padding

timm_same = pytest.importorskip("timm.layers.conv2d_same")


class Stem(nn.Module):
    """Conv2dSame (stride 2: the dynamic pad) -> BN -> SiLU, then a residual Conv2dSame (stride 1, even kernel:
    an asymmetric static pad) -> BN -> + -> ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = timm_same.Conv2dSame(3, 8, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = timm_same.Conv2dSame(8, 8, 4, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = F.silu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + y)


def _pair():
    torch.manual_seed(0)
    model = randomize_bn(Stem()).eval()
    converted, report = fusedconv.convert(model, return_report=True)
    assert [r.detail for r in report.fused] == ["bn+silu", "bn+add+relu"], report.rows
    pads = [m.pre_pad for m in converted.modules() if isinstance(m, FusedConv2d)]
    assert pads == [same_padding.SAME, (1, 2, 1, 2)], pads
    return model, converted


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_torch_export_sees_the_pad_and_matches():
    model, converted = _pair()
    x = _x(2, 3, 17, 14)
    ep = torch.export.export(converted, (x,))
    targets = collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert not any("batch_norm" in t for t in targets), targets
    assert any("pad" in t for t in targets), targets
    assert max_rel_error(ep.module()(_x(2, 3, 17, 14, seed=1)), model(_x(2, 3, 17, 14, seed=1))) < 1e-5


def test_onnx_export_matches_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from fusedconv.export import export_onnx

    model, converted = _pair()
    x = _x(2, 3, 17, 14)
    proto = export_onnx(converted, (x,))
    kinds = collections.Counter(n.op_type for n in proto.graph.node)
    assert "BatchNormalization" not in kinds and kinds["Conv"] == 2, kinds
    # The exporter may keep a Pad node or fold the zero pad into the Conv's own (begin, end) pads.
    conv_pads = [list(a.ints) for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute
                 if a.name == "pads"]
    assert "Pad" in kinds or [1, 1, 2, 2] in conv_pads, (kinds, conv_pads)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert max_rel_error(torch.from_numpy(out), model(x)) < 1e-5


@torch.no_grad()
def test_torch_compile_fullgraph_matches_at_two_sizes():
    model, converted = _pair()
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    for shape in ((2, 3, 17, 14), (1, 3, 16, 15)):
        assert max_rel_error(compiled(_x(*shape, seed=2)), model(_x(*shape, seed=2))) < 1e-5


# ------------------------------------------------------------------------------------------------ the Triton op
@pytest.mark.interpret
@pytest.mark.parametrize("pre_pad,stride", [((0, 1, 2, 0), 1), (same_padding.SAME, 2)], ids=["static", "same"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pre_padded_module_runs_the_op(monkeypatch, pre_pad, stride, channels_last):
    monkeypatch.setattr(ops, "use_kernel", lambda x, w: True)  # what a CUDA tensor gets
    monkeypatch.setattr(ops, "_kernel_dtype_on_cuda", lambda x, w: True)
    seen = []
    op = ops.conv_bn_act

    def spy(x, *args):
        seen.append(tuple(x.shape))
        return op(x, *args)

    monkeypatch.setattr(ops, "conv_bn_act", spy)
    torch.manual_seed(3)
    weight, scale, shift = torch.randn(6, 4, 3, 3) * 0.3, torch.rand(6) + 0.5, torch.randn(6)
    fused = FusedConv2d(weight, scale, shift, stride=stride, activation="silu", pre_pad=pre_pad)
    assert fused.pre_pad == pre_pad
    x = _x(2, 4, 7, 6, seed=4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = fused(x)
    pad = same_padding.same_pad(7, 6, (3, 3), (stride, stride), (1, 1)) if pre_pad == same_padding.SAME else pre_pad
    xp = F.pad(x.double(), pad)
    assert seen == [tuple(xp.shape)]  # the op ran, on the padded input
    truth = F.silu(F.conv2d(xp, weight.double(), stride=stride) * scale.double().view(-1, 1, 1) +
                   shift.double().view(-1, 1, 1))
    assert out.shape == truth.shape and max_rel_error(out, truth) < 1e-5
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
