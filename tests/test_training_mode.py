"""A converted model switched to training mode (fusedconv/training_mode.py): every fused layer kind warns that it
keeps its BatchNorm folded (what the original computes in eval mode), construction and eval() do not warn, and
the forward still runs, computing the eval-mode function."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.training_mode import MESSAGE  # noqa: E402


def _models():
    yield "conv2d", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 8, 8)
    yield "conv1d", nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU()), (2, 3, 8)
    yield "linear", nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()), (4, 6)


@pytest.mark.parametrize("kind, model, shape", list(_models()), ids=[k for k, _, _ in _models()])
def test_train_warns_once_and_eval_does_not(kind, model, shape):
    model = randomize_bn(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # convert and its layers' construction switch nothing to training
        fused = fusedconv.convert(model)
        fused.eval()
    assert any(type(m).__module__.startswith("fusedconv.") for m in fused.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused.train()
    assert [str(w.message) for w in caught] == [MESSAGE]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # What the warning says: the eval-mode function, not the original's training-mode one.
        expected = copy.deepcopy(model).double().eval()(x.double())
        assert max_rel_error(fused(x), expected) < 1e-5
        assert max_rel_error(copy.deepcopy(model).double().train()(x.double()), expected) > 1e-2


def test_train_false_on_a_fused_layer_does_not_warn():
    layer = fusedconv.FusedConv2d(torch.randn(4, 3, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.train(False)
        layer.eval()
    with pytest.warns(UserWarning, match="switched to training mode"):
        layer.train(True)
    assert layer.training
