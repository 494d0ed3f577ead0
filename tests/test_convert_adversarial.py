"""convert() on small adversarial models: every chain is fused only where exactly equivalent.

Each case compares the converted model with the original (PyTorch's own Conv2d -> BatchNorm2d(eval) -> act),
counts the batch_norm ops still executing, and checks the report says why a chain was left alone.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_convert_helpers import check_convert, fused, output_error, skipped  # noqa: E402
from util import randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import FusedConv2d  # noqa: E402
from fusedconv.graph.dataflow import fuse_dataflow  # noqa: E402
from fusedconv.report import ConversionReport  # noqa: E402


def _x(c=4, size=10, seed=0):
    return torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(seed))


def _prep(model, seed=0):
    torch.manual_seed(seed)
    for m in model.modules():  # non-trivial conv biases / weights where present
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.3)
    return randomize_bn(model, seed).eval()


class ConvBN(nn.Module):
    """conv -> bn -> f(y) where f is given (the forward under test)."""

    def __init__(self, f, bias=False, padding_mode="zeros", bn=None):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias, padding_mode=padding_mode)
        self.bn = bn if bn is not None else nn.BatchNorm2d(6)
        self.f = f

    def forward(self, x):
        return self.f(self.bn(self.conv(x)))


FUNCTIONAL_ACTS = {
    "F.relu": (lambda y: F.relu(y), "relu"),
    "torch.relu": (lambda y: torch.relu(y), "relu"),
    "method relu": (lambda y: y.relu(), "relu"),
    "F.relu inplace": (lambda y: F.relu(y, inplace=True), "relu"),
    "F.leaky_relu": (lambda y: F.leaky_relu(y, 0.2), "leaky_relu(0.2)"),
    "F.hardtanh(0,6)": (lambda y: F.hardtanh(y, 0.0, 6.0), "relu6"),
    "F.silu": (lambda y: F.silu(y), "silu"),
    "F.hardswish": (lambda y: F.hardswish(y), "hardswish"),
    "F.gelu tanh": (lambda y: F.gelu(y, approximate="tanh"), "gelu_tanh"),
}


@pytest.mark.parametrize("key", list(FUNCTIONAL_ACTS))
@pytest.mark.parametrize("bias", [False, True])
def test_functional_activation(key, bias):
    f, name = FUNCTIONAL_ACTS[key]
    model = _prep(ConvBN(f, bias=bias))
    converted, report = check_convert(model, _x())
    assert [r.detail for r in fused(report)] == [f"bn+{name}"]
    # A functional activation needs the graph: the block is rewritten but keeps its class name.
    assert type(converted).__name__ == "ConvBN"


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.3), nn.SiLU(), nn.Hardswish(), nn.GELU(),
                                 nn.Hardtanh(0.0, 6.0)])
def test_module_activation_keeps_class_and_names(act):
    model = _prep(ConvBN(act, padding_mode="reflect", bias=True))
    converted, report = check_convert(model, _x())
    assert type(converted) is ConvBN  # children swapped, not a GraphModule
    assert isinstance(converted.conv, FusedConv2d) and type(converted.bn) is nn.Identity
    assert converted.conv.padding_mode == "reflect"
    assert len(fused(report)) == 1


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        c = self.conv(x)
        return F.relu(self.bn(c)) + c


def test_conv_output_used_twice_is_not_folded():
    converted, report = check_convert(_prep(ConvUsedTwice()), _x(), bn_left=1)
    assert len(skipped(report)) == 1 and "used 2 times" in skipped(report)[0].detail


class SharedReLU(nn.Module):
    """One ReLU module at two call sites; the second applies to a sum that is not a chain output."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.proj = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(y - self.proj(x))


def test_shared_activation_module_stays_where_needed():
    converted, report = check_convert(_prep(SharedReLU()), _x())
    assert [r.detail for r in fused(report)] == ["bn+relu"]
    assert "relu" in dict(converted.named_children())  # still needed by the second call site
    assert (converted(_x()) >= 0).all()


def test_activation_shared_between_sequentials_is_not_replaced():
    relu = nn.ReLU()
    model = _prep(nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), relu),
                                nn.Sequential(nn.Conv2d(4, 4, 1), relu)))
    model[1][0].bias.data.fill_(-0.5)
    converted, report = check_convert(model, _x(), bn_left=1)
    assert "shared" in skipped(report)[0].detail
    assert isinstance(converted[1][1], nn.ReLU)


class BNUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv1(x))) * self.bn(self.conv2(x))


