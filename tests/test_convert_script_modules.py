"""TorchScript modules and convert: a scripted or traced model is refused with a clear error naming the TorchScript
route (`convert_torchscript`); a TorchScript child inside an eager model is left as it is while everything around
it is converted, exactly (float64). Before, both raised an AttributeError from deep inside the passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusedconv
from fusedconv.modules import FusedConv2d
from tests.util import max_rel_error, randomize_bn


def _block(c: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())


class _WithScriptedChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _block(), torch.jit.script(_block().eval())
        self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(self.b(self.a(x)))) + x)


def _model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _block(), _block(),
                          _WithScriptedChild())
    model = randomize_bn(model.eval(), 1).double()
    model[4] = torch.jit.script(model[4])
    model[5].b = torch.jit.script(randomize_bn(_block().eval(), 2).double())
    return model


@pytest.mark.parametrize("options", ({}, {"flatten": False}, {"freeze": True}))
def test_scripted_children_are_left_alone_and_the_rest_converted(options):
    model = _model()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        converted, report = fusedconv.convert(model, return_report=True, **options)
        for _ in range(2):
            assert max_rel_error(converted(x), want) < 1e-12
    # The stem, block 3 and the eager block inside the custom module are fused; the scripted ones are not.
    assert {row.scope for row in report.fused} == {"", "3", "5.a"}
    assert not any("could not trace" in note for note in report.notes)  # re-parameterization treats them as leaves
    if not options.get("freeze"):
        assert isinstance(converted[4], torch.jit.ScriptModule) and isinstance(converted[5].b, torch.jit.ScriptModule)
        assert isinstance(converted[3][0], FusedConv2d)


@pytest.mark.parametrize("how", ("script", "trace"))
@pytest.mark.parametrize("entry", ("convert", "reparameterize"))
def test_a_torchscript_model_is_refused_with_the_route_to_take(how, entry):
    eager = nn.Sequential(_block(), _block()).eval()
    scripted = torch.jit.script(eager) if how == "script" else torch.jit.trace(eager, torch.randn(1, 8, 6, 6))
    with pytest.raises(TypeError, match=r"model: expected an eager torch.nn.Module, got a TorchScript module "
                                        r"\(\w+\); convert TorchScript with fusedconv.graph.exported."
                                        r"convert_torchscript"):
        getattr(fusedconv, entry)(scripted)
