"""convert() on networks built from every conv-like layer, in float64 against the original, counting the
batch_norm calls left: torchvision's video ResNets (r3d_18, mc3_18, r2plus1d_18: Conv3d and Conv3d subclasses,
Conv2Plus1D Sequentials followed by a BN), timm's ConvMixer (Conv -> activation -> BN, at reduced width/depth:
the same timm class), a DCGAN-style generator (ConvTranspose2d), an MLP with BatchNorm1d on 2-D and 3-D inputs,
and a Conv1d ResNet built here; plus the report's kinds, the chains that must stay unfused, and the ONNX export of
a converted r3d_18 (no BatchNormalization node, same numbers in onnxruntime).
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn

import fusedconv
from fusedconv.fused_layers import FusedConv3d
from fusedconv.fused_transpose import FusedConvTranspose2d
from fusedconv.fused_linear import FusedLinear
from util import batch_norm_count, count_ops, max_rel_error, randomize_bn

TOL64 = 1e-9


def _check(model, *inputs):
    """Convert a float64 copy; return (converted, report) after checking outputs and that no batch_norm is left."""
    model = randomize_bn(model).eval().double()
    inputs = tuple(t.double() for t in inputs)
    converted, report = fusedconv.convert(model, example_inputs=inputs, return_report=True)
    with torch.no_grad():
        assert max_rel_error(converted(*inputs), model(*inputs)) < TOL64
    before = batch_norm_count(count_ops(model, *inputs))
    assert before > 0
    assert batch_norm_count(count_ops(converted, *inputs)) == 0, str(report)
    assert len(report.fused) > 0 and not report.skipped, str(report)
    return converted, report


@pytest.mark.parametrize("builder", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_torchvision_video_resnets(builder):
    video = pytest.importorskip("torchvision.models.video")
    torch.manual_seed(0)
    converted, report = _check(getattr(video, builder)(num_classes=7), torch.randn(1, 3, 4, 32, 32))
    kinds = collections.Counter(r.kind for r in report.fused)
    assert set(kinds) == {"conv3d_bn_act"}, kinds
    assert any(isinstance(m, FusedConv3d) for m in converted.modules())


def test_timm_convmixer_blocks():
    convmixer = pytest.importorskip("timm.models.convmixer")
    torch.manual_seed(1)
    model = convmixer.ConvMixer(dim=32, depth=3, kernel_size=5, patch_size=4, num_classes=5, act_layer=nn.GELU)
    _, report = _check(model, torch.randn(1, 3, 32, 32))
    assert {r.kind for r in report.fused} == {"conv_bn_act_bn"}
    assert all(r.detail == "gelu+post_bn" for r in report.fused)
    assert len(report.fused) == 1 + 2 * 3  # stem + (depthwise, pointwise) per block


def test_dcgan_generator():
    torch.manual_seed(2)

    def up(cin, cout, stride, pad):
        return [nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

    gen = nn.Sequential(*up(16, 32, 1, 0), *up(32, 16, 2, 1), *up(16, 8, 2, 1), nn.ConvTranspose2d(8, 3, 4, 2, 1),
                        nn.Tanh())
    converted, report = _check(gen, torch.randn(2, 16, 1, 1))
    assert {r.kind for r in report.fused} == {"conv_transpose2d_bn_act"} and len(report.fused) == 3
    assert sum(isinstance(m, FusedConvTranspose2d) for m in converted.modules()) == 3


def test_mlp_with_batchnorm1d_on_2d_and_3d_inputs():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8, bias=False),
                        nn.BatchNorm1d(8), nn.SiLU(), nn.Linear(8, 4))
    converted, report = _check(mlp, torch.randn(5, 12))
    assert {r.kind for r in report.fused} == {"linear_bn_act"} and len(report.fused) == 2
    # BatchNorm1d over dim 1 of a 3-D (N, C, L) linear output: per-C scale/shift, not per output feature.
    seq3 = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(3), nn.GELU(), nn.BatchNorm1d(3))
    converted3, report3 = _check(seq3, torch.randn(4, 3, 6))
    assert isinstance(converted3[0], FusedLinear) and report3.fused[0].detail == "bn+gelu+post_bn"


class _Conv1dBlock(nn.Module):
    def __init__(self, c, stride=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(c, c * stride, 3, stride, 1, bias=False), nn.BatchNorm1d(c * stride),
                                  nn.ReLU(), nn.Conv1d(c * stride, c * stride, 5, 1, 4, dilation=2, groups=2),
                                  nn.BatchNorm1d(c * stride))
        self.short = (nn.Sequential(nn.Conv1d(c, c * stride, 1, stride), nn.BatchNorm1d(c * stride)) if stride > 1
                      else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


def test_conv1d_resnet():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv1d(3, 8, 7, 2, 3), nn.BatchNorm1d(8), nn.ReLU(), _Conv1dBlock(8), _Conv1dBlock(8, 2),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 4))
    _, report = _check(net, torch.randn(2, 3, 64))
    assert {r.kind for r in report.fused} == {"conv1d_bn_act"} and len(report.fused) == 8
    # each block's `relu(body(x) + short(x))` joins the epilogue of the conv ending `body`
    assert sum(r.detail.startswith("add+relu into body.") for r in report.fused) == 2, str(report)


@torch.no_grad()
def test_unsafe_chains_stay_unfused_with_a_reason():
    torch.manual_seed(5)
    shared_bn = nn.BatchNorm3d(4)
    model = nn.Sequential(
        nn.Sequential(nn.Conv3d(2, 4, 1), shared_bn, nn.ReLU()),
        nn.Sequential(nn.Conv3d(4, 4, 1), shared_bn),  # the same BN object twice: not provably one chain
    )
    model = randomize_bn(model).eval()
    _, report = fusedconv.convert(model, return_report=True)
    assert len(report.skipped) == 2 and all("shared" in r.detail for r in report.skipped), str(report)
    mismatched = randomize_bn(nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(3))).eval()
    _, report = fusedconv.convert(mismatched, return_report=True)
    assert report.skipped and "3 features" in report.skipped[0].detail


def test_conv3d_subclass_with_its_own_forward_is_left_alone():
    class ScaledConv3d(nn.Conv3d):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = randomize_bn(nn.Sequential(ScaledConv3d(2, 3, 1), nn.BatchNorm3d(3))).eval()
    converted, report = fusedconv.convert(model, return_report=True)
    assert not report.fused and type(converted[0]) is ScaledConv3d


@torch.no_grad()
def test_r3d_18_onnx_export_has_no_batchnorm_and_matches_onnxruntime(tmp_path):
    video = pytest.importorskip("torchvision.models.video")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from fusedconv.export import export_onnx

    torch.manual_seed(6)
    model = randomize_bn(video.r3d_18(num_classes=5)).eval()
    converted = fusedconv.convert(model)
    x = torch.randn(1, 3, 4, 32, 32)
    proto = export_onnx(converted, (x,), tmp_path / "r3d_18.onnx")
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert "BatchNormalization" not in ops and ops["Conv"] == 20, ops
    session = ort.InferenceSession(onnx.load(str(tmp_path / "r3d_18.onnx")).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert max_rel_error(torch.from_numpy(out), model(x)) < 1e-4


@torch.no_grad()
def test_converting_twice_changes_nothing():
    torch.manual_seed(7)
    model = randomize_bn(nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6),
        nn.ConvTranspose1d(6, 4, 4, 2, 1), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(128, 5), nn.BatchNorm1d(5))).eval()
    x = torch.randn(3, 3, 16)
    once, report = fusedconv.convert(model, return_report=True)
    assert len(report.fused) == 3, str(report)
    twice, report2 = fusedconv.convert(once, return_report=True)
    assert not report2.rows, str(report2)
    assert torch.equal(twice(x), once(x)) and max_rel_error(once(x), model(x)) < 1e-5


def test_layer_chain_with_hooked_module_is_left_alone():
    """A BatchNorm carrying a forward hook must keep being called (and seeing its own output): not folded."""
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.ReLU()).eval()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x = torch.randn(2, 3, 9)
    ref = model(x)
    converted, report = fusedconv.convert(model, return_report=True)
    assert [r.status for r in report.rows if r.kind == "conv1d_bn_act"] == ["skipped"]
    assert "hooks" in report.rows[0].detail
    seen.clear()
    torch.testing.assert_close(converted(x), ref)
    assert len(seen) == 1


def test_check_state_dict_knows_every_fused_layer_kind():
    """A converted model's own checkpoint passes check_state_dict; loading it into the unconverted model is refused."""
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2 * 2, 5), torch.nn.BatchNorm1d(5)).eval()
    converted = fusedconv.convert(model)
    fusedconv.check_state_dict(converted, converted.state_dict())
    with pytest.raises(ValueError, match="unconverted model"):
        fusedconv.check_state_dict(model, converted.state_dict())
