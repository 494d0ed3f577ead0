"""In-place residual convs on CPU (fusedconv/graph/private_residual.py): taken only where no one else can read the
residual, and the converted model still computes Conv -> BN(eval) -> act (+ residual) exactly.

Each test counts the in-place oneDNN calls, so a test whose model should get them fails if they silently stop,
and a test whose model must not get them fails if they happen; every kept tensor (a hook's capture, a returned
residual, a Unet encoder's stage outputs) is compared against the float64 original. Models are converted with
`flatten=False` (the per-block mechanism; the flat forward's own rule: tests/test_flat_forward.py).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import KeepEveryOutput, max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.skipif(not cpu.available() or cpu._pointwise_binary_inplace is None,
                                reason="this PyTorch build has no in-place oneDNN residual conv")


class Block(nn.Module):
    """A torchvision-style basic block with a downsample branch; `keep` also returns the residual."""

    def __init__(self, cin=4, cout=8, keep=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()
        self.keep = keep

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        identity = self.downsample(x)
        y = self.relu(self.bn2(self.conv2(y)) + identity)
        return (y, identity) if self.keep else y


class Net(nn.Module):
    def __init__(self, keep=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Block(keep=keep)

    def forward(self, x):
        return self.block(self.stem(x))


def _pair(model_cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = randomize_bn(model_cls(**kw).eval(), seed)
    return model, fusedconv.convert(copy.deepcopy(model), flatten=False)


def _ref64(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def test_downsample_residual_is_written_in_place_and_exact(inplace_calls):
    model, fc = _pair(Net)
    x = torch.randn(2, 3, 16, 16)
    ref = _ref64(model, x)
    with torch.no_grad():
        for _ in range(3):  # first call checks the layout and routes; the later ones take the common call
            y = fc(x)
            assert max_rel_error(y, ref) < TOL
    assert len(inplace_calls) >= 2  # the common calls wrote into the downsample output


def _check_out_of_place(inplace_calls, hooked, keep):
    """Convert Net, put a forward hook on `hooked(converted)` that stores `keep(inputs, output)`, run three
    calls: each is exact, no conv writes in place, and every stored tensor is still the downsample's output."""
    model, fc = _pair(Net)
    kept = []
    hooked(fc).register_forward_hook(lambda m, i, o: kept.append(keep(i, o)))
    x = torch.randn(2, 3, 16, 16)
    ref = _ref64(model, x)
    ref_identity = _ref64(model.block.downsample, _ref64(model.stem, x).float())
    with torch.no_grad():
        for _ in range(3):
            assert max_rel_error(fc(x), ref) < TOL
    assert not inplace_calls
    assert kept  # the hook ran (the first call runs the model twice: the layout check)
    for r in kept:
        assert max_rel_error(r, ref_identity) < TOL


def test_hooked_downsample_keeps_what_it_returned(inplace_calls):
    _check_out_of_place(inplace_calls, lambda fc: fc.block.downsample, lambda i, o: o)


def test_hook_added_on_a_child_after_conversion_is_seen(inplace_calls):
    model, fc = _pair(Net)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fc(x), fc(x)
    assert inplace_calls
    inplace_calls.clear()
    kept = []
    fc.block.downsample[0].register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.no_grad():
        fc(x), fc(x)
    assert not inplace_calls
    ref_identity = _ref64(model.block.downsample, _ref64(model.stem, x).float())
    assert all(max_rel_error(o, ref_identity) < TOL for o in kept)


def test_global_forward_hook_turns_it_off(inplace_calls):
    _, fc = _pair(Net)
    x = torch.randn(2, 3, 16, 16)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with torch.no_grad():
            fc(x), fc(x), fc(x)
    finally:
        handle.remove()
    assert not inplace_calls


def test_mode_keeping_outputs_turns_it_off(inplace_calls):
    """A dispatch mode sees every output and may keep it: no residual is written in place under one, and the
    downsample output it kept still holds the downsample's value."""
    model, fc = _pair(Net)
    x = torch.randn(2, 3, 16, 16)
    ref = _ref64(model, x)
    ref_identity = _ref64(model.block.downsample, _ref64(model.stem, x).float())
    with torch.no_grad():
        fc(x)
    assert inplace_calls  # without a mode, the residual is written in place
    inplace_calls.clear()
    with torch.no_grad():
        for _ in range(2):
            with KeepEveryOutput() as mode:
                assert max_rel_error(fc(x), ref) < TOL
            assert any(t.shape == ref_identity.shape and max_rel_error(t, ref_identity) < TOL for t in mode.kept)
    assert not inplace_calls
    with torch.device("cpu"), torch.no_grad():  # torch's own DeviceContext mode is not one
        fc(x)
    assert inplace_calls