def test_bn_module_called_twice_folds_into_each_conv():
    converted, report = check_convert(_prep(BNUsedTwice()), _x())
    assert len(fused(report)) == 2


class FunctionalBN(nn.Module):
    def __init__(self, training_flag=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, eps=1e-3)
        self.training_flag = training_flag

    def forward(self, x):
        b = self.bn
        y = F.batch_norm(self.conv(x), b.running_mean, b.running_var, b.weight, b.bias, self.training_flag, 0.1,
                         b.eps)
        return F.silu(y)


def test_functional_batch_norm_with_module_buffers():
    converted, report = check_convert(_prep(FunctionalBN()), _x())
    assert [r.detail for r in fused(report)] == ["F.batch_norm+silu"]


def test_functional_batch_norm_training_true_is_skipped():
    model = _prep(FunctionalBN(training_flag=True))
    with torch.no_grad():
        ref = model(_x())
    converted, report = fusedconv.convert(model, return_report=True)
    assert "training=True" in skipped(report)[0].detail
    with torch.no_grad():
        assert output_error(converted(_x()), ref) == 0.0


def test_training_mode_model_is_refused_and_a_training_bn_left_alone():
    model = _prep(ConvBN(nn.ReLU())).train()
    with pytest.raises(RuntimeError, match="eval mode.*'<root>'"):
        fusedconv.convert(model)
    model.eval()
    model.bn.train()  # (put back in training mode by its owner: it normalizes by the batch, so it is not folded)
    converted, report = fusedconv.convert(model, return_report=True)
    assert not report.fused and "training mode" in report.skipped[0].detail
    assert type(converted.bn) is nn.BatchNorm2d and converted.bn.training


def test_training_mode_bn_is_skipped_by_the_pass():
    model = _prep(ConvBN(nn.ReLU()))
    model.bn.train()
    report = ConversionReport()
    fuse_dataflow(model, report)
    assert not fused(report) and "training mode" in skipped(report)[0].detail


def test_bn_without_running_stats_is_skipped():
    model = _prep(ConvBN(nn.ReLU(), bn=nn.BatchNorm2d(6, track_running_stats=False)))
    converted, report = check_convert(model, _x(), bn_left=1)
    assert "running statistics" in skipped(report)[0].detail


class ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_bn_subclass_with_custom_forward_is_skipped():
    converted, report = check_convert(_prep(ConvBN(nn.ReLU(), bn=ScaledBN(6))), _x(), bn_left=1)
    assert "overrides its forward" in skipped(report)[0].detail


def test_sequential_bn_subclass_and_syncbn():
    model = _prep(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), ScaledBN(4), nn.ReLU(),
                                nn.Conv2d(4, 4, 3, padding=1, bias=True), nn.SyncBatchNorm(4), nn.ReLU6()))
    converted, report = check_convert(model, _x(), bn_left=1)
    assert [r.status for r in report.rows] == ["skipped", "fused"]
    assert fused(report)[0].detail == "bn+relu6"


def test_frozen_batchnorm():
    from torchvision.ops import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(6)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_()
    model = _prep(ConvBN(lambda y: y.relu(), bn=bn))
    converted, report = check_convert(model, _x())
    assert len(fused(report)) == 1


class Residual(nn.Module):
    """conv2 -> bn2 -> (+ other) -> relu, other being the input, another chain, a parameter, or itself."""

    def __init__(self, other):
        super().__init__()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.convd, self.bnd = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.param = nn.Parameter(torch.randn(4, 1, 1))
        self.relu = nn.ReLU(inplace=True)
        self.other = other

    def forward(self, x):
        y = self.bn2(self.conv2(x))
        if self.other == "input":
            y = y + x
        elif self.other == "input_first":
            y = x + y
        elif self.other == "chain":
            y += self.bnd(self.convd(x))
        elif self.other == "param":
            y = y + self.param
        elif self.other == "per_channel":  # a computed (N, C, 1, 1) tensor: broadcasts, not a residual
            y = y + x.mean((2, 3), keepdim=True)
        elif self.other == "indexed":
            y = y + x.amax(1)[:, None]
        elif self.other == "self":
            y = y + y
        elif self.other == "inplace_other":
            z = x * 1.0
            z.add_(y)
            return self.relu(z), z
        return self.relu(y)


@pytest.mark.parametrize("other,details", [
    ("input", ["bn+add+relu"]), ("input_first", ["bn+add+relu"]), ("chain", ["bn", "bn+add+relu"]),
    ("param", ["bn"]), ("self", ["bn"]), ("inplace_other", ["bn"]), ("per_channel", ["bn"]), ("indexed", ["bn"]),
])
def test_residual_add(other, details):
    # reparameterize=False: re-parameterization would merge "conv + bn + identity" into one conv first.
    converted, report = check_convert(_prep(Residual(other)), _x(), reparameterize=False)
    assert sorted(r.detail for r in fused(report)) == sorted(details)


