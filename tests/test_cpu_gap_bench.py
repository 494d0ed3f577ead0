"""The CPU-gap A/B tool (bench/cpu_gap.py) records the oneDNN calls a converted model really makes.

No timing is asserted: this checks that the recorder sees one call per fused layer of one forward (binary, in
place where the residual is private to the block, for the layer that took the residual), that replaying the recorded arguments reproduces the recorded outputs, that the
recorded forward's output is the model's, and that the recorder leaves the eager path unpatched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cpu_gap  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu  # noqa: E402


# The oneDNN route on shapes small enough to run fast: small convs take it too here (by default they stay on
# F.conv2d, cpu.small_conv_macs).
pytestmark = pytest.mark.usefixtures("onednn_small_convs")

class _Block(nn.Module):
    """conv -> BN -> relu, conv -> BN, + a downsampled residual, relu: a small torchvision-style block."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.down(x))


@pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise convolution")
def test_recorder_sees_each_fused_call_once_and_replays_exactly():
    torch.manual_seed(0)
    model = _Block().eval()
    for bn in (model.bn1, model.bn2, model.down[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 16, 16)
    before = (cpu._pointwise, cpu._pointwise_binary, cpu._pointwise_binary_inplace)
    with torch.no_grad():
        fc = fusedconv.convert(model)
        expected = fc(x)
        calls, *recorded_ops = cpu_gap._record_fusedconv(fc, x)
        assert (cpu._pointwise, cpu._pointwise_binary, cpu._pointwise_binary_inplace) == before
        assert tuple(recorded_ops) == before
        ops_of = dict(zip("ubi", recorded_ops))
        kinds = sorted(kind for kind, _, _, _ in calls)
        # The residual is the downsample's output, private to the block: written in place where the build can.
        assert kinds == ["i" if cpu._pointwise_binary_inplace is not None else "b", "u", "u"], kinds
        for kind, args, y, _ in calls:
            if kind == "i":  # writes into its first argument: replay into another copy of the residual
                args = (args[0].clone(memory_format=torch.preserve_format),) + args[1:]
            again = ops_of[kind](*args)
            assert torch.equal(again, y)
        # The recorded forward ran the model: its last call's output is the model's output (same values).
        assert torch.allclose(calls[-1][2], expected, rtol=0, atol=0)


def test_flat_check_costs_time_both_checks_of_a_flat_model():
    # A wrapper that only calls the block: flatten gives the model one straight-line forward through it.
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        fc = fusedconv.convert(model)
        fc(x)
    costs = cpu_gap.flat_check_costs(fc, x, rounds=2)
    assert set(costs) == {"flat_check (tree)", "flat_states (leaves)"}
    assert all(len(cold) == len(warm) == 2 for cold, warm in costs.values())
    assert all(t >= 0 for cold, warm in costs.values() for t in cold + warm)
    with torch.no_grad():
        assert cpu_gap.flat_check_costs(fusedconv.convert(model, flatten=False), x, rounds=1) == {}


def test_command_line_takes_threads_and_keeps_positional_form():
    args = cpu_gap._parse(["torchvision:mobilenet_v2", "5", "--threads", "2"])
    assert (args.spec, args.rounds, args.mode, args.threads) == ("torchvision:mobilenet_v2", 5, None, 2)
    args = cpu_gap._parse(["torchvision:resnet50", "7", "inplace"])
    assert (args.rounds, args.mode, args.threads) == (7, "inplace", 1)
    with pytest.raises(SystemExit):
        cpu_gap._parse(["--threads", "0"])