def test_residual_that_is_also_returned_is_not_overwritten(inplace_calls):
    model, fc = _pair(Net, keep=True)
    x = torch.randn(2, 3, 16, 16)
    ref_y, ref_identity = _ref64(model, x)
    with torch.no_grad():
        for _ in range(3):
            y, identity = fc(x)
            assert max_rel_error(y, ref_y) < TOL and max_rel_error(identity, ref_identity) < TOL
    assert not inplace_calls


def test_unet_encoder_stage_outputs_stay_intact(inplace_calls):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = randomize_bn(smp.Unet("resnet18", encoder_weights=None, classes=2).eval(), 0)
    fc = fusedconv.convert(copy.deepcopy(model), flatten=False)
    # channels_last input: the layout boundary does not check (and switch) NCHW input while hooks are inside
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    kept = []
    fc.encoder.register_forward_hook(lambda m, i, o: kept.append(list(o)))
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref_features = ref64.encoder(x.double())
        ref = ref64(x.double())
        for _ in range(3):
            assert max_rel_error(fc(x), ref) < TOL
    # The decoder read the skip connections after the residual convs ran: every stage output is unchanged.
    for features in kept:
        for f, r in zip(features, ref_features):
            assert max_rel_error(f, r) < TOL
    assert inplace_calls  # resnet18's downsample blocks took the in-place route


class TinyUnet(nn.Module):
    """An encoder keeps a stage output for the decoder's skip connection, and that same tensor is the identity
    residual of the next stage's block: a residual conv written in place would overwrite the skip."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv_a, self.bn_a = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        skip = self.stage1(x)
        y = torch.relu(self.bn_a(self.conv_a(skip)))
        y = torch.relu(self.bn_b(self.conv_b(y)) + skip)
        return self.head(torch.cat([y, skip], 1)), skip


def test_skip_connection_used_as_identity_residual_is_never_overwritten(inplace_calls):
    model, fc = _pair(TinyUnet)
    x = torch.randn(2, 3, 16, 16)
    ref_out, ref_skip = _ref64(model, x)
    with torch.no_grad():
        for _ in range(3):
            out, skip = fc(x)
            assert max_rel_error(out, ref_out) < TOL and max_rel_error(skip, ref_skip) < TOL
    assert not inplace_calls


def test_saved_and_loaded_model_keeps_the_route_and_its_check(inplace_calls, tmp_path):
    model, fc = _pair(Net)
    torch.save(fc, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    ref = _ref64(model, x)
    with torch.no_grad():
        for _ in range(3):
            assert max_rel_error(loaded(x), ref) < TOL
    assert inplace_calls
    inplace_calls.clear()
    loaded.block.downsample.register_forward_hook(lambda m, i, o: None)  # the loaded check still sees hooks
    with torch.no_grad():
        loaded(x), loaded(x)
    assert not inplace_calls


def test_per_call_check_accepts_only_fused_sequentials_without_hooks():
    from fusedconv.graph.private_residual import residual_private
    from fusedconv.modules import FusedConv2d

    def fused():
        return FusedConv2d.from_modules(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4).eval(), nn.ReLU())

    assert residual_private(fused())
    assert residual_private(nn.Sequential(fused(), nn.Identity()))
    assert not residual_private(nn.Identity())  # returns its input: the caller's tensor
    assert not residual_private(nn.Sequential(nn.Identity()))
    assert not residual_private(nn.Sequential(fused(), nn.ReLU()))  # other module code between
    assert not residual_private(nn.Conv2d(4, 4, 1))

    class Keeps(nn.Sequential):  # a subclass may keep what it returns
        pass
    assert not residual_private(Keeps(fused()))
    hooked = nn.Sequential(fused())
    hooked.register_forward_pre_hook(lambda m, i: None)
    assert not residual_private(hooked)


def test_hook_on_the_fused_conv_keeps_seeing_its_residual(inplace_calls):
    """A hook added on the fused conv itself sees (input, residual): the residual must stay the downsample's
    output, so the conv is not written into it."""
    _check_out_of_place(inplace_calls, lambda fc: fc.block.conv2, lambda i, o: i[1])
