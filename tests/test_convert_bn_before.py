"""convert() folds a BatchNorm directly before a Conv1d/2d/3d or Linear into that layer where it is exact, in
float64 against the original; leaves it (with the reason in the report) before a zero-padded conv; refuses the
input ranks on which BatchNorm1d's channel axis is not the layer's input channel; and leaves a BN that the layer
before it takes (the BN-after-layer chain) alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusedconv
from fusedconv.bn_folded_layers import BNFoldedConv1d, BNFoldedLinear
from fusedconv.fused_layers import FusedConv1d, FusedConv3d
from fusedconv.modules import FusedConv2d
from util import batch_norm_count, count_ops, max_rel_error, randomize_bn

TOL64 = 1e-9


def _convert(model, x):
    model = randomize_bn(model).eval().double()
    x = x.double()
    converted, report = fusedconv.convert(model, example_inputs=(x,), return_report=True)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < TOL64
    return model, converted, report


def _rows(report, kind):
    return [r for r in report.rows if r.kind == kind]


@pytest.mark.parametrize("nd,kernel,padding,padding_mode", [
    (2, 1, 0, "zeros"), (2, 3, 0, "zeros"), (2, 3, 1, "reflect"), (3, 1, 0, "zeros"), (1, 3, 0, "zeros"),
])
def test_bn_before_a_conv_folds_and_the_chain_after_it_still_fuses(nd, kernel, padding, padding_mode):
    torch.manual_seed(nd)
    conv = getattr(nn, f"Conv{nd}d")(4, 6, kernel, padding=padding, padding_mode=padding_mode, bias=False)
    bn = getattr(nn, f"BatchNorm{nd}d")
    net = nn.Sequential(bn(4), conv, bn(6), nn.ReLU())
    x = torch.randn(2, 4, *([7] * nd))
    model, converted, report = _convert(net, x)
    assert batch_norm_count(count_ops(converted, x.double())) == 0, str(report)
    assert [r.status for r in _rows(report, "bn_before_layer")] == ["fused"]
    assert isinstance(converted[0], nn.Identity)
    # the folded conv then fused with the BN + ReLU after it
    assert isinstance(converted[1], {1: FusedConv1d, 2: FusedConv2d, 3: FusedConv3d}[nd])
    assert isinstance(model[0], nn.BatchNorm1d if nd == 1 else getattr(nn, f"BatchNorm{nd}d"))  # original intact


def test_bn_before_a_linear_folds_for_2d_input_and_refuses_3d():
    torch.manual_seed(2)
    head = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    model, converted, report = _convert(head, torch.randn(4, 3, 2, 2))
    assert isinstance(converted[2], BNFoldedLinear) and isinstance(converted[1], nn.Identity)
    assert batch_norm_count(count_ops(converted, torch.randn(4, 3, 2, 2).double())) == 0
    # On (N, C, L) the original BN scales C while the Linear contracts L (here L == C, so the original runs):
    # a different function, refused by name rather than computed.
    seq = randomize_bn(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2))).eval().double()
    folded = fusedconv.convert(seq)
    x3 = torch.randn(3, 5, 5, dtype=torch.float64)
    seq(x3)  # the original accepts it
    with pytest.raises(ValueError, match=r"input: this Linear absorbed the BatchNorm1d"):
        folded(x3)


def test_bn_before_conv1d_refuses_an_unbatched_input():
    seq = randomize_bn(nn.Sequential(nn.BatchNorm1d(6), nn.Conv1d(6, 3, 1))).eval().double()
    folded = fusedconv.convert(seq)
    assert isinstance(folded[1], BNFoldedConv1d)
    x = torch.randn(6, 6, dtype=torch.float64)  # unbatched (C, L) with L == C: BN1d normalises L
    seq(x)
    with pytest.raises(ValueError, match=r"expected a 3-d tensor"):
        folded(x)
    xb = torch.randn(2, 6, 9, dtype=torch.float64)
    assert max_rel_error(folded(xb), seq(xb)) < TOL64


def test_bn_before_a_zero_padded_conv_is_left_with_the_reason():
    net = nn.Sequential(nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    _, converted, report = _convert(net, torch.randn(1, 4, 8, 8))
    rows = _rows(report, "bn_before_layer")
    assert [r.status for r in rows] == ["skipped"] and "zero-padded" in rows[0].detail
    assert isinstance(converted[1], nn.BatchNorm2d)


def test_a_bn_the_previous_layer_takes_is_not_folded_forward():
    # conv1 -> bn -> conv2: the BN folds into conv1 (the conv -> BN chain), not into conv2.
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    _, converted, report = _convert(net, torch.randn(1, 3, 6, 6))
    assert not _rows(report, "bn_before_layer")
    assert isinstance(converted[0], FusedConv2d) and type(converted[2]) is nn.Conv2d


def test_a_hooked_bn_is_not_folded():
    net = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _, converted, report = _convert(net, torch.randn(1, 4, 5, 5))
    assert [r.status for r in _rows(report, "bn_before_layer")] == ["skipped"]
    before = len(seen)
    converted(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert len(seen) == before + 1  # the hook still fires on the converted model
