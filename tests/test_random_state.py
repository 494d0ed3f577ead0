"""The user's random generators around fusedconv's own forwards (fusedconv/random_state.py): convert and
reparameterize leave them as found, and their self-checks compare two forwards that drew the same numbers. (The
layout check of a converted model's first call: tests/test_cpu_boundary.py.)"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import global_draws, randomize_bn, seed_global_generators  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.random_state import kept_random_states, random_states, set_random_states  # noqa: E402


class _NoisyRep(nn.Module):
    """A RepVGG-style block (3x3 + 1x1 branches, each Conv -> BN, summed; reparameterize merges them) and a
    Conv -> BN -> ReLU (convert fuses it), with noise drawn in between from `source`'s global generator."""

    def __init__(self, source):
        super().__init__()
        self.source = source
        self.k3 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.k1 = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        if self.source == "torch":
            noise = torch.randn_like(y)
        elif self.source == "python":
            noise = random.random()
        else:
            noise = float(np.random.rand())
        return self.tail(y + 0.5 * noise)


@pytest.mark.parametrize("source", ("torch", "python", "numpy"))
@pytest.mark.parametrize("function", ("convert", "reparameterize"))
def test_conversion_leaves_the_generators_and_self_checks_a_noisy_forward(function, source):
    model = randomize_bn(_NoisyRep(source)).eval()
    x = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    seed_global_generators(3)
    expected = global_draws(3)
    seed_global_generators(3)
    # With example inputs both models run (the self-check): the original's noise must be the converted one's.
    new, report = getattr(fusedconv, function)(model, example_inputs=x, return_report=True)
    assert global_draws(3) == expected  # tracing and both self-check forwards left every generator as found
    assert report.max_rel_error < 1e-5
    assert not report.notes or all("differ" not in n for n in report.notes)
    with torch.no_grad():  # and the converted model is the same function, draw for draw
        seed_global_generators(4)
        want = model(x)
        seed_global_generators(4)
        assert (new(x) - want).abs().max() <= 1e-5 * want.abs().max()


def test_kept_random_states_restores_on_error():
    seed_global_generators(5)
    expected = global_draws(3)
    seed_global_generators(5)
    with pytest.raises(ValueError), kept_random_states():
        global_draws(3)
        raise ValueError("inside")
    assert global_draws(3) == expected


def test_set_random_states_replays_every_global_generator():
    states = random_states()
    first = global_draws(3)
    set_random_states(states)
    assert global_draws(3) == first


@pytest.mark.parametrize("source", ("torch", "python"))
def test_warmup_leaves_the_generators(source):
    converted = fusedconv.convert(randomize_bn(_NoisyRep(source)).eval())
    x = torch.randn(1, 3, 10, 10)
    seed_global_generators(6)
    expected = global_draws(3)
    seed_global_generators(6)
    fusedconv.warmup(converted, x, x[:, :, :8, :8], persist=False)
    assert global_draws(3) == expected


def test_export_onnx_leaves_the_generators():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from fusedconv.export import export_onnx

    model = fusedconv.convert(randomize_bn(_NoisyRep("python")).eval())
    x = torch.randn(1, 3, 10, 10)
    seed_global_generators(7)
    expected = global_draws(3)
    seed_global_generators(7)
    export_onnx(model, (x,))  # its trace runs random.random() once
    assert global_draws(3) == expected