class Grandchildren(nn.Module):
    """Chain members reached by indexing a ModuleList: the fused module gets a flat new name."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)])

    def forward(self, x):
        return F.relu(self.layers[1](self.layers[0](x)) + x)


def test_chain_through_modulelist_indexing():
    converted, report = check_convert(_prep(Grandchildren()), _x(), reparameterize=False)
    assert [r.detail for r in fused(report)] == ["bn+add+relu"]
    assert isinstance(converted.layers_0, FusedConv2d)


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))


def test_conv_module_called_twice_is_skipped():
    converted, report = check_convert(_prep(ConvCalledTwice()), _x(), bn_left=2, reparameterize=False)
    assert "called 2 times" in skipped(report)[0].detail


class SideEffect(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.calls = 0

    def forward(self, x):
        self.last_shape = x.shape
        return self.bn(self.conv(x))


def test_forward_with_side_effects_is_not_rewritten():
    model = _prep(SideEffect())
    converted, report = check_convert(model, _x(), bn_left=1)
    assert "not traceable" in skipped(report)[0].detail and "last_shape" in skipped(report)[0].detail
    assert not hasattr(model, "last_shape") or isinstance(model.last_shape, torch.Size)


def test_timm_batchnormact_with_drop_is_skipped():
    timm_layers = pytest.importorskip("timm.layers")
    bn = timm_layers.BatchNormAct2d(6, act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.1))
    converted, report = check_convert(_prep(ConvBN(nn.Identity(), bn=bn)), _x(), bn_left=1)
    assert "Dropout" in skipped(report)[0].detail
    bn = timm_layers.BatchNormAct2d(6, act_layer=nn.Mish)
    converted, report = check_convert(_prep(ConvBN(nn.Identity(), bn=bn)), _x(), bn_left=1)
    assert "Mish" in skipped(report)[0].detail
    bn = timm_layers.BatchNormAct2d(6, act_layer=nn.Hardswish)
    converted, report = check_convert(_prep(ConvBN(nn.Identity(), bn=bn)), _x())
    assert fused(report)[0].detail == "bn+hardswish"


def test_inplace_and_idempotent():
    model = _prep(ConvBN(nn.ReLU()))
    with torch.no_grad():
        ref = model(_x())
    same = fusedconv.convert(model, inplace=True)
    assert same is model and isinstance(model.conv, FusedConv2d)
    again, report = fusedconv.convert(model, return_report=True)
    assert not report.rows
    with torch.no_grad():
        assert output_error(again(_x()), ref) < 1e-5


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fusedconv.convert(lambda x: x)
    with pytest.raises(TypeError, match="example_inputs: expected a tensor"):
        fusedconv.convert(_prep(ConvBN(nn.ReLU())), example_inputs={"x": _x()})
    with pytest.raises(ValueError, match="tolerance"):
        fusedconv.convert(_prep(ConvBN(nn.ReLU())), tolerance=-1)


def test_self_check_raises_above_tolerance():
    model = _prep(ConvBN(nn.ReLU()))
    with pytest.raises(RuntimeError, match=r"differ from the original's by .* above the tolerance 0"):
        fusedconv.convert(model, example_inputs=_x(), tolerance=0.0)
    _, report = fusedconv.convert(model, example_inputs=(_x(),), return_report=True)
    assert 0 < report.max_rel_error < 1e-5


class PaddedConv(nn.Conv2d):
    """A Conv2d subclass that pads in forward (like timm's Conv2dSame): not assumed to be a plain conv."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 0, 1, 0)))


def test_conv_subclass_is_reported_not_fused():
    model = _prep(nn.Sequential(PaddedConv(4, 4, 2), nn.BatchNorm2d(4), nn.ReLU()))
    converted, report = check_convert(model, _x(), bn_left=1)
    assert "PaddedConv subclasses Conv2d" in skipped(report)[0].detail
    block = _prep(ConvBN(nn.ReLU()))
    block.conv = PaddedConv(4, 6, 2)
    converted, report = check_convert(block, _x(), bn_left=1)
    assert "PaddedConv subclasses Conv2d" in skipped(report)[0].detail


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kernel,expect_fused", [(3, True), (4, False)])
def test_padding_same(kernel, expect_fused):
    model = _prep(nn.Sequential(nn.Conv2d(4, 4, kernel, padding="same"), nn.BatchNorm2d(4), nn.ReLU()))
    converted, report = check_convert(model, _x(), bn_left=0 if expect_fused else 1)
    assert bool(fused(report)) == expect_fused
    if not expect_fused:
        assert "asymmetric" in skipped(report)[0].detail


class DropPathResidual(nn.Module):
    """bn -> dropout / identity (no-ops in eval) -> + x -> relu, as in timm's blocks (drop_path before the add)."""

    def __init__(self, drop):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), drop

    def forward(self, x):
        return F.relu(self.drop(self.bn(self.conv(x))) + x)


