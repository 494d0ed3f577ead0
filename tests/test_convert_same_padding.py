"""Convs that pad in forward (TF "SAME"): timm's Conv2dSame, efficientnet's Conv2dStatic/DynamicSamePadding.

Every positive check converts a float64 copy and compares it with the original (max|diff| / max|ref| <= 1e-10,
random weights and BN statistics); the float32 default CPU path is checked at 1e-4. The negative checks show what
must not fuse: other subclasses, patched forwards, another pad child, another padding mode, and a class whose
forward computes something else than the pad fusedconv would apply (the float64 probe refuses it).
"""

from __future__ import annotations

import copy
import types
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from util import max_rel_error, randomize_bn

import fusedconv
from fusedconv import FusedConv2d, cpu, same_padding
from fusedconv.graph.roles import ConvRole

timm_same = pytest.importorskip("timm.layers.conv2d_same")
smp_eff = pytest.importorskip("segmentation_models_pytorch.encoders._efficientnet")
Conv2dSame = timm_same.Conv2dSame
StaticSame, DynamicSame = smp_eff.Conv2dStaticSamePadding, smp_eff.Conv2dDynamicSamePadding

EXACT = 1e-10  # float64: a wrong pad shows as O(1)


def _t(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _make_conv(cls, cin, cout, k, stride=1, dilation=1, groups=1, image_size=9):
    if cls is StaticSame:
        return StaticSame(cin, cout, k, stride=stride, image_size=image_size, dilation=dilation, groups=groups,
                          bias=False)
    if cls is DynamicSame:
        return DynamicSame(cin, cout, k, stride=stride, dilation=dilation, groups=groups, bias=False)
    return Conv2dSame(cin, cout, k, stride=stride, dilation=dilation, groups=groups, bias=False)


def _chain(conv, act=None, seed=0):
    """conv -> BatchNorm2d (random statistics) -> act, eval mode."""
    torch.manual_seed(seed)
    nn.init.normal_(conv.weight, std=0.3)
    model = nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), act if act is not None else nn.SiLU())
    return randomize_bn(model, seed).eval()


def _convert64(model):
    model = copy.deepcopy(model).double().eval()
    converted, report = fusedconv.convert(model, return_report=True)
    return model, converted, report


def _bn_left(model) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _skipped(report) -> list[str]:
    return [r.detail for r in report.rows if r.status == "skipped"]


