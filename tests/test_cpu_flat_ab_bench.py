"""bench/cpu_flat_ab.py: the A/B tool runs every variant and refuses a model without a flat forward."""

from __future__ import annotations

import os
import sys

import pytest
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("torchvision")


def test_every_variant_timed():
    from bench import cpu_flat_ab
    times = cpu_flat_ab.main("torchvision:resnet18", threads=1, rounds=1)
    assert set(times) == {"fusedconv", "flat_graph_direct", "fusedconv_module_calls", "fusedconv_blocks", "boundary_copy",
                          "flat_guard", "leaf_states"}
    assert all(len(v) == 1 and v[0] > 0 for v in times.values())


def test_model_without_flat_forward_refused(monkeypatch):
    from bench import cpu_flat_ab
    from fusedconv import model_specs
    monkeypatch.setattr(model_specs, "build_model", lambda spec: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(SystemExit, match="no flat forward"):
        cpu_flat_ab.main("any", threads=1, rounds=1)
