"""fusedconv.export.export_onnx: a converted model exports to ONNX as plain Conv / activation / Add nodes."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn

from util import max_rel_error, randomize_bn

import fusedconv
from fusedconv.export import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torchvision = pytest.importorskip("torchvision")

ALLOWED = {"Conv", "Relu", "Add", "MaxPool", "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Gemm"}


def _run(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


@torch.no_grad()
def test_resnet18_exports_only_standard_nodes_and_matches_onnxruntime(tmp_path):
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    converted = fusedconv.convert(model)
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "resnet18.onnx"
    proto = export_onnx(converted, (x,), path)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert set(ops) <= ALLOWED, ops  # no BatchNormalization, and no Mul left from the in-graph fold
    assert ops["Conv"] == 20 and ops["Add"] == 8
    assert max_rel_error(_run(onnx.load(str(path)), x), model(x)) < 1e-4


@torch.no_grad()
def test_constant_folding_keeps_nodes_that_read_activations():
    # A Mul between an activation and a constant must stay: only all-initializer nodes are folded.
    class ScaledBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.register_buffer("gain", torch.full((1, 4, 1, 1), 1.5))

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))) * self.gain

    model = randomize_bn(ScaledBlock()).eval()
    converted = fusedconv.convert(model)
    x = torch.randn(1, 3, 8, 8)
    proto = export_onnx(converted, x)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Mul"] == 1 and ops["Conv"] == 1 and "BatchNormalization" not in ops, ops
    assert max_rel_error(_run(proto, x), model(x)) < 1e-5
