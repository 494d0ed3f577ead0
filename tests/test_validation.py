"""Input validation of FusedConv2d (constructor, from_modules, forward) and `validation.check_inputs`.

Every error must use the exception type PyTorch would use and a message naming the offending argument, what
was expected and what was given; each test asserts on that text.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fusedconv.modules import FusedConv2d
from fusedconv.validation import check_inputs, conv_output_hw


def module(**kw) -> FusedConv2d:
    torch.manual_seed(0)
    args = dict(stride=1, padding=1, activation="relu")
    args.update(kw)
    return FusedConv2d(torch.randn(6, 4, 3, 3), torch.rand(6) + 0.5, torch.randn(6), **args)


# --------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("bad,exc,pattern", [
    ("not a tensor", TypeError, r"input: expected a torch.Tensor, got str"),
    (torch.randn(4, 8), ValueError, r"input: expected a 4-d \(N, C, H, W\) or unbatched 3-d \(C, H, W\) tensor, got 2-d "
                                    r"with shape \(4, 8\)"),
    (torch.randn(1, 1, 4, 8, 8), ValueError, r"input: expected a 4-d .* got 5-d"),
    (torch.randn(2, 3, 8, 8), ValueError, r"input: expected 4 channels \(dim 1\), got 3 \(shape \(2, 3, 8, 8\)\)"),
    (torch.randn(5, 8, 8), ValueError, r"input: expected 4 channels \(dim 0\), got 5"),
    (torch.ones(2, 4, 8, 8, dtype=torch.int64), TypeError, r"input: expected a floating-point tensor, got dtype torch.int64"),
    (torch.ones(2, 4, 8, 8, dtype=torch.uint8), TypeError, r"input: expected a floating-point tensor, got dtype torch.uint8"),
    (torch.randn(2, 4, 8, 8, dtype=torch.float64), TypeError, r"input: expected dtype torch.float32 to match the "
                                                              r"module's weight, got torch.float64"),
    (torch.randn(2, 4, 8, 8, device="meta"), RuntimeError, r"input: expected device cpu to match the module's weight, "
                                                           r"got meta"),
    (torch.randn(2, 4, 1, 1), None, None),  # fits with padding 1: not an error
])
def test_forward_rejects_bad_input(bad, exc, pattern):
    m = module()
    if exc is None:
        assert m(bad).shape == (2, 6, 1, 1)
        return
    with pytest.raises(exc, match=pattern):
        m(bad)


def test_forward_rejects_input_smaller_than_the_kernel():
    m = module(padding=0, dilation=2)
    with pytest.raises(ValueError, match=r"input: spatial size \(4, 9\) with padding \(0, 0\) is smaller than the "
                                         r"dilated kernel \(3, 3\) \(dilation \(2, 2\)\)"):
        m(torch.randn(1, 4, 4, 9))


@pytest.mark.parametrize("bad,exc,pattern", [
    ([1.0], TypeError, r"residual: expected a torch.Tensor or None, got list"),
    (torch.randn(6, 8, 8), ValueError, r"residual: expected a 4-d tensor like the input, got 3-d with shape \(6, 8, 8\)"),
    (torch.randn(2, 6, 8, 7), ValueError, r"residual: expected the output's shape \(2, 6, 8, 8\), got \(2, 6, 8, 7\)"),
    (torch.randn(2, 6, 8, 8, dtype=torch.float64), TypeError, r"residual: expected dtype torch.float32 to match the "
                                                              r"input, got torch.float64"),
    (torch.ones(2, 6, 8, 8, dtype=torch.int32), TypeError, r"residual: expected dtype torch.float32 .* got torch.int32"),
    (torch.randn(2, 6, 8, 8, device="meta"), RuntimeError, r"residual: expected device cpu to match the input, got meta"),
])
def test_forward_rejects_bad_residual(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        module()(torch.randn(2, 4, 8, 8), bad)


@pytest.mark.parametrize("shape", [(2, 6, 1, 1), (1, 6, 8, 8), (1, 1, 1, 8)])
def test_a_residual_that_broadcasts_is_added_as_the_original_modules_add_it(shape):
    """convert fuses `bn(conv(x)) + other` without knowing other's shape (noise, a per-channel bias; found by
    bench/random_sweep.py, where the converted model raised): the module computes the broadcast sum; the
    validation of the fused op, which runs the kernels, still refuses it."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1).double(), nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    fused = FusedConv2d.from_modules(conv, bn, nn.ReLU())
    x, r = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fused(x, r), torch.relu(bn(conv(x)) + r), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no broadcasting"):  # (what the op and its kernels are given)
        check_inputs(x, fused.weight, 1, r, stride=(1, 1), padding=(1, 1), dilation=(1, 1))


def test_unbatched_residual_must_be_unbatched():
    with pytest.raises(ValueError, match=r"residual: expected a 3-d tensor like the input, got 4-d"):
        module()(torch.randn(4, 8, 8), torch.randn(1, 6, 8, 8))
    with pytest.raises(ValueError, match=r"residual: expected the output's shape \(6, 8, 8\), got \(6, 4, 4\)"):
        module()(torch.randn(4, 8, 8), torch.randn(6, 4, 4))


