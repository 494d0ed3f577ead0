"""Converted models under torch.func transforms: vmap and jacrev give what they give on the original model (the
CPU layout boundary steps aside there, fusedconv/cpu_boundary.py; fused layers compute through their usual routes,
which functorch batches or differentiates)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torchvision

import fusedconv
from tests.util import max_rel_error, randomize_bn


def test_vmap_over_a_converted_resnet18():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None).eval(), 1, example=torch.randn(2, 3, 64, 64))
    converted = fusedconv.convert(model)
    x = torch.randn(1, 3, 64, 64)
    xs = torch.randn(3, 1, 3, 64, 64)
    with torch.no_grad():
        converted(x), converted(x)  # routes chosen, layout switched, direct calls set up for this signature
        want = torch.func.vmap(model)(xs)
        got = torch.func.vmap(converted)(xs)
        assert got.shape == want.shape == (3, 1, 1000)
        assert max_rel_error(got, want) < 1e-5
        # and the plain call after it still matches
        assert max_rel_error(converted(x), model(x)) < 1e-5


def test_jacrev_of_a_converted_model_in_float64():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3))
    model = randomize_bn(model.eval(), 2).double()
    converted = fusedconv.convert(copy.deepcopy(model))
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    want = torch.func.jacrev(lambda t: model(t).sum((2, 3)))(x)
    got = torch.func.jacrev(lambda t: converted(t).sum((2, 3)))(x)
    assert max_rel_error(got, want) < 1e-12