@torch.no_grad()
def _assert_same(original, converted, *shapes, tol=EXACT, channels_last=False, dtype=torch.float64):
    for i, shape in enumerate(shapes):
        x = _t(*shape, seed=i + 1, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ref = original(x)
        out = converted(x)
        assert out.shape == ref.shape
        assert max_rel_error(out, ref) <= tol, (shape, max_rel_error(out, ref))


# ------------------------------------------------------------------------------------------------ the pad itself
@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (3, 2, 1), (5, 2, 1), (4, 2, 1), (3, 2, 2), (1, 2, 1), (3, 3, 1)])
def test_same_pad_matches_timm_and_gives_ceil_output(k, s, d):
    from timm.layers.padding import get_same_padding

    for size in range(max((k - 1) * d + 1, 1), 20):
        left, right, top, bottom = same_padding.same_pad(size, size + 1, (k, k), (s, s), (d, d))
        assert (top + bottom, left + right) == (get_same_padding(size, k, s, d), get_same_padding(size + 1, k, s, d))
        assert top == (top + bottom) // 2 and left == (left + right) // 2  # the smaller half first
        out = F.conv2d(torch.zeros(1, 1, size + top + bottom, size + 1 + left + right), torch.zeros(1, 1, k, k),
                       stride=s, dilation=d)
        assert out.shape[-2:] == (-(-size // s), -(-(size + 1) // s))  # TF SAME: ceil(in / stride)


# ------------------------------------------------------------------------------------------------ single chains
GEOMETRIES = [  # (kernel, stride, dilation, groups): stride 1 and 2, an even kernel, dilation 2, grouped, depthwise
    (3, 1, 1, 1), (3, 2, 1, 1), (4, 1, 1, 1), (3, 2, 2, 4), (5, 2, 1, 8),
]


@pytest.mark.parametrize("cls", [Conv2dSame, StaticSame, DynamicSame], ids=lambda c: c.__name__)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_single_chain_fuses_and_is_exact_float64(cls, geometry):
    k, s, d, g = geometry
    model = _chain(_make_conv(cls, 8, 8, k, s, d, g))
    original, converted, report = _convert64(model)
    assert [r.status for r in report.rows] == ["fused"], report.rows
    assert _bn_left(converted) == 0 and isinstance(converted[0], FusedConv2d)
    shapes = [(2, 8, 10, 9), (2, 8, 9, 12), (1, 8, 13, 13)]
    _assert_same(original, converted, *shapes)
    _assert_same(original, converted, *shapes, channels_last=True)
    # Unbatched input, as nn.Conv2d takes it (BatchNorm2d does not: the reference runs it as a batch of one).
    x = _t(8, 11, 10, seed=7)
    with torch.no_grad():
        assert max_rel_error(converted[0](x), original(x.unsqueeze(0)).squeeze(0)) <= EXACT


@pytest.mark.parametrize("cls", [Conv2dSame, StaticSame, DynamicSame], ids=lambda c: c.__name__)
@pytest.mark.parametrize("geometry", [(3, 2, 1, 1), (4, 1, 1, 1), (5, 2, 1, 8)], ids=str)
def test_single_chain_float32_default_cpu_path(cls, geometry):
    k, s, d, g = geometry
    model = _chain(_make_conv(cls, 8, 16, k, s, d, g))
    converted = fusedconv.convert(model)
    shapes = [(2, 8, 10, 9), (2, 8, 9, 12)]
    _assert_same(model, converted, *shapes, tol=1e-4, dtype=torch.float32)
    _assert_same(model, converted, *shapes, tol=1e-4, dtype=torch.float32, channels_last=True)
    fused = converted[0]
    if cpu.available() and fused.pre_pad is not None:
        # The padded input kept channels_last, so the layer took the oneDNN route (not a layout round trip).
        assert fused._cpu_state.last_route == cpu.ONEDNN


def test_stride1_same_becomes_plain_padding_and_asymmetric_stays_a_pre_pad():
    odd = FusedConv2d.from_modules(_chain(_make_conv(Conv2dSame, 4, 4, 3))[0])
    assert odd.pre_pad is None and odd.padding == (1, 1)  # no extra op: the fast paths stay as they are
    even = FusedConv2d.from_modules(_chain(_make_conv(Conv2dSame, 4, 4, 4))[0])
    assert even.pre_pad == (1, 2, 1, 2) and even.padding == (0, 0)
    strided = FusedConv2d.from_modules(_chain(_make_conv(DynamicSame, 4, 4, 3, stride=2))[0])
    assert strided.pre_pad == same_padding.SAME
    assert "pre_pad='same'" in repr(strided) and "pre_pad=(1, 2, 1, 2)" in repr(even)


def test_state_dict_keeps_the_convs_path_and_no_pad_state():
    model = _chain(_make_conv(StaticSame, 4, 6, 4, stride=2, image_size=8))
    assert type(model[0].static_padding) is nn.ZeroPad2d
    converted = fusedconv.convert(model)
    assert sorted(converted.state_dict()) == ["0.scale", "0.shift", "0.weight"]
    assert torch.equal(converted.state_dict()["0.weight"], model[0].weight)


def test_from_modules_on_a_recognised_conv_is_exact():
    for cls in (Conv2dSame, StaticSame, DynamicSame):
        conv, bn, act = _chain(_make_conv(cls, 6, 6, 3, stride=2)).double()
        fused = FusedConv2d.from_modules(conv, bn, act)
        x = _t(2, 6, 11, 8)
        with torch.no_grad():
            assert max_rel_error(fused(x), act(bn(conv(x)))) <= EXACT


class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(F.pad(x, (1, 0, 1, 0)))


class GeometryOnly(nn.Conv2d):
    """Sets nothing but the geometry: computes exactly as nn.Conv2d."""


def test_from_modules_refuses_an_unrecognised_subclass_with_its_own_forward():
    with pytest.raises(TypeError, match=r"^conv: expected nn.Conv2d.*got OwnForward"):
        FusedConv2d.from_modules(OwnForward(4, 4, 2))
    conv = GeometryOnly(4, 4, 3, padding=1).double()
    x = _t(1, 4, 7, 7)
    with torch.no_grad():
        assert max_rel_error(FusedConv2d.from_modules(conv)(x), conv(x)) <= EXACT


@pytest.mark.parametrize("pre_pad,kwargs,match", [
    ("valid", {}, r"^pre_pad: expected None, 'same'"),
    ((1, 2, 3), {}, r"^pre_pad: expected None, 'same' or 4 ints"),
    ((1, -1, 0, 0), {}, r"^pre_pad: expected None, 'same' or 4 ints"),
    ((0, 1, 0, 1), {"padding_mode": "reflect"}, r"^pre_pad: expected padding_mode='zeros'"),
])
def test_constructor_refuses_a_bad_pre_pad(pre_pad, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedConv2d(torch.randn(4, 4, 3, 3), pre_pad=pre_pad, **kwargs)


def test_conv_role_computes_the_original_padding_conv():
    for cls in (Conv2dSame, StaticSame, DynamicSame):
        conv = _make_conv(cls, 4, 6, 4, stride=2).double()
        nn.init.normal_(conv.weight)
        role = ConvRole(FusedConv2d.from_modules(conv, None, None))
        for shape in ((2, 4, 9, 10), (2, 4, 10, 9)):
            x = _t(*shape)
            with torch.no_grad():
                assert max_rel_error(role(x), conv(x)) <= EXACT


class FlaggedSame(nn.Module):
    """A residual block whose flag, flipped after convert, sends calls to the exact fallback over role children."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2dSame(6, 6, 4, bias=False)  # stride 1, even kernel: an asymmetric pre-pad
        self.bn = nn.BatchNorm2d(6)
        self.use_residual = True

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.use_residual:
            y = y + x
        return torch.relu(y)


def test_guarded_block_fallback_uses_the_pre_pad():
    original, converted, report = _convert64(randomize_bn(FlaggedSame()))
    assert _bn_left(converted) == 0 and "bn+add+relu" in [r.detail for r in report.fused]
    _assert_same(original, converted, (2, 6, 9, 8))
    original.use_residual = converted.use_residual = False
    _assert_same(original, converted, (2, 6, 9, 8), (1, 6, 8, 11))


# ------------------------------------------------------------------------------------------------ models
def _count(model, cls_name) -> int:
    return sum(type(m).__name__ == cls_name for m in model.modules())


# BN statistics measured on an example: with blind ones an efficientnet's output hardly depends on its early
# layers, where most of the padding convs are (model_specs.randomize_batchnorm).
_EXAMPLE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def test_timm_tf_efficientnet_b0_float64():
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("tf_efficientnet_b0", pretrained=False), example=_EXAMPLE).eval()
    assert _count(model, "Conv2dSame") == 5
    original, converted, report = _convert64(model)
    assert _count(converted, "Conv2dSame") == 0 and _bn_left(converted) == 0, _skipped(report)
    _assert_same(original, converted, (2, 3, 64, 64), (2, 3, 65, 63))


def test_smp_unet_efficientnet_b0_float64_fuses_the_encoder_convs(monkeypatch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = randomize_bn(smp.Unet("efficientnet-b0", encoder_weights=None), example=_EXAMPLE).eval()
    classes = Counter(type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv2d))
    assert classes["Conv2dStaticSamePadding"] > 0 and "Conv2dDynamicSamePadding" not in classes, classes
    original, converted, report = _convert64(model)
    # Every chain fused. Left: the encoder's classifier head (_conv_head -> _bn1), which its forward never calls,
    # and the squeeze-excitation convs, which no BatchNorm follows.
    assert not _skipped(report), _skipped(report)
    assert [n for n, m in converted.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["encoder._bn1"]
    left = [n for n, m in converted.named_modules() if type(m).__name__ == "Conv2dStaticSamePadding"]
    assert left and all(n.split(".")[-1] in ("_se_reduce", "_se_expand", "_conv_head") for n in left), left
    # smp's Unet takes sizes divisible by 32; its encoder alone takes any size.
    _assert_same(original, converted, (2, 3, 64, 64), (2, 3, 64, 96))
    with torch.no_grad():
        x = _t(2, 3, 65, 63)
        for got, want in zip(converted.encoder(x), original.encoder(x)):
            assert max_rel_error(got, want) <= EXACT
    # Without recognising the class (an empty allow-list), its chains stay unfused: the count went up.
    monkeypatch.setattr(same_padding, "PADDING_CONVS", {})
    monkeypatch.setattr(same_padding, "_resolved", {})
    _, unconverted_part, before = _convert64(model)
    missed = [d for d in _skipped(before) if "Conv2dStaticSamePadding subclasses Conv2d" in d]
    with_bn = [len([r for r in rep.fused if r.detail.startswith("bn")]) for rep in (report, before)]
    assert len(missed) > 40 and with_bn[0] - with_bn[1] == len(missed)
    # Also fused now: the squeeze-excitation conv -> activation pairs (no BatchNorm, so never reported before).
    assert len(report.fused) - len(before.fused) > len(missed)
    assert _bn_left(unconverted_part) == len(missed) + 1  # + the unused head's


# ------------------------------------------------------------------------------------------------ must not fuse
def _assert_not_fused(conv, reason: str):
    """conv -> BN -> act stays as it was (reported with `reason`) and the model still computes the original."""
    original, converted, report = _convert64(_chain(conv))
    assert not report.fused and _bn_left(converted) == 1, report.rows
    assert any(reason in d for d in _skipped(report)), _skipped(report)
    _assert_same(original, converted, (2, 8, 10, 9), (1, 8, 9, 12))
    return report


class OtherForward(Conv2dSame):
    def forward(self, x):
        return super().forward(x[..., 1:, :])


class SameForward(Conv2dSame):
    """No forward of its own, yet not one of the allow-listed classes: recognition is by exact class."""


@pytest.mark.parametrize("cls", [OtherForward, SameForward], ids=lambda c: c.__name__)
def test_subclass_of_conv2dsame_is_not_fused(cls):
    _assert_not_fused(cls(8, 8, 3, stride=2, bias=False), f"{cls.__name__} subclasses Conv2d")


def test_instance_with_a_patched_forward_is_not_fused():
    conv = _make_conv(Conv2dSame, 8, 8, 3, stride=2)
    conv.forward = types.MethodType(lambda self, x: F.conv2d(x, self.weight, None, self.stride), conv)
    _assert_not_fused(conv, "Conv2dSame's forward was replaced")


def test_class_with_a_patched_forward_is_not_fused(monkeypatch):
    assert same_padding.conv_pre_pad(_make_conv(Conv2dSame, 4, 4, 3, stride=2)).ok  # the class is resolved
    original_forward = Conv2dSame.forward
    monkeypatch.setattr(Conv2dSame, "forward", lambda self, x: original_forward(self, x))
    _assert_not_fused(_make_conv(Conv2dSame, 8, 8, 3, stride=2), "Conv2dSame's forward was replaced")
    monkeypatch.undo()
    assert same_padding.conv_pre_pad(_make_conv(Conv2dSame, 4, 4, 3, stride=2)).ok


def test_static_padding_replaced_by_a_reflection_pad_is_not_fused():
    conv = _make_conv(StaticSame, 8, 8, 3, stride=2, image_size=10)
    conv.static_padding = nn.ReflectionPad2d((0, 1, 0, 1))
    _assert_not_fused(conv, "static_padding is ReflectionPad2d")


def test_static_padding_with_a_hook_is_not_fused():
    conv = _make_conv(StaticSame, 8, 8, 3, stride=2, image_size=10)
    assert type(conv.static_padding) is nn.ZeroPad2d
    conv.static_padding.register_forward_hook(lambda module, args, out: None)
    _assert_not_fused(conv, "static_padding has hooks")


def test_static_padding_with_other_numbers_is_read_at_convert_time():
    conv = _make_conv(StaticSame, 8, 8, 3, stride=2, image_size=10)
    conv.static_padding = nn.ZeroPad2d((2, 0, 1, 3))
    original, converted, report = _convert64(_chain(conv))
    assert [r.status for r in report.rows] == ["fused"] and converted[0].pre_pad == (2, 0, 1, 3)
    _assert_same(original, converted, (2, 8, 10, 9), (1, 8, 9, 12))


@pytest.mark.parametrize("cls", [Conv2dSame, DynamicSame], ids=lambda c: c.__name__)
def test_padding_mode_other_than_zeros_is_not_fused(cls):
    conv = _make_conv(cls, 8, 8, 3, stride=2)
    conv.padding_mode = "reflect"
    _assert_not_fused(conv, "padding_mode='reflect'")


def test_probe_is_load_bearing_forward_ignores_padding(monkeypatch):
    # timm's Conv2dSame passes padding (0, 0) to F.conv2d whatever its `padding` attribute says: the class and
    # every attribute check pass, but pad + conv with padding=(1, 1) is not what it computes.
    conv = _make_conv(Conv2dSame, 8, 8, 3, stride=2)
    conv.padding = (1, 1)
    _assert_not_fused(conv, "a float64 probe of its forward disagreed")
    # Without the probe the same conversion would be silently wrong.
    monkeypatch.setattr(same_padding, "_probe", lambda conv, pre_pad: None)
    monkeypatch.setattr(same_padding, "_probed", same_padding.weakref.WeakKeyDictionary())
    original, converted, report = _convert64(_chain(conv))
    assert report.fused
    with torch.no_grad():
        x = _t(2, 8, 10, 9)
        out, ref = converted(x), original(x)
        assert out.shape != ref.shape or max_rel_error(out, ref) > 1e-3


def test_probe_is_load_bearing_library_pads_the_other_way(monkeypatch):
    # A library version whose (unchanged) class forward pads the larger half first: not recognised.
    def pad_larger_half_first(x, kernel_size, stride, dilation=(1, 1), value=0):
        left, right, top, bottom = same_padding.same_pad(x.shape[-2], x.shape[-1], kernel_size, stride, dilation)
        return F.pad(x, (right, left, bottom, top), value=value)

    monkeypatch.setattr(timm_same, "pad_same", pad_larger_half_first)
    _assert_not_fused(_make_conv(Conv2dSame, 8, 8, 3, stride=2), "a float64 probe of its forward disagreed")


def test_pre_pad_survives_deepcopy_and_pickle():
    import io

    converted = fusedconv.convert(_chain(_make_conv(DynamicSame, 4, 6, 3, stride=2)).double())
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    for copied in (copy.deepcopy(converted), torch.load(buf, weights_only=False)):
        assert copied[0].pre_pad == same_padding.SAME
        x = _t(2, 4, 9, 10)
        with torch.no_grad():
            assert torch.equal(copied(x), converted(x))
