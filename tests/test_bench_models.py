"""bench/models.py: the fusedconv_frozen provider runs convert(model, freeze=True) and computes what eager does."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_frozen_provider_is_the_frozen_converted_model():
    import fusedconv
    from bench import models

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)).eval()
    x = torch.randn(1, 3, 16, 16)
    run, info = models.prepare("fusedconv_frozen", model, x, compile_mode="default", threads=1)
    assert info["fused"] == 2 and info["skipped"] == 0
    with torch.no_grad():
        for _ in range(3):
            y = run()
        assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)
    # The callable runs a FrozenModel (raises StopIteration when it runs anything else).
    next(c.cell_contents for c in run.__closure__ if isinstance(c.cell_contents, fusedconv.FrozenModel))
