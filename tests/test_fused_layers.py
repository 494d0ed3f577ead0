"""FusedConv1d / FusedConv3d / FusedConvTranspose1d/2d/3d / FusedLinear against the PyTorch modules they replace.

Each is built with `from_modules(layer, bn, act, post_bn)` from randomised modules and compared in float64
(< 1e-12 relative) and float32 with the original Sequential; plus unbatched input, residual, padding modes,
state_dict round trips, fp32 scale/shift surviving .half(), and the errors that name their argument.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from fusedconv.fused_layers import FusedConv1d, FusedConv3d
from fusedconv.fused_transpose import FusedConvTranspose1d, FusedConvTranspose2d, FusedConvTranspose3d
from fusedconv.fused_linear import FusedLinear
from util import ACT_MODULES, max_rel_error, randomize_bn

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (13,), 2: (6, 7), 3: (4, 5, 6)}
FUSED_CONV = {1: FusedConv1d, 3: FusedConv3d}
FUSED_CONVT = {1: FusedConvTranspose1d, 2: FusedConvTranspose2d, 3: FusedConvTranspose3d}


def _seq(*mods, seed=0, dtype=torch.float64):
    seq = nn.Sequential(*[m for m in mods if m is not None])
    randomize_bn(seq, seed)
    return seq.eval().to(dtype)


def _fused_from(cls, seq, has_bn, has_act, has_post):
    mods = list(seq)
    layer = mods.pop(0)
    bn = mods.pop(0) if has_bn else None
    act = mods.pop(0) if has_act else None
    post = mods.pop(0) if has_post else None
    return cls.from_modules(layer, bn, act, post)


CONV_CASES = [  # nd, conv kwargs, act, post_bn
    (1, dict(kernel_size=3, padding=1), "relu", False),
    (1, dict(kernel_size=5, stride=2, padding=2, dilation=1, groups=3, bias=False), "gelu", True),
    (1, dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect"), "silu", False),
    (3, dict(kernel_size=3, padding=1), "relu", False),
    (3, dict(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False), "identity", True),
    (3, dict(kernel_size=(3, 1, 1), padding=(1, 0, 0), groups=3), "leaky_relu", False),
    (3, dict(kernel_size=3, padding=1, padding_mode="replicate", dilation=(1, 2, 1)), "hardswish", True),
]


@pytest.mark.parametrize("nd,kwargs,act,post", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@torch.no_grad()
def test_fused_conv_nd_matches(nd, kwargs, act, post, dtype):
    torch.manual_seed(nd)
    conv = (nn.Conv1d if nd == 1 else nn.Conv3d)(6, 9, **kwargs)
    seq = _seq(conv, BN[nd](9), ACT_MODULES[act], BN[nd](9) if post else None, seed=nd, dtype=dtype)
    fused = _fused_from(FUSED_CONV[nd], seq, True, True, post)
    assert not fused.training and fused.scale.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(2, 6, *SPATIAL[nd], dtype=dtype)
    assert max_rel_error(fused(x), seq(x)) < (1e-12 if dtype == torch.float64 else 1e-5)
    if nd == 3:  # unbatched: BatchNorm3d normalises dim 0 of a 4-d tensor like dim 1 of a 5-d one
        assert max_rel_error(fused(x[0]), seq(x)[0]) < (1e-12 if dtype == torch.float64 else 1e-5)
    else:  # BatchNorm1d would read an unbatched (C, L) output as (N, C): refused, see below
        with pytest.raises(ValueError, match=r"input: FusedConv1d folds a BatchNorm1d"):
            fused(x[0])


@torch.no_grad()
def test_unbatched_conv1d_input_is_refused_where_batchnorm1d_would_normalise_the_length():
    # Conv1d(6 -> 9) on an unbatched (6, 11) input gives (9, 9): BatchNorm1d(9) then normalises along the
    # length, not the channels, and the original runs. A fused module must not return its per-channel result.
    torch.manual_seed(5)
    seq = _seq(nn.Conv1d(6, 9, 3), BN[1](9), nn.ReLU(), None, seed=5, dtype=torch.float64)
    fused = _fused_from(FUSED_CONV[1], seq, True, True, False)
    x = torch.randn(6, 11, dtype=torch.float64)
    expected = seq(x)
    assert expected.shape == (9, 9)
    assert max_rel_error(fused(x.unsqueeze(0))[0], expected) > 1e-3  # a different function: the reason to refuse
    with pytest.raises(ValueError, match=r"expected a batched 3-d \(N, C, L\) tensor"):
        fused(x)


@torch.no_grad()
def test_fused_conv3d_residual_and_channels_last():
    torch.manual_seed(3)
    conv, bn = nn.Conv3d(4, 8, 3, padding=1).double(), _seq(nn.BatchNorm3d(8)).__getitem__(0)
    fused = FusedConv3d.from_modules(conv, bn, nn.ReLU())
    x = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    r = torch.randn(2, 8, 3, 5, 5, dtype=torch.float64)
    assert max_rel_error(fused(x, r), torch.relu(bn(conv(x)) + r)) < 1e-12


CONVT_CASES = [  # nd, kwargs
    (1, dict(kernel_size=4, stride=2, padding=1)),
    (2, dict(kernel_size=4, stride=2, padding=1, bias=False)),  # DCGAN generator block
    (2, dict(kernel_size=3, stride=2, padding=1, output_padding=1, groups=3)),
    (3, dict(kernel_size=3, stride=(1, 2, 2), padding=1, output_padding=(0, 1, 1), dilation=1)),
    (2, dict(kernel_size=3, stride=3, padding=0, output_padding=2, dilation=2, groups=3)),
]


@pytest.mark.parametrize("nd,kwargs", CONVT_CASES)
@pytest.mark.parametrize("post", [False, True])
@torch.no_grad()
def test_fused_conv_transpose_matches(nd, kwargs, post):
    torch.manual_seed(10 + nd)
    convt = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1](6, 9, **kwargs)
    seq = _seq(convt, BN[nd](9), nn.ReLU(), BN[nd](9) if post else None, seed=nd)
    fused = _fused_from(FUSED_CONVT[nd], seq, True, True, post)
    x = torch.randn(2, 6, *SPATIAL[nd], dtype=torch.float64)
    assert max_rel_error(fused(x), seq(x)) < 1e-12
    assert fused.weight.shape == convt.weight.shape


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("post", [False, True])
@torch.no_grad()
def test_fused_linear_2d_and_3d_inputs(bias, post):
    torch.manual_seed(20)
    seq2 = _seq(nn.Linear(7, 5, bias=bias), nn.BatchNorm1d(5), nn.ReLU(), nn.BatchNorm1d(5) if post else None)
    fused = _fused_from(FusedLinear, seq2, True, True, post)
    x = torch.randn(4, 7, dtype=torch.float64)
    assert max_rel_error(fused(x), seq2(x)) < 1e-12
    # (N, C, L) input: BatchNorm1d normalises dim 1 (C = 3), not the linear's out features.
    seq3 = _seq(nn.Linear(7, 5, bias=bias), nn.BatchNorm1d(3), nn.GELU(), nn.BatchNorm1d(3) if post else None)
    fused3 = _fused_from(FusedLinear, seq3, True, True, post)
    x3 = torch.randn(4, 3, 7, dtype=torch.float64)
    assert max_rel_error(fused3(x3), seq3(x3)) < 1e-12
    with pytest.raises(ValueError, match=r"input: BatchNorm1d normalises dim 1 .* 4 channels .* expected 3"):
        fused3(torch.randn(2, 4, 7, dtype=torch.float64))


@torch.no_grad()
def test_fused_linear_without_bn():
    lin = nn.Linear(4, 3).double()
    fused = FusedLinear.from_modules(lin, None, nn.SiLU())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    assert max_rel_error(fused(x), nn.functional.silu(lin(x))) < 1e-12


def _all_modules():
    torch.manual_seed(30)
    bn3, bn1 = _seq(nn.BatchNorm3d(4))[0], _seq(nn.BatchNorm1d(4))[0]
    return [
        (FusedConv3d.from_modules(nn.Conv3d(3, 4, 3).double(), bn3, "relu", bn3), (1, 3, 3, 4, 4)),
        (FusedConv1d.from_modules(nn.Conv1d(3, 4, 3).double(), bn1, "gelu"), (2, 3, 9)),
        (FusedConvTranspose2d.from_modules(nn.ConvTranspose2d(3, 4, 2, 2).double(), _seq(nn.BatchNorm2d(4))[0],
                                           nn.ReLU()), (1, 3, 3, 3)),
        (FusedLinear.from_modules(nn.Linear(3, 4).double(), bn1, nn.ReLU(), bn1), (5, 3)),
    ]


@pytest.mark.parametrize("index", range(4))
@torch.no_grad()
def test_state_dict_round_trip_and_half(index):
    fused, shape = _all_modules()[index]
    x = torch.randn(*shape, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    twin = _all_modules()[index][0]
    with torch.no_grad():
        for p in twin.buffers():
            p.mul_(0.5)
    twin.load_state_dict(torch.load(buf))
    assert torch.equal(twin(x), fused(x))
    half = _all_modules()[index][0].float().half()
    assert half.scale.dtype == torch.float32 and half.weight.dtype == torch.float16
    if half.post_scale is not None:
        assert half.post_scale.dtype == torch.float32
    # fp32 module: scale/shift stay fp32 and results match the fp64 module
    f32 = _all_modules()[index][0].float()
    assert max_rel_error(f32(x.float()), fused(x)) < 1e-5


def test_unfused_checkpoint_is_refused_by_name():
    conv, bn = nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4)
    fused = FusedConv3d.from_modules(conv, bn.eval())
    unfused = {"weight": conv.weight, "bias": conv.bias}
    with pytest.raises(RuntimeError, match=r"expected a FusedConv3d state .* unfused Conv3d/BatchNorm"):
        fused.load_state_dict(unfused)


@pytest.mark.parametrize("call,kind,message", [
    (lambda: FusedConv3d(torch.randn(4, 3, 3, 3)), ValueError, r"weight: expected a 5-d tensor"),
    (lambda: FusedConv1d(torch.randn(4, 3, 3), groups=3), ValueError, r"groups: expected a positive int dividing"),
    (lambda: FusedConv1d(torch.randn(4, 3, 3), stride=(1, 2)), TypeError, r"stride: expected an int or 1 ints"),
    (lambda: FusedConv3d(torch.randn(4, 3, 1, 1, 1), torch.ones(3)), ValueError, r"scale: expected shape \(4,\)"),
    (lambda: FusedConv3d(torch.randn(4, 3, 1, 1, 1), post_scale=torch.ones(4)), ValueError,
     r"post_scale/post_shift: expected both"),
    (lambda: FusedConv3d.from_modules(nn.Conv2d(3, 4, 1)), TypeError, r"conv: expected nn.Conv3d"),
    (lambda: FusedConvTranspose2d(torch.randn(4, 2, 3, 3), stride=2, output_padding=2), ValueError,
     r"output_padding: expected each value < max\(stride, dilation\)"),
    (lambda: FusedConvTranspose2d.from_modules(nn.Conv2d(3, 4, 1)), TypeError, r"conv: expected nn.ConvTranspose2d"),
    (lambda: FusedLinear(torch.randn(4, 3, 1)), ValueError, r"weight: expected a 2-d tensor"),
    (lambda: FusedLinear(torch.randn(4, 3), scale=torch.ones(4)), ValueError, r"scale/shift: expected both"),
    (lambda: FusedLinear.from_modules(nn.Linear(3, 4), nn.BatchNorm1d(4).train()), RuntimeError,
     r"bn: expected a BatchNorm in eval mode"),
    (lambda: FusedConv3d.from_modules(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(5).eval()), ValueError,
     r"bn: expected 4 features"),
])
def test_bad_arguments_are_named(call, kind, message):
    with pytest.raises(kind, match=message):
        call()


@pytest.mark.parametrize("shape,kind,message", [
    ((3, 4, 4), ValueError, r"input: expected a 5-d \(N, C, \.\.\.\) or unbatched 4-d tensor"),
    ((1, 2, 3, 3, 3), ValueError, r"input: expected 3 channels, got 2"),
])
def test_bad_inputs_are_named(shape, kind, message):
    fused = FusedConv3d(torch.randn(4, 3, 1, 1, 1))
    with pytest.raises(kind, match=message):
        fused(torch.randn(*shape))
    with pytest.raises(TypeError, match=r"input: expected dtype torch.float32"):
        fused(torch.randn(1, 3, 2, 2, 2, dtype=torch.float64))


@torch.no_grad()
def test_fold_cache_sees_in_place_edits():
    conv = nn.Conv1d(2, 3, 1).double()
    fused = FusedConv1d.from_modules(conv, None, None)
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    before = fused(x)
    fused.scale.mul_(2.0)
    assert max_rel_error(fused(x), 2 * (before - fused.shift.view(1, -1, 1)) + fused.shift.view(1, -1, 1)) < 1e-12


def _conv3d_post_bn(seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv3d(3, 4, 3, padding=1).double()
    bn, post = nn.BatchNorm3d(4).double().eval(), nn.BatchNorm3d(4).double().eval()
    for i, b in enumerate((bn, post)):
        randomize_bn(b, seed + i)
    return FusedConv3d.from_modules(conv, bn, "relu", post_bn=post), nn.Sequential(conv, bn, nn.ReLU(), post)


@pytest.mark.parametrize("edit", ["in_place", "data_assign", "reassign", "load_state_dict"])
@pytest.mark.parametrize("tensor", ["weight", "scale", "shift"])
@torch.no_grad()
def test_fold_cache_sees_every_edit(edit, tensor):
    # The cached fold is keyed by the tensors themselves, their version counters and data pointers: each kind of
    # edit to each tensor the fold reads must be seen on the next call.
    fused, _ = _conv3d_post_bn()
    x = torch.randn(1, 3, 2, 3, 3, dtype=torch.float64)
    before = fused(x)
    t = getattr(fused, tensor)
    new = t * 1.5 + 0.25
    if edit == "in_place":
        t.copy_(new)
    elif edit == "data_assign":
        t.data = new.clone()
    elif edit == "reassign":
        setattr(fused, tensor, nn.Parameter(new, requires_grad=False) if tensor == "weight" else new)
    else:
        fused.load_state_dict({**fused.state_dict(), tensor: new})
    rebuilt = FusedConv3d(fused.weight, fused.scale, fused.shift, padding=1, activation="relu",
                          post_scale=fused.post_scale, post_shift=fused.post_shift)
    after = fused(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, rebuilt(x))


@pytest.mark.parametrize("with_residual", [False, True])
@torch.no_grad()
def test_epilogue_in_place_leaves_inputs_alone(with_residual):
    # The epilogue runs in place on the layer's fresh output: the input and the residual are never written, and
    # the result is the original chain's (conv -> BN -> ReLU [+ residual before the ReLU] -> post BN).
    fused, seq = _conv3d_post_bn()
    x = torch.randn(2, 3, 2, 3, 3, dtype=torch.float64)
    r = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64) if with_residual else None
    x0, r0 = x.clone(), None if r is None else r.clone()
    y = fused(x, r)
    conv, bn, act, post = seq
    ref = post(act(bn(conv(x)) + (0 if r is None else r)))
    assert max_rel_error(y, ref) < 1e-12
    assert torch.equal(x, x0) and (r is None or torch.equal(r, r0))
    assert y.data_ptr() not in (x.data_ptr(), None if r is None else r.data_ptr())


def test_epilogue_out_of_place_under_autograd():
    # With autograd recording, the epilogue stays out of place and every gradient is the original chain's.
    fused, seq = _conv3d_post_bn()
    x = torch.randn(1, 3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    fused(x, r).sum().backward()
    gx, gr = x.grad.clone(), r.grad.clone()
    x.grad = r.grad = None
    conv, bn, act, post = seq
    post(act(bn(conv(x)) + r)).sum().backward()
    assert max_rel_error(gx, x.grad) < 1e-10 and max_rel_error(gr, r.grad) < 1e-10
