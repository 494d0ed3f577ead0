"""torch.fx symbolic tracing of converted models: fused modules become leaf calls and the traced GraphModule
computes what the converted model computes (float64, random BN statistics)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402

FUSED_TYPES = ("FusedConv2d", "FusedConv1d", "FusedConv3d", "FusedConvTranspose2d", "FusedLinear")


def _block(kind):
    if kind == "conv2d":
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), (2, 4, 6, 6)
    if kind == "depthwise":
        return nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU6()), (2, 8, 6, 6)
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.SiLU()), (2, 4, 10)
    if kind == "conv3d":
        return nn.Sequential(nn.Conv3d(4, 8, 3), nn.BatchNorm3d(8), nn.ReLU()), (2, 4, 5, 5, 5)
    if kind == "transpose":
        return nn.Sequential(nn.ConvTranspose2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), (2, 4, 5, 5)
    if kind == "linear":
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()), (3, 4)
    raise AssertionError(kind)


def _leaf_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"
            and type(gm.get_submodule(n.target)).__name__ in FUSED_TYPES]


@pytest.mark.parametrize("kind", ["conv2d", "depthwise", "conv1d", "conv3d", "transpose", "linear"])
def test_every_fused_module_type_traces_as_one_leaf(kind):
    model, shape = _block(kind)
    model = randomize_bn(model).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    converted = fusedconv.convert(model, reparameterize=False)
    assert any(type(m).__name__ in FUSED_TYPES for m in converted.modules())
    gm = fx.symbolic_trace(converted)
    assert _leaf_targets(gm) == ["0"]
    with torch.no_grad():
        assert max_rel_error(gm(x), model(x)) < 1e-10


def test_resnet_with_fused_residual_blocks_traces_and_matches():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.resnet18(weights=None)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    converted, report = fusedconv.convert(model, example_inputs=x, return_report=True)
    assert report.fused
    gm = fx.symbolic_trace(converted)
    leaves = _leaf_targets(gm)
    assert len(leaves) == sum(type(m).__name__ == "FusedConv2d" for m in converted.modules()) > 0
    with torch.no_grad():
        assert max_rel_error(gm(x), model(x)) < 1e-10
        assert max_rel_error(gm(x), converted(x)) < 1e-10


def test_feature_extractor_on_a_converted_model():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    model = randomize_bn(torchvision.models.resnet18(weights=None)).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    converted = fusedconv.convert(model, example_inputs=x)
    extractor = create_feature_extractor(converted, return_nodes={"layer2": "c3", "layer4": "c5"})
    reference = create_feature_extractor(model, return_nodes={"layer2": "c3", "layer4": "c5"})
    with torch.no_grad():
        got, want = extractor(x), reference(x)
    assert set(got) == {"c3", "c5"}
    for name in got:
        assert max_rel_error(got[name], want[name]) < 1e-10


def test_real_calls_do_not_take_the_leaf_path():
    model, shape = _block("conv2d")
    converted = fusedconv.convert(model.eval(), reparameterize=False)
    x = torch.randn(*shape)
    y = converted(x)
    assert isinstance(y, torch.Tensor) and not isinstance(y, fx.Proxy)
