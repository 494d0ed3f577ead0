"""convert() on blocks written with attributes (not plain Sequentials) for every conv-like layer: a Conv1d ResNet
in torchvision BasicBlock style (downsample branch and `downsample is None` blocks), a Conv3d block, an MLP with
Linear + BatchNorm1d + ReLU, a ConvTranspose2d block with a residual, and torchvision's r3d_18 with its residual
add + ReLU in the fused epilogue. Each is compared in float64 against the original with the batch_norm calls
left counted; one block is then called another way (a submodule set after convert) and must take the exact
fallback, and chains that must stay unfused (a BatchNorm of the wrong rank, hooks, training mode) stay.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedconv
from fusedconv.fused_layers import FusedConv1d, FusedConv3d
from fusedconv.fused_linear import FusedLinear
from fusedconv.fused_transpose import FusedConvTranspose2d
from fusedconv.graph.specialize import guard_table
from util import batch_norm_count, count_ops, max_rel_error, randomize_bn

TOL64 = 1e-9


def _check(model, *inputs):
    """Convert a float64 copy with random BN statistics; check outputs and that no batch_norm call is left."""
    model = randomize_bn(model).eval().double()
    inputs = tuple(t.double() for t in inputs)
    converted, report = fusedconv.convert(model, example_inputs=inputs, return_report=True)
    with torch.no_grad():
        assert max_rel_error(converted(*inputs), model(*inputs)) < TOL64
    assert batch_norm_count(count_ops(model, *inputs)) > 0
    assert batch_norm_count(count_ops(converted, *inputs)) == 0, str(report)
    assert report.fused and not report.skipped, str(report)
    return model, converted, report


def _fallbacks(model) -> int:
    return sum(guard_table(m).fallback_calls for m in model.modules() if guard_table(m) is not None)


class BasicBlock1d(nn.Module):
    """torchvision's BasicBlock with Conv1d / BatchNorm1d; `downsample` is None unless the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet1d(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm1d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock1d(8, 8), BasicBlock1d(8, 8))
        self.layer2 = nn.Sequential(BasicBlock1d(8, 16, 2), BasicBlock1d(16, 16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool1d(x, 1), 1))


def test_conv1d_resnet_with_attributes():
    torch.manual_seed(0)
    _, converted, report = _check(ResNet1d(), torch.randn(2, 2, 64))
    details = collections.Counter(r.detail for r in report.fused if r.kind == "conv1d_bn_act")
    # stem + conv1 of 4 blocks: bn+relu; conv2 of 4 blocks: bn+add+relu; one downsample branch: bn
    assert details == {"bn+relu": 5, "bn+add+relu": 4, "bn": 1}, details
    assert sum(isinstance(m, FusedConv1d) for m in converted.modules()) == 10


class Block3d(nn.Module):
    """A 3-D residual block with attributes, a functional activation and a downsample branch."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, (1, 3, 3), 1, (0, 1, 1), bias=True)
        self.bn2 = nn.BatchNorm3d(cout)
        self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def test_conv3d_block_with_attributes():
    torch.manual_seed(1)
    _, converted, report = _check(Block3d(3, 6, 2), torch.randn(2, 3, 4, 8, 8))
    assert {(r.kind, r.detail) for r in report.fused} == {
        ("conv3d_bn_act", "bn+relu"), ("conv3d_bn_act", "bn+add+relu"), ("conv3d_bn_act", "bn")}
    assert sum(isinstance(m, FusedConv3d) for m in converted.modules()) == 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 12, bias=False)
        self.bn2 = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.act(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.head(x)


def test_attribute_style_mlp_with_linear_bn1d_relu():
    torch.manual_seed(2)
    _, converted, report = _check(MLP(), torch.randn(4, 10))
    assert [(r.kind, r.detail) for r in report.fused] == [("linear_bn_act", "bn+relu")] * 2
    assert sum(isinstance(m, FusedLinear) for m in converted.modules()) == 2


class UpBlock(nn.Module):
    """A decoder block: ConvTranspose2d -> BN -> + skip -> ReLU."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 4, 4, 2, 1, output_padding=0, groups=2, bias=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, skip):
        return torch.relu(self.bn(self.up(x)) + skip)


def test_conv_transpose_block_with_residual():
    torch.manual_seed(3)
    _, converted, report = _check(UpBlock(), torch.randn(2, 8, 5, 5), torch.randn(2, 4, 10, 10))
    assert [(r.kind, r.detail) for r in report.fused] == [("conv_transpose2d_bn_act", "bn+add+relu")]
    assert any(isinstance(m, FusedConvTranspose2d) for m in converted.modules())


