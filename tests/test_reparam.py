"""Tests for structural re-parameterization (fusedconv.reparameterize): multi-branch blocks written here after
the published designs (RepVGG, ACNet, DBB, MobileOne) plus timm's repvgg_a0 / mobileone_s0, all with random
weights and randomized BN statistics, compared against the unconverted PyTorch model."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from util import batch_norm_count, count_ops, max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.graph.reparam_math import (  # noqa: E402
    ConvMap, NotMergeable, compose, grouped_conv2d, merge_sum, regroup,
)
from fusedconv.reparam import reparameterize  # noqa: E402

FP32_TOL = 1e-5


def conv_bn(cin, cout, k, stride=1, padding=None, groups=1, dilation=1):
    if padding is None:
        padding = tuple(dilation * (kk // 2) for kk in ((k, k) if isinstance(k, int) else k))
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


# ---------------------------------------------------------------------------------------------- test blocks
class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al. 2021): kxk conv+BN + 1x1 conv+BN + identity BN, optional learned branch scalars."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, dilation=1, alpha=False):
        super().__init__()
        self.rbr_dense = conv_bn(cin, cout, k, stride, groups=groups, dilation=dilation)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, padding=0, groups=groups)
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.alpha = nn.Parameter(torch.rand(3) + 0.5) if alpha else None
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        if self.alpha is None:
            id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
            return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)
        out = self.alpha[0] * self.rbr_dense(x) + self.rbr_1x1(x) * self.alpha[1]
        if self.rbr_identity is not None:
            out = out + self.alpha[2] * self.rbr_identity(x)
        return self.nonlinearity(out)


class ScalarAlphaRepVGG(nn.Module):
    """RepVGG variant with one learned scalar per branch held as separate 1-element parameters."""

    def __init__(self, c):
        super().__init__()
        self.dense, self.pw, self.idbn = conv_bn(c, c, 3), conv_bn(c, c, 1, padding=0), nn.BatchNorm2d(c)
        self.a_dense = nn.Parameter(torch.tensor(0.7))
        self.a_pw = nn.Parameter(torch.tensor([1.3]))

    def forward(self, x):
        return F.relu(self.a_dense * self.dense(x) + self.a_pw * self.pw(x) + self.idbn(x) / 2)


class ACBlock(nn.Module):
    """ACNet (Ding et al. 2019): kxk + kx1 + 1xk convs, each with BN, summed."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1):
        super().__init__()
        self.square_conv = nn.Conv2d(cin, cout, (k, k), stride, k // 2, groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        self.ver_conv = nn.Conv2d(cin, cout, (k, 1), stride, (k // 2, 0), groups=groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)
        self.hor_conv = nn.Conv2d(cin, cout, (1, k), stride, (0, k // 2), groups=groups, bias=False)
        self.hor_bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        square = self.square_bn(self.square_conv(x))
        vertical = self.ver_bn(self.ver_conv(x))
        horizontal = self.hor_bn(self.hor_conv(x))
        return self.act(square + vertical + horizontal)


class BNAndPadLayer(nn.Module):
    """DBB's BN that pads its output with BN(0), so a following unpadded kxk conv sees the right border."""

    def __init__(self, pad_pixels, num_features):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, x):
        output = self.bn(x)
        if self.pad_pixels > 0:
            pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / \
                torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            p = self.pad_pixels
            output[:, :, 0:p, :] = pad_values
            output[:, :, -p:, :] = pad_values
            output[:, :, :, 0:p] = pad_values
            output[:, :, :, -p:] = pad_values
        return output


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1x1 conv initialised as the identity: forward adds a fixed identity kernel to the weight."""

    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = torch.zeros(channels, input_dim, 1, 1)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = id_value
        nn.init.zeros_(self.weight)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device).type_as(self.weight)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class DiverseBranchBlock(nn.Module):
    """DBB (Ding et al. 2021): kxk, 1x1, 1x1 -> avg pool, 1x1 -> kxk branches, each ending in BN.

    `pad_in_1x1=True` writes the border-exact padding as a padded 1x1 conv instead of BNAndPadLayer.
    """

    def __init__(self, cin, cout, k=3, stride=1, groups=1, internal=None, pad_in_1x1=False):
        super().__init__()
        p = k // 2
        self.dbb_origin = conv_bn(cin, cout, k, stride, p, groups)
        if groups < cout:
            self.dbb_avg = nn.Sequential()
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(p, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg = nn.Sequential()
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, p))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = internal or (2 * cin if groups == cin else cin)
        self.dbb_1x1_kxk = nn.Sequential()
        if pad_in_1x1:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, p, groups=groups, bias=False))
            self.dbb_1x1_kxk.add_module("bn1", nn.BatchNorm2d(internal))
        else:
            if internal == cin:  # as published: the 1x1 starts as the identity
                self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
            else:
                self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, groups=groups, bias=False))
            self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(p, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class MobileOneBlock(nn.Module):
    """MobileOne (Vasu et al. 2023): k over-parameterized kxk conv+BN branches, a 1x1 scale branch, skip BN."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, num_conv_branches=3):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, k // 2, groups)
                                      for _ in range(num_conv_branches))
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.activation = nn.ReLU()

    def forward(self, x):
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(len(self.rbr_conv)):
            out += self.rbr_conv[ix](x)
        return self.activation(out)


class MobileOneDWPW(nn.Module):
    """A MobileOne unit: depthwise MobileOne block then pointwise MobileOne block."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.dw = MobileOneBlock(cin, cin, 3, stride, groups=cin, num_conv_branches=2)
        self.pw = MobileOneBlock(cin, cout, 1, 1, num_conv_branches=2)

    def forward(self, x):
        return self.pw(self.dw(x))


# ---------------------------------------------------------------------------------------------- helpers
def _prepare(model, seed=0):
    torch.manual_seed(seed)
    for m in model.modules():  # non-default conv weights and biases everywhere
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.3)
    return randomize_bn(model, seed).eval()


def _check_block(model, x, n_convs=1):
    """Reparameterize, compare to the original in fp32, assert one conv per block and no batch norm."""
    model = _prepare(model)
    with torch.no_grad():
        ref = model(x)
    before = copy.deepcopy(model.state_dict())
    out_model, report = reparameterize(model, return_report=True)
    # The input model is untouched (not in place).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.fused and not report.skipped, str(report)
    assert all(r.kind == "reparam" for r in report.rows)
    with torch.no_grad():
        out = out_model(x)
    err = max_rel_error(out, ref)
    assert err < FP32_TOL, f"relative error {err:.2e}\n{report}"
    counts = count_ops(out_model, x)
    assert counts["convolution"] == n_convs, counts
    assert batch_norm_count(counts) == 0, counts
    return out_model, report


# ---------------------------------------------------------------------------------------------- block tests
@pytest.mark.parametrize("cin,cout,k,stride,groups,dilation", [
    (8, 8, 3, 1, 1, 1),  # all three branches
    (8, 16, 3, 2, 1, 1),  # downsampling: no identity
    (8, 8, 3, 1, 4, 1),  # grouped, identity respects groups
    (8, 8, 3, 1, 8, 1),  # depthwise
    (8, 8, 5, 1, 2, 1),
    (8, 12, 7, 2, 1, 1),  # 7x7 stride 2
    (8, 8, 3, 1, 1, 2),  # dilated kxk, 1x1 and identity land on its centre tap
])
def test_repvgg(cin, cout, k, stride, groups, dilation):
    x = torch.randn(2, cin, 11, 12)
    _, report = _check_block(RepVGGBlock(cin, cout, k, stride, groups, dilation), x)
    n_branches = 3 if cin == cout and stride == 1 else 2
    assert report.fused[0].detail.startswith(f"{n_branches} branches")


@pytest.mark.parametrize("cin,cout,stride", [(8, 8, 1), (8, 16, 2)])
def test_repvgg_alpha(cin, cout, stride):
    _check_block(RepVGGBlock(cin, cout, 3, stride, alpha=True), torch.randn(2, cin, 10, 9))


def test_scalar_parameters_and_division():
    _check_block(ScalarAlphaRepVGG(6), torch.randn(2, 6, 8, 8))


@pytest.mark.parametrize("cin,cout,k,stride,groups", [(8, 8, 3, 1, 1), (8, 16, 3, 2, 2), (4, 4, 5, 1, 4)])
def test_acnet(cin, cout, k, stride, groups):
    _check_block(ACBlock(cin, cout, k, stride, groups), torch.randn(2, cin, 11, 10))


@pytest.mark.parametrize("cin,cout,k,stride,groups,pad_in_1x1", [
    (8, 8, 3, 1, 1, False),
    (8, 16, 3, 2, 1, False),
    (8, 8, 5, 1, 2, False),
    (8, 8, 3, 1, 8, False),  # depthwise: the avg branch is a bare avg pool (padded), 1x1 -> kxk widens
    (8, 8, 3, 1, 2, False),  # grouped, identity-based 1x1
    (8, 8, 3, 1, 1, True),  # border-exact padding written as a padded 1x1 conv
])
def test_dbb(cin, cout, k, stride, groups, pad_in_1x1):
    block = DiverseBranchBlock(cin, cout, k, stride, groups, pad_in_1x1=pad_in_1x1)
    _, report = _check_block(block, torch.randn(2, cin, 11, 10))
    assert report.fused[0].detail.startswith(f"{4 if groups < cout else 3} branches"), str(report)


@pytest.mark.parametrize("cin,cout,k,stride,groups,branches", [
    (8, 8, 3, 1, 1, 3), (8, 16, 3, 2, 1, 4), (8, 8, 3, 1, 8, 2), (8, 8, 1, 1, 1, 3), (8, 8, 5, 2, 8, 2),
    (8, 16, 1, 1, 1, 1),  # a single branch summed onto zeros (timm mobileone_s4's expansion blocks)
])
def test_mobileone(cin, cout, k, stride, groups, branches):
    _check_block(MobileOneBlock(cin, cout, k, stride, groups, branches), torch.randn(2, cin, 10, 11))


def test_nested_blocks_keep_their_own_scope():
    model = nn.Sequential(MobileOneDWPW(8, 16, stride=2), RepVGGBlock(16, 16), ACBlock(16, 8))
    out_model, report = _check_block(model, torch.randn(1, 8, 12, 12), n_convs=4)
    assert isinstance(out_model, nn.Sequential)  # the root keeps its class: sums lived in the blocks
    assert sorted(r.scope for r in report.fused) == ["0.dw", "0.pw", "1", "2"]
    assert type(out_model[1]).__name__ == "RepVGGBlock"  # GraphModule with the block's class name
    assert "reparam_conv.weight" in out_model[1].state_dict()


def test_partial_sum_keeps_the_other_operand():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(6, 6, 3), conv_bn(6, 6, 1, padding=0)

        def forward(self, x, skip):
            return self.a(x) + skip + self.b(x) - 0.5

    model = _prepare(TwoInputs())
    x, skip = torch.randn(2, 6, 7, 7), torch.randn(2, 6, 7, 7)
    out_model, report = reparameterize(model, return_report=True, example_inputs=(x, skip))
    assert len(report.fused) == 1 and report.max_rel_error < FP32_TOL
    counts = count_ops(out_model, x, skip)
    assert counts["convolution"] == 1 and batch_norm_count(counts) == 0
    with torch.no_grad():
        assert max_rel_error(out_model(x, skip), model(x, skip)) < FP32_TOL


class LayerScaleMixer(nn.Module):
    """FastViT's RepMixer: x + layer_scale * (mixer(x) - norm(x)), mixer a depthwise conv+BN, norm a BN."""

    def __init__(self, c):
        super().__init__()
        self.mixer = MobileOneBlock(c, c, 3, 1, groups=c, num_conv_branches=1)
        self.mixer.activation = nn.Identity()
        self.norm = nn.BatchNorm2d(c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


def test_layer_scale_distributes_over_inner_sum():
    _, report = _check_block(LayerScaleMixer(6), torch.randn(2, 6, 7, 9))
    assert [r.scope for r in report.fused] == ["mixer", ""], str(report)


def test_half_precision_block():
    model = _prepare(RepVGGBlock(8, 8)).half()
    x = torch.randn(2, 8, 9, 9).half()
    out_model, report = reparameterize(model, return_report=True)
    assert len(report.fused) == 1 and out_model.reparam_conv.weight.dtype == torch.float16
    with torch.no_grad():
        ref64 = _prepare(RepVGGBlock(8, 8)).double()(x.double())  # same seed: same weights, in float64
        assert max_rel_error(out_model(x), ref64) < 1e-2
        assert max_rel_error(model(x), ref64) < 1e-2


def test_unmergeable_wider_group_falls_back_to_the_closer_input():
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b, self.c = conv_bn(4, 4, 3), conv_bn(4, 4, 3), conv_bn(4, 4, 1, padding=0), \
                conv_bn(4, 4, 3)

        def forward(self, x):
            y = self.stem(x)  # every branch is linear in x too, but stem -> a is 3x3 after 3x3: not one conv
            return F.relu(self.a(y) + self.b(y) + self.c(x))

    model = _prepare(Stacked())
    x = torch.randn(1, 4, 8, 8)
    out_model, report = reparameterize(model, return_report=True)
    assert len(report.fused) == 1 and report.fused[0].detail.startswith("2 branches"), str(report)
    with torch.no_grad():
        assert max_rel_error(out_model(x), model(x)) < FP32_TOL
    counts = count_ops(out_model, x)
    # stem, merged a+b, c; the BNs of stem and c stay (single conv -> BN chains are convert's to fold).
    assert counts["convolution"] == 3 and batch_norm_count(counts) == 2


# ---------------------------------------------------------------------------------------------- left alone
def _assert_untouched(model, x, reason_part=None):
    model = _prepare(model)
    out_model, report = reparameterize(model, return_report=True)
    assert not report.fused, str(report)
    if reason_part is not None:
        assert any(reason_part in r.detail for r in report.skipped), str(report)
    with torch.no_grad():
        assert torch.equal(out_model(x), model(x))
    return report


def test_misaligned_centres_are_reported():
    class Misaligned(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, stride=2, padding=1)
            self.b = conv_bn(4, 4, 2, stride=2, padding=0)  # same output size on even inputs, shifted taps

        def forward(self, x):
            return self.a(x) + self.b(x)

    _assert_untouched(Misaligned(), torch.randn(1, 4, 8, 8), "do not line up")


def test_nonlinear_branch_is_left_alone():
    class NonLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(4, 4, 3), conv_bn(4, 4, 1, padding=0)

        def forward(self, x):
            return self.a(x) + torch.relu(self.b(x))

    _assert_untouched(NonLinear(), torch.randn(1, 4, 6, 6), "not linear before the sum (relu")


def test_resnet_residual_is_not_a_reparam_candidate():
    torchvision = pytest.importorskip("torchvision")
    block = torchvision.models.resnet.BasicBlock(8, 8)
    report = _assert_untouched(block, torch.randn(1, 8, 6, 6))
    assert not report.rows  # an ordinary residual add: nothing to say about it


def test_branch_used_outside_the_sum_is_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(4, 4, 3), conv_bn(4, 4, 1, padding=0)

        def forward(self, x):
            y = self.a(x)
            return y + self.b(x), y  # y is needed anyway: merging would add a conv

    model = _prepare(Shared())
    x = torch.randn(1, 4, 6, 6)
    out_model, report = reparameterize(model, return_report=True)
    assert not report.fused and "also used outside the sum" in report.skipped[0].detail, str(report)


def test_hardswish_written_out_is_left_alone():
    class HardSwishByHand(nn.Module):
        def __init__(self):
            super().__init__()
            self.cb = conv_bn(4, 4, 3)

        def forward(self, x):
            y = self.cb(x)
            return y * F.relu6(y + 3.0) / 6.0  # `y + 3` is a one-branch sum, but y has another user

    report = _assert_untouched(HardSwishByHand(), torch.randn(1, 4, 6, 6))
    assert not report.rows


def test_bn_with_activation_in_branch_is_reported():
    from timm.layers import BatchNormAct2d

    class ActInBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = BatchNormAct2d(4, apply_act=True)  # BN followed by ReLU: not linear
            self.pw = conv_bn(4, 4, 1, padding=0)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.pw(x)

    _assert_untouched(ActInBranch(), torch.randn(1, 4, 6, 6), "applies ReLU")


def test_biased_1x1_before_zero_padded_kxk_is_reported():
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(4, 4, 1, bias=True), nn.Conv2d(4, 4, 3, padding=1))
            self.other = conv_bn(4, 4, 3)

        def forward(self, x):
            return self.seq(x) + self.other(x)

    model = Biased()
    _prepare(model)
    nn.init.normal_(model.seq[0].bias)
    _assert_untouched(model, torch.randn(1, 4, 6, 6), "border")


def test_untraceable_block_uses_its_own_switch_to_deploy():
    class Untraceable(RepVGGBlock):
        deployed = False

        def forward(self, x):
            if x.shape[-1] > 0:  # data-dependent Python control flow: torch.fx cannot trace this
                return super().forward(x)
            return x

        def switch_to_deploy(self):
            type(self).deployed = True
            self.rbr_identity = None  # a deliberately visible change, checked below

    block = _prepare(Untraceable(4, 4))
    out_model, report = reparameterize(block, return_report=True)
    assert Untraceable.deployed
    assert out_model.rbr_identity is None and block.rbr_identity is not None
    assert any("switch_to_deploy" in r.detail and r.status == "fused" for r in report.rows), str(report)


def test_training_mode_is_refused():
    with pytest.raises(RuntimeError, match="eval mode"):
        reparameterize(RepVGGBlock(4, 4))
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        reparameterize("not a model")


def test_inplace_and_example_inputs():
    model = _prepare(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 4)))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    out_model, report = fusedconv.reparameterize(model, inplace=True, example_inputs=x, return_report=True)
    assert out_model is model and type(model[0]).__name__ == "RepVGGBlock"
    assert report.max_rel_error is not None and report.max_rel_error < FP32_TOL
    with torch.no_grad():
        assert max_rel_error(model(x), ref) < FP32_TOL


