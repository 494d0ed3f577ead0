"""timm's MixedConv2d followed by a BatchNorm (+ activation): folded into its groups' convs (fusedconv/fused_mixed.py),
exactly, in float64, on the fused path and on a block's fallback; and left alone, with a reason, where it may not be."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import fold  # noqa: E402
from fusedconv.fused_mixed import FusedMixedConv2d  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

timm_layers = pytest.importorskip("timm.layers")
MixedConv2d, BatchNormAct2d = timm_layers.MixedConv2d, timm_layers.BatchNormAct2d
TOL = 1e-12  # float64: a wrong fold shows as O(1)


class _MixBlock(nn.Module):
    """MixNet's pattern: a MixedConv2d (3x3 / 5x5 depthwise groups, or 1x1 pointwise groups), a norm-act BN, an
    optional residual read from a flag on every call."""

    def __init__(self, c: int = 12, depthwise: bool = True, act=nn.SiLU, skip: bool = True):
        super().__init__()
        out = c if depthwise else 2 * c
        self.conv = MixedConv2d(c, out, kernel_size=[3, 5] if depthwise else [1, 1], depthwise=depthwise)
        self.bn = BatchNormAct2d(out, act_layer=act)
        self.proj = nn.Conv2d(out, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.has_skip = skip

    def forward(self, x):
        y = self.bn2(self.proj(self.bn(self.conv(x))))
        return y + x if self.has_skip else y


def _x(c=12, seed=0):
    return torch.randn(2, c, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _convert(model):
    model = randomize_bn(model, example=_x().float()).double().eval()
    return model, *fusedconv.convert(model, return_report=True)


@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, nn.Identity])
def test_a_bn_after_a_mixed_conv_folds_into_its_groups(depthwise, act):
    model, converted, report = _convert(_MixBlock(depthwise=depthwise, act=act))
    x = _x()
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < TOL
    fused = converted.conv
    assert type(fused) is FusedMixedConv2d and fused.splits == list(model.conv.splits)
    assert all(type(c) is FusedConv2d for c in fused.children()) and type(converted.bn) is nn.Identity
    assert not any(fold.is_batchnorm(m) for m in converted.modules())
    rows = [r for r in report.fused if r.kind == "mixed_conv2d_bn_act"]
    assert len(rows) == 1 and rows[0].nodes == ("conv", "bn")
    assert rows[0].detail == ("bn" if act is nn.Identity else f"bn+{ {nn.SiLU: 'silu', nn.ReLU: 'relu'}[act] }")
    # state_dict: each group keeps its conv's weight under its key and adds scale / shift; the BN's keys are gone.
    sd, before = converted.state_dict(), model.state_dict()
    for i, c in enumerate(model.conv.children()):
        assert torch.equal(sd[f"conv.{i}.weight"], c.weight)
        assert {f"conv.{i}.scale", f"conv.{i}.shift"} <= set(sd)
    assert not any(k.startswith("bn.") for k in sd) and any(k.startswith("bn.") for k in before)
    # The folded BN's per-channel scale, concatenated over the groups, is the BN's own.
    bn = model.bn
    assert torch.allclose(fused.scale, bn.weight / torch.sqrt(bn.running_var + bn.eps), rtol=1e-12, atol=0)


def test_the_residual_add_after_a_mixed_conv_stays_an_add():
    class AddAfter(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MixedConv2d(12, 12, kernel_size=[3, 5], depthwise=True)
            self.bn = nn.BatchNorm2d(12)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)) + x)

    model, converted, report = _convert(AddAfter())
    x = _x()
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < TOL
    assert type(converted.conv) is FusedMixedConv2d
    assert [r.detail for r in report.fused if r.kind == "mixed_conv2d_bn_act"] == ["bn"]
    assert all(c.act.is_identity for c in converted.conv.children())  # neither add nor the ReLU after it folded


def test_a_block_whose_guard_misses_computes_the_original_through_its_fallback():
    # Flipping the flag the fused graph was specialized for sends the call to the block's own forward, where the
    # MixedConv2d and the norm-act BN are stand-ins computing what the originals computed (graph/roles.py).
    model, converted, _ = _convert(_MixBlock(act=nn.ReLU))
    x = _x()
    table = guard_table(converted)
    with torch.no_grad():
        for skip, fallback in ((False, 1), (True, 0)):  # flipped: the fallback; back as traced: the fused graph
            model.has_skip = converted.has_skip = skip
            calls = table.fallback_calls
            assert max_rel_error(converted(x), model(x)) < TOL
            assert table.fallback_calls == calls + fallback


def test_a_norm_act_bn_keeps_its_activation_on_the_fallback():
    # A plain conv with timm's BatchNormAct2d: its activation moved into the fused conv's epilogue; a call the guard
    # sends to the block's own forward must still apply it (the BN's stand-in does).
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(12, 12, 3, padding=1, bias=False)
            self.bn = BatchNormAct2d(12, act_layer=nn.ReLU6)
            self.has_skip = True

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y + x if self.has_skip else y

    model, converted, _ = _convert(Block())
    x = _x()
    with torch.no_grad():
        model.has_skip = converted.has_skip = False
        calls = guard_table(converted).fallback_calls
        out, want = converted(x), model(x)
    assert guard_table(converted).fallback_calls == calls + 1
    assert max_rel_error(out, want) < TOL


def _skip_rows(report):
    return [r.detail for r in report.skipped if r.kind == "mixed_conv2d_bn_act"]


def test_a_mixed_conv_with_a_biased_group_is_left_with_a_reason():
    block = _MixBlock()
    block.conv._modules["1"] = nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=True)
    model, converted, report = _convert(block)
    x = _x()
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < TOL
    assert type(converted.conv) is MixedConv2d and fold.is_batchnorm(converted.bn)
    assert _skip_rows(report) == ["MixedConv2d group 1 has a bias"]


def test_a_mixed_conv_group_with_a_hook_is_left_with_a_reason():
    block = _MixBlock()
    seen = []
    block.conv._modules["0"].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model, converted, report = _convert(block)
    with torch.no_grad():
        assert max_rel_error(converted(_x()), model(_x())) < TOL
    assert type(converted.conv) is MixedConv2d
    assert _skip_rows(report) == ["MixedConv2d group 0 has forward / backward hooks, which must keep seeing its own "
                                  "output"]


def test_a_patched_mixed_conv_forward_is_not_assumed(monkeypatch):
    # Whatever MixedConv2d's forward computes is probed: a forward that is not the concatenation of its groups is
    # not folded (and the converted model still computes it).
    real = MixedConv2d.forward
    monkeypatch.setattr(MixedConv2d, "forward", lambda self, x: real(self, x) * 2.0)
    model, converted, report = _convert(_MixBlock())
    x = _x()
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < TOL
    assert type(converted.conv) is MixedConv2d
    assert _skip_rows(report) == ["MixedConv2d: its forward does not compute the concatenation of its groups' outputs"]


def test_from_modules_checks_its_arguments():
    mixed = MixedConv2d(12, 12, kernel_size=[3, 5], depthwise=True).eval()
    with pytest.raises(TypeError, match="mixed: expected timm's MixedConv2d, got Conv2d"):
        FusedMixedConv2d.from_modules(nn.Conv2d(12, 12, 3), nn.BatchNorm2d(12).eval())
    with pytest.raises(ValueError, match="bn: expected 12 features to match the MixedConv2d's output channels, got 8"):
        FusedMixedConv2d.from_modules(mixed, nn.BatchNorm2d(8).eval())
    with pytest.raises(RuntimeError, match="eval mode"):
        FusedMixedConv2d.from_modules(mixed, nn.BatchNorm2d(12))
    with pytest.raises(ValueError, match="convs: expected one FusedConv2d per split"):
        FusedMixedConv2d([], [12])


def test_mixnet_is_converted_whole_and_exact():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mixnet_s").eval()
    model, converted, report = _convert(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-10
    assert not any(fold.is_batchnorm(m) for m in converted.modules())
    assert sum(type(m) is FusedMixedConv2d for m in converted.modules()) == \
        sum(type(m) is MixedConv2d for m in model.modules())
    # float32, the default CPU path (oneDNN on channel slices of channels_last input)
    model32 = copy.deepcopy(model).float()
    converted32 = fusedconv.convert(model32)
    with torch.no_grad():
        for _ in range(2):
            assert max_rel_error(converted32(x.float()), model32(x.float())) < 1e-4