def test_torchvision_r3d_18_residual_adds_in_the_epilogue():
    video = pytest.importorskip("torchvision.models.video")
    torch.manual_seed(4)
    _, converted, report = _check(video.r3d_18(num_classes=7), torch.randn(1, 3, 4, 32, 32))
    absorbed = [r for r in report.fused if r.detail.startswith("add+relu into")]
    assert len(absorbed) == 8, str(report)  # every BasicBlock's `out += residual; relu(out)`
    assert {r.kind for r in report.fused} == {"conv3d_bn_act"}
    for block in (converted.layer1[0], converted.layer4[0]):
        assert block.conv2[0].residual_required and block.conv2[0].act.name == "relu"


@torch.no_grad()
def test_block_called_another_way_takes_the_exact_fallback():
    torch.manual_seed(5)
    block = randomize_bn(BasicBlock1d(6, 6)).eval().double()
    converted = fusedconv.convert(block)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    assert max_rel_error(converted(x), block(x)) < TOL64 and _fallbacks(converted) == 0
    # A downsample set after convert: the guard `self.downsample is None` no longer holds.
    ds = randomize_bn(nn.Sequential(nn.Conv1d(6, 6, 1, bias=False), nn.BatchNorm1d(6)), seed=3).eval().double()
    block.downsample, converted.downsample = ds, copy.deepcopy(ds)
    assert max_rel_error(converted(x), block(x)) < TOL64
    assert _fallbacks(converted) == 1
    # The fused conv2 took the residual: called alone without it, it refuses instead of skipping the add.
    with pytest.raises(TypeError, match="residual"):
        converted.conv2(x)


class WrongRankBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x).unsqueeze(2)).squeeze(2))


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_chains_that_must_stay_unfused():
    torch.manual_seed(6)
    # conv -> unsqueeze -> BN2d: the BN does not read the conv output directly, so there is no chain.
    _, report = fusedconv.convert(randomize_bn(WrongRankBN()).eval(), return_report=True)
    assert not report.fused
    hooked = randomize_bn(Hooked()).eval()
    seen = []
    hooked.bn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    converted, report = fusedconv.convert(hooked, return_report=True)
    assert not report.fused and any("hooks" in r.detail for r in report.skipped), str(report)
    converted(torch.randn(1, 3, 2, 4, 4))
    assert seen  # the BN still runs and its hook still fires


def test_batchnorm_of_another_rank_after_conv1d_is_not_folded():
    class Mismatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, padding=1)
            self.bn = nn.SyncBatchNorm(4)
            self.bn3 = nn.BatchNorm3d(4)

        def forward(self, x):
            return self.bn3(self.conv(x))

    model = randomize_bn(Mismatch()).eval()
    _, report = fusedconv.convert(model, return_report=True)
    assert not report.fused
    assert any("BatchNorm3d after Conv1d" in r.detail for r in report.skipped), str(report)


class FlaggedUp(nn.Module):
    """A transposed-conv block whose residual depends on a flag the guards pin."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(6, 4, 3, 2, 1, output_padding=1, bias=True)
        self.bn = nn.BatchNorm1d(4)
        self.use_skip = True

    def forward(self, x, skip):
        y = self.bn(self.up(x))
        if self.use_skip:
            y = y + skip
        return torch.relu(y)


@torch.no_grad()
def test_transposed_and_linear_blocks_fall_back_exactly_over_their_roles():
    torch.manual_seed(7)
    original, converted, report = _check(FlaggedUp(), torch.randn(2, 6, 5), torch.randn(2, 4, 10))
    assert [(r.kind, r.detail) for r in report.fused] == [("conv_transpose1d_bn_act", "bn+add+relu")]
    x, skip = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(2, 4, 10, dtype=torch.float64)
    original.use_skip = converted.use_skip = False  # the role conv (with its bias) and role BN compute it
    assert max_rel_error(converted(x, skip), original(x, skip)) < TOL64 and _fallbacks(converted) == 1

    original, converted, report = _check(MLP(), torch.randn(4, 10))
    head = nn.Linear(12, 2).double()
    original.head, converted.head = head, copy.deepcopy(head)  # a submodule replaced after convert
    x = torch.randn(5, 10, dtype=torch.float64)
    assert max_rel_error(converted(x), original(x)) < TOL64 and _fallbacks(converted) == 1


@torch.no_grad()
def test_guarded_conv1d_block_exports_with_the_fused_modules():
    torch.manual_seed(8)
    original, converted, _ = _check(BasicBlock1d(4, 8, 2), torch.randn(2, 4, 16))
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    program = torch.export.export(converted, (x,))
    assert max_rel_error(program.module()(x), original(x)) < TOL64
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets), targets