# ---------------------------------------------------------------------------------------------- kernel math
def test_regroup_and_compose_match_torch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64, generator=g)
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64, generator=g)  # groups 4
    assert torch.allclose(F.conv2d(x, regroup(w, 4, 2), padding=1, groups=2), F.conv2d(x, w, padding=1, groups=4))
    a = ConvMap(torch.randn(6, 4, 1, 1, dtype=torch.float64, generator=g), torch.zeros(6, dtype=torch.float64),
                padding=(1, 1), groups=2)
    b = ConvMap(torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=g), torch.randn(8, dtype=torch.float64,
                generator=g), stride=(2, 2), groups=2)
    ab = compose(a, b)
    ref = F.conv2d(F.conv2d(x, a.weight, None, 1, 1, groups=2), b.weight, b.bias, 2, 0, groups=2)
    assert torch.allclose(F.conv2d(x, ab.weight, ab.bias, ab.stride, ab.padding, ab.dilation, ab.groups), ref)
    # The float64 self-check's conv (unfold + batched matmul) is F.conv2d.
    for groups, stride, padding, dilation, k in ((1, 1, 1, 1, 3), (4, 2, 1, 1, 3), (8, 1, 2, 2, 3), (2, 2, 0, 1, 1)):
        wg = torch.randn(8, 8 // groups, k, k, dtype=torch.float64, generator=g)
        bias = torch.randn(8, dtype=torch.float64, generator=g)
        got = grouped_conv2d(x, wg, bias, (stride, stride), (padding, padding), (dilation, dilation), groups)
        assert torch.allclose(got, F.conv2d(x, wg, bias, stride, padding, dilation, groups))
    with pytest.raises(NotMergeable, match="strides differ"):
        merge_sum([ab, ConvMap(ab.weight, ab.bias, (1, 1), ab.padding, ab.dilation, ab.groups)])


# ---------------------------------------------------------------------------------------------- timm models
def _convert_with_reparam(model):
    """convert() reparameterizes first (reparam rows in its report); should it not, do it explicitly (on the
    copy convert returned: these models have no nn.Sequential conv -> BN runs for convert to have taken)."""
    out, report = fusedconv.convert(model, return_report=True)
    if not any(r.kind == "reparam" for r in report.rows):
        out = fusedconv.convert(reparameterize(out, inplace=True), inplace=True)
    return out


@pytest.mark.parametrize("name,block_class", [("repvgg_a0", "RepVggBlock"), ("mobileone_s0", "MobileOneBlock")])
def test_timm_models_through_convert(name, block_class):
    timm = pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False), seed=1).eval()
    n_blocks = sum(type(m).__name__ == block_class for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    converted = _convert_with_reparam(model)
    with torch.no_grad():
        out = converted(x)
    assert max_rel_error(out, ref) < FP32_TOL
    counts = count_ops(converted, x)
    # every conv in these models sits in a block: one per block (on CPU the converted model runs channels_last
    # inside, where each FusedConv2d is one oneDNN `_convolution_pointwise` instead of an aten convolution)
    assert counts["convolution"] + counts["_convolution_pointwise"] == n_blocks
    assert batch_norm_count(counts) == 0
    timm_counts = count_ops(reparameterize_model(model), x)
    # detach / alias create views for autograd bookkeeping and launch no kernel (FusedConv2d's weight-cache
    # check issues some): not counted against convert, but reparameterize alone must match timm op for op.
    no_kernel = ("detach", "alias")
    assert sum(v for k, v in counts.items() if k not in no_kernel) <= sum(timm_counts.values()), \
        (counts, timm_counts)
    reparam_counts = count_ops(reparameterize(model), x)
    assert sum(reparam_counts.values()) <= sum(timm_counts.values()), (reparam_counts, timm_counts)
    assert reparam_counts["convolution"] == n_blocks and batch_norm_count(reparam_counts) == 0
