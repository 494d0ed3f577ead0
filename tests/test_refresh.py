"""fusedconv.refresh (fusedconv/refresh.py): writes through a `.data` alias, which no version counter or data
pointer records, reach the next forward only after refresh; every fused layer kind is refreshed; bad input raises.
References are the original PyTorch model with the same edit, run in float64."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.fused_layers import FusedAffineLayer  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

torchvision = pytest.importorskip("torchvision")

FP32_TOL = 1e-4


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _edit(model: nn.Module, name: str) -> None:
    """The write a user makes through `.data`: double the weight of the conv `name`, in place."""
    model.get_submodule(name).weight.data.mul_(2.0)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_refresh_makes_data_alias_writes_seen(flatten, layout):
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    fused = fusedconv.convert(model, flatten=flatten)
    x = _x(1, 3, 64, 64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fused(x), fused(x)  # routes chosen, folded and packed weights cached

    reference = copy.deepcopy(model).double()
    for name in ("layer1.0.conv1", "layer3.1.conv2"):
        _edit(reference, name)
        _edit(fused, name)  # the FusedConv2d at the conv's name
    expected = reference(x.double())

    # Invisible to the per-call checks (the reason refresh exists): the cached fold of the old weight is used.
    stale = fused(x)
    assert max_rel_error(stale, expected) > 1e-2

    assert fusedconv.refresh(fused) == sum(isinstance(m, FusedConv2d) for m in fused.modules())
    assert max_rel_error(fused(x), expected) <= FP32_TOL
    assert max_rel_error(fused(x), expected) <= FP32_TOL  # and on the call after (routes cached again)


@torch.no_grad()
def test_refresh_covers_nd_layers_and_scale():
    model = randomize_bn(nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8))).eval()
    fused = fusedconv.convert(model)
    assert isinstance(fused[0], FusedAffineLayer) and isinstance(fused[3], FusedAffineLayer)
    x = _x(2, 4, 16)
    fused(x)

    reference = copy.deepcopy(model).double()
    _edit(reference, "0")
    _edit(fused, "0")
    # Doubling a folded BN's scale and shift is doubling that BatchNorm's output: its gamma and beta.
    reference[4].weight.mul_(2.0)
    reference[4].bias.mul_(2.0)
    fused[3].scale.data.mul_(2.0)
    fused[3].shift.data.mul_(2.0)
    expected = reference(x.double())
    assert max_rel_error(fused(x), expected) > 1e-2

    assert fusedconv.refresh(fused) == 2
    assert max_rel_error(fused(x), expected) <= FP32_TOL


def test_refresh_rejects_frozen_and_non_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    frozen = fusedconv.convert(model, freeze=True)
    with pytest.raises(TypeError, match=r"model: a fusedconv\.FrozenModel"):
        fusedconv.refresh(frozen)
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module, got dict"):
        fusedconv.refresh({})
    assert fusedconv.refresh(nn.Sequential(nn.ReLU())) == 0