@pytest.mark.parametrize("drop", [nn.Identity(), nn.Dropout(0.5)])
def test_eval_noop_between_bn_and_residual(drop):
    converted, report = check_convert(_prep(DropPathResidual(drop)), _x(), reparameterize=False)
    assert [r.detail for r in fused(report)] == ["bn+add+relu"]


class ReadsConvBias(nn.Module):
    """forward also reads the conv's parameters: the conv must stay where it is."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x) + self.conv.bias.view(1, -1, 1, 1)


def test_conv_parameters_read_elsewhere():
    model = _prep(ReadsConvBias())
    converted, report = check_convert(model, _x(), reparameterize=False)
    assert [r.detail for r in fused(report)] == ["bn+add+relu"]
    assert isinstance(converted.conv_fused, FusedConv2d)
    assert torch.equal(converted.conv.bias, model.conv.bias)  # still there for forward to read


class SequentialThen(nn.Module):
    """A Sequential ending in conv -> BN, then (+ x) and / or an activation in the parent's forward."""

    def __init__(self, residual: bool, act: nn.Module):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
        self.residual, self.act = residual, act

    def forward(self, x):
        y = self.body(x)
        return self.act(y + x) if self.residual else self.act(y)


@pytest.mark.parametrize("residual", [False, True])
def test_add_and_activation_after_a_sequential_join_its_last_conv(residual):
    converted, report = check_convert(_prep(SequentialThen(residual, nn.Hardswish())), _x(), reparameterize=False)
    details = [r.detail for r in fused(report)]
    assert details[-1] == ("add+hardswish" if residual else "hardswish") + " into body.3.0"
    assert type(converted.body) is nn.Sequential and converted.body[3][0].act.name == "hardswish"
    # The block stays itself either way: its own class (a guarded subclass of it) and its attributes.
    assert isinstance(converted, SequentialThen) and type(converted).__name__ == "SequentialThen"


def test_fx_graphmodule_input_and_converting_twice():
    """A model the user already traced with fx: nested call targets ("body.0") and fx's own containers."""
    model = torch.fx.symbolic_trace(_prep(SequentialThen(True, nn.ReLU())))
    converted, report = check_convert(model, _x(), reparameterize=False)
    assert len(fused(report)) == 2
    again, report = fusedconv.convert(converted, return_report=True)
    assert not report.rows


class MutatesInputBeforeAdd(nn.Module):
    """x is changed in place after conv read it and before the add: the residual cannot be fused (the fused
    module would run at the add and read the changed x)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = x * 1.0
        y = self.bn(self.conv(x))
        r = torch.sigmoid(x)
        x.mul_(2.0)
        return self.relu(y + r)


def test_in_place_change_of_conv_input_blocks_the_residual():
    converted, report = check_convert(_prep(MutatesInputBeforeAdd()), _x(), reparameterize=False)
    assert [r.detail for r in fused(report)] == ["bn"]


class CachesInPlace(nn.Module):
    """timm LeViT's attention-bias cache: the forward fills a dict attribute in place, keyed by the device."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.offset = nn.Parameter(torch.randn(4, 1, 1))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.offset * 2.0
        return self.bn(self.conv(x)) + self.cache[key]


@torch.no_grad()
def test_forward_filling_a_container_in_place_is_not_rewritten_and_leaks_no_proxy():
    """Tracing used to leave an fx Proxy in the cache (the dict object stayed the same, so the write went
    unseen): the converted model could not be deep-copied or saved."""
    import copy
    import io

    model = _prep(CachesInPlace())
    converted, report = check_convert(model, _x(), bn_left=1)
    assert "not traceable" in skipped(report)[0].detail and "cache" in skipped(report)[0].detail
    assert list(converted.cache) in ([], ["cpu"]) and list(model.cache) in ([], ["cpu"])
    buf = io.BytesIO()
    torch.save(copy.deepcopy(converted), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert output_error(loaded(_x()), model(_x())) == 0.0