# ------------------------------------------------------------------------------------------------ constructor
@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(weight=torch.randn(6, 4, 3)), ValueError, r"weight: expected a 4-d tensor \(Cout, Cin/groups, KH, KW\), "
                                                    r"got \(6, 4, 3\)"),
    (dict(weight=[1, 2]), TypeError, r"weight: expected a 4-d tensor .* got list"),
    (dict(weight=torch.ones(6, 4, 3, 3, dtype=torch.int64)), TypeError, r"weight: expected a floating-point tensor, "
                                                                        r"got dtype torch.int64"),
    (dict(groups=0), ValueError, r"groups: expected a positive int, got 0"),
    (dict(groups=True), ValueError, r"groups: expected a positive int, got True"),
    (dict(groups=4), ValueError, r"groups: expected to divide out_channels=6, got groups=4"),
    (dict(padding_mode="mirror"), ValueError, r"padding_mode: expected one of .*'zeros'.*got 'mirror'"),
    (dict(padding="same"), ValueError, r"padding: expected an int or a pair of ints \(resolve 'same'/'valid' first\), "
                                       r"got 'same'"),
    (dict(padding=-1), ValueError, r"padding: expected values >= 0, got -1"),
    (dict(stride=0), ValueError, r"stride: expected values >= 1, got 0"),
    (dict(stride=(1, 2, 3)), TypeError, r"stride: expected an int or a pair of ints, got \(1, 2, 3\)"),
    (dict(stride=1.5), TypeError, r"stride: expected an int or a pair of ints, got 1.5"),
    (dict(dilation=(1, 0)), ValueError, r"dilation: expected values >= 1, got \(1, 0\)"),
    (dict(scale=torch.ones(5)), ValueError, r"scale: expected shape \(6,\) \(one value per output channel\), got \(5,\)"),
    (dict(shift=torch.ones(6, 1)), ValueError, r"shift: expected shape \(6,\) .* got \(6, 1\)"),
    (dict(scale=torch.full((6,), float("inf"))), ValueError, r"scale: expected finite values"),
    (dict(shift=torch.full((6,), float("nan"))), ValueError, r"shift: expected finite values"),
    (dict(activation="swish"), ValueError, r"activation: expected one of .*got 'swish'"),
    (dict(activation=nn.Sigmoid()), TypeError, r"act: expected one of nn.ReLU.*got Sigmoid"),
])
def test_constructor_rejects_bad_arguments(kwargs, exc, pattern):
    args = dict(weight=torch.randn(6, 4, 3, 3), scale=torch.ones(6), shift=torch.zeros(6))
    args.update(kwargs)
    weight, scale, shift = args.pop("weight"), args.pop("scale"), args.pop("shift")
    with pytest.raises(exc, match=pattern):
        FusedConv2d(weight, scale, shift, **args)


def test_from_modules_rejects_bad_modules():
    bn = nn.BatchNorm2d(4).eval()
    with pytest.raises(TypeError, match=r"conv: expected nn.Conv2d, got Conv1d"):
        FusedConv2d.from_modules(nn.Conv1d(3, 4, 1), bn)
    with pytest.raises(TypeError, match=r"conv: expected nn.Conv2d, got ConvTranspose2d"):
        FusedConv2d.from_modules(nn.ConvTranspose2d(3, 4, 1), bn)
    with pytest.raises(RuntimeError, match=r"bn: expected a BatchNorm in eval mode .*training mode"):
        FusedConv2d.from_modules(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match=r"bn: expected a BatchNorm module.*got InstanceNorm2d"):
        FusedConv2d.from_modules(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4))
    with pytest.raises(ValueError, match=r"bn: expected 4 features to match conv out_channels, got 5"):
        FusedConv2d.from_modules(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5).eval())
    bad_stats = nn.BatchNorm2d(4).eval()
    bad_stats.running_var[0] = float("inf")
    with pytest.raises(ValueError, match=r"bn running_var: expected finite values, got 1 non-finite"):
        FusedConv2d.from_modules(nn.Conv2d(3, 4, 1), bad_stats)
    with pytest.raises(TypeError, match=r"act: expected one of nn.ReLU.*got Tanh"):
        FusedConv2d.from_modules(nn.Conv2d(3, 4, 1), bn, nn.Tanh())


# ------------------------------------------------------------------------------------------------ helpers
def test_check_inputs_returns_the_output_shape():
    w = torch.randn(6, 2, 3, 3)
    assert check_inputs(torch.randn(2, 4, 9, 8), w, 2, None) is None
    assert check_inputs(torch.randn(2, 4, 9, 8), w, 2, None, stride=(2, 1), padding=(1, 0),
                        dilation=(1, 1)) == (2, 6, 5, 6)
    assert check_inputs(torch.randn(4, 9, 8), w, 2, None, stride=(1, 1), padding=(0, 0),
                        dilation=(2, 2)) == (6, 5, 4)


def test_conv_output_hw_matches_pytorch():
    for hw, k, s, p, d in [((9, 8), (3, 3), (2, 1), (1, 0), (1, 2)), ((7, 7), (1, 5), (3, 2), (0, 2), (1, 1))]:
        conv = nn.Conv2d(1, 1, k, s, p, d)
        assert conv_output_hw(hw, k, s, p, d) == tuple(conv(torch.randn(1, 1, *hw)).shape[2:])


# ------------------------------------------------------------------------------------- public model entry points
def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


@pytest.mark.parametrize("entry", ["convert", "reparameterize"])
def test_model_entry_points_name_the_argument(entry):
    import fusedconv

    fn = getattr(fusedconv, entry)
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module, got str"):
        fn("resnet18")
    with pytest.raises(RuntimeError, match=r"model: expected a model in eval mode \(call model.eval\(\) first\), "
                                           r"got \d+ module\(s\) in training mode"):
        fn(_tiny_model().train())
    with pytest.raises(TypeError, match=r"example_inputs: expected a tensor or a tuple"):
        fn(_tiny_model().eval(), example_inputs=3)


def test_convert_rejects_bad_tolerance():
    import fusedconv

    with pytest.raises(ValueError, match=r"tolerance: expected a non-negative number or None, got -1"):
        fusedconv.convert(_tiny_model().eval(), tolerance=-1)


def test_convert_leaves_a_training_mode_model_untouched():
    import fusedconv

    model = _tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        fusedconv.convert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training
