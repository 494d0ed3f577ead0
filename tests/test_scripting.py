"""torch.jit.script of a converted model (or of any fusedconv module) raises an error that names the module and
says what works instead (fusedconv/scripting.py), rather than TorchScript's "Can't get source" failure; the
original model still scripts, and the converted one still traces."""

from __future__ import annotations

import pytest
import torch
from util import max_rel_error, randomize_bn

import fusedconv
from fusedconv.fused_layers import FusedConv1d

torchvision = pytest.importorskip("torchvision")

MESSAGE = r"torch\.jit\.script: \w+ is a fusedconv module .* use torch\.jit\.trace"


def _resnet18():
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10), 1).eval()


@pytest.mark.parametrize("options", [{}, {"flatten": False}, {"freeze": True}], ids=["flat", "blocks", "frozen"])
def test_converted_model_refuses_scripting_with_a_clear_error(options):
    model = _resnet18()
    converted = fusedconv.convert(model, **options)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.jit.script(converted)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        scripted = torch.jit.script(model)  # the original is untouched by convert and still scripts
        traced = torch.jit.trace(converted, x, check_trace=False)
        reference = model(x)
        assert max_rel_error(scripted(x), reference) < 1e-6
        assert max_rel_error(traced(x), reference) < 1e-5


def test_lone_fused_layers_refuse_scripting():
    conv = fusedconv.FusedConv2d.from_modules(torch.nn.Conv2d(4, 8, 3), torch.nn.BatchNorm2d(8).eval(), "relu")
    with pytest.raises(RuntimeError, match=MESSAGE.replace(r"\w+", "FusedConv2d")):
        torch.jit.script(conv)
    conv1d = FusedConv1d.from_modules(torch.nn.Conv1d(4, 8, 3), torch.nn.BatchNorm1d(8).eval(), "relu")
    with pytest.raises(RuntimeError, match=MESSAGE.replace(r"\w+", "FusedConv1d")):
        torch.jit.script(torch.nn.Sequential(torch.nn.Identity(), conv1d))


def test_reparameterized_model_refuses_scripting():
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("repvgg_a0", pretrained=False, num_classes=10), 2).eval()
    merged = fusedconv.reparameterize(model)
    with pytest.raises(RuntimeError, match=MESSAGE.replace(r"\w+", "RepVggBlock")):
        torch.jit.script(merged)
