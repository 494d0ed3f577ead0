"""Activation classes of model libraries (timm's Swish, GELU, ...) recognised by what they compute.

`fusedconv.activations.LIBRARY_ACTIVATIONS` names them by module and class name; each is recognised only after
its class's forward gave the epilogue activation's values on a float64 probe. Checked here: every listed class
that this timm has is recognised and computes the same numbers, a class spelled the same but computing something
else (or with a forward replaced on the instance) is not, and a model built with them converts to fused layers
that agree with the original in float64.
"""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import activations  # noqa: E402
from fusedconv.activations import LIBRARY_ACTIVATIONS, ActivationSpec, spec_from_module  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

X = torch.cat([torch.linspace(-10, 10, 401, dtype=torch.float64), torch.randn(64, dtype=torch.float64) * 5])


def _library_classes():
    found = []
    for (module_name, class_name), name in sorted(LIBRARY_ACTIVATIONS.items()):
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # this library version lacks it: nothing to recognise
        found.append(pytest.param(cls, name, id=f"{module_name}.{class_name}"))
    return found


LIBRARY_CLASSES = _library_classes()


def test_timm_has_the_listed_classes():
    # The test extra installs timm; if it stopped shipping these, the parametrized tests below would test nothing.
    assert len(LIBRARY_CLASSES) == len(LIBRARY_ACTIVATIONS)


@pytest.mark.parametrize("cls,name", LIBRARY_CLASSES)
def test_library_class_is_recognised_and_computes_the_same(cls, name):
    module = cls()
    spec = spec_from_module(module)
    assert spec == ActivationSpec(name)
    assert max_rel_error(module(X.clone()), spec.apply(X.clone())) < 1e-12


def _impostor(forward):
    """A class spelled exactly like timm's Swish whose forward is `forward`."""
    cls = type("Swish", (nn.Module,), {"forward": lambda self, x: forward(x)})
    cls.__module__, cls.__qualname__ = "timm.layers.activations", "Swish"
    return cls


@pytest.mark.parametrize("forward", [
    lambda x: x * torch.sigmoid(2.0 * x),                   # another function
    lambda x: x * torch.sigmoid(x) + (x.abs() > 11) * 1e-3,  # differs only far out on the probe
    lambda x: torch.nn.functional.silu(x.flip(-1)),         # mixes elements
    lambda x: torch.nn.functional.silu(x).float(),          # changes the dtype
    lambda x: torch.nn.functional.silu(x)[..., :1],         # changes the shape
    lambda x: 1 / 0,                                        # cannot run
], ids=["other-function", "differs-far-out", "mixes-elements", "other-dtype", "other-shape", "raises"])
def test_a_class_spelled_alike_that_computes_otherwise_is_not_recognised(forward):
    assert spec_from_module(_impostor(forward)()) is None


def test_a_faithful_impostor_is_recognised():
    # The check is what the class computes, not where it comes from: the control for the test above.
    assert spec_from_module(_impostor(torch.nn.functional.silu)()) == ActivationSpec("silu")


def test_forward_replaced_on_the_instance_is_not_recognised():
    from timm.layers.activations import Swish
    module = Swish()
    module.forward = lambda x: x * 2.0
    assert spec_from_module(module) is None


def test_forward_patched_on_the_class_is_checked_again(monkeypatch):
    from timm.layers.activations import Swish
    assert spec_from_module(Swish()) == ActivationSpec("silu")
    monkeypatch.setattr(Swish, "forward", lambda self, x: x * 2.0)
    assert spec_from_module(Swish()) is None


def test_hooks_are_not_run_by_the_check():
    from timm.layers.activations import GELU
    module = GELU()
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(1))
    activations._checked.clear()
    assert spec_from_module(module) == ActivationSpec("gelu")
    assert calls == []


@pytest.mark.parametrize("act", ["Swish", "GELU", "HardSwish"])
def test_timm_model_with_library_activations_converts_exactly(act):
    from timm.layers import BatchNormAct2d
    from timm.layers import activations as timm_acts
    act_cls = getattr(timm_acts, act)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=act_cls),
                          nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), act_cls()).eval()
    randomize_bn(model, 0)
    model = model.double()  # "same function" is checked in float64 (fold included)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    converted = fusedconv.convert(copy.deepcopy(model))
    fused = [m for m in converted.modules() if type(m) is FusedConv2d]
    assert len(fused) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-12
