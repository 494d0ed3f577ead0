"""Identity residuals written in place where the caller owns the block input (fusedconv/graph/owned_input.py and
private_residual.mark_owned_input): counted per forward, never where anyone else can still read the input.

Every test compares what it keeps (outputs, hook captures, features, the caller's tensors) with the float64
original, and counts the in-place oneDNN calls, so a route that silently stops or silently fires fails a test.
Models are converted with `flatten=False`: this is the per-block mechanism, which runs wherever the whole-model
flat forward does not apply (its own in-place rule: tests/test_flat_forward.py).
"""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu  # noqa: E402
from fusedconv.graph.owned_input import OwnedInputSequential  # noqa: E402

TOL = 1e-5
# In-place residuals are the oneDNN route's: small convs take it too here (by default they stay on F.conv2d).
pytestmark = [pytest.mark.skipif(not cpu.available() or cpu._pointwise_binary_inplace is None,
                                 reason="this PyTorch build has no in-place oneDNN residual conv"),
              pytest.mark.usefixtures("onednn_small_convs")]
CL = torch.channels_last


class IdBlock(nn.Module):
    """A basic block whose residual is its own input."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class ReadsAfter(IdBlock):
    """Reads its input again after the residual conv."""

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + x)
        return y + x.mean()


class ReturnsInput(IdBlock):
    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x), x


class Net(nn.Module):
    """stem -> Sequential of blocks; `skip` also returns the stage's input (a skip connection)."""

    def __init__(self, *blocks, skip=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(*(b() for b in blocks))
        self.skip = skip

    def forward(self, x):
        s = self.stem(x)
        y = self.stage(s)
        return (y, s) if self.skip else y


def _pair(build, seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(build().eval(), seed)
    return model, fusedconv.convert(copy.deepcopy(model), flatten=False)


def _ref64(model, *x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(*(t.double() for t in x))


def _close(out, ref):
    if isinstance(out, (tuple, list)):
        return all(_close(o, r) for o, r in zip(out, ref, strict=True))
    if isinstance(out, dict):
        return out.keys() == ref.keys() and all(_close(out[k], ref[k]) for k in out)
    return max_rel_error(out, ref) < TOL


def _steady(fc, x, inplace_calls, rounds=3):
    """Run `fc` a few times (the first call checks the layout boundary); the in-place calls of the last one."""
    with torch.no_grad():
        for _ in range(rounds):
            inplace_calls.clear()
            y = fc(x)
    return y, len(inplace_calls)


@pytest.mark.parametrize("name,count", [("resnet18", 7), ("resnet50", 16), ("mobilenet_v2", 5)])
def test_torchvision_models_count_and_match_float64(name, count, inplace_calls):
    """resnet18: 4 identity + 3 downsample residuals in place; resnet50: 12 + 4; mobilenet_v2: the 5 residual
    blocks whose previous block is itself a residual block (a block without a rewritten graph gives no proof)."""
    torchvision = pytest.importorskip("torchvision")
    model, fc = _pair(lambda: getattr(torchvision.models, name)(weights=None))
    x = torch.randn(1, 3, 64, 64)
    y, n = _steady(fc, x, inplace_calls)
    assert n == count
    assert max_rel_error(y, _ref64(model, x)) < TOL
    # The float64 model converted (F.conv2d route, no in-place writes) is the original function.
    fc64 = fusedconv.convert(copy.deepcopy(model).double(), flatten=False)
    assert type(fc64.features if name == "mobilenet_v2" else fc64.layer1) is OwnedInputSequential
    with torch.no_grad():
        assert max_rel_error(fc64(x.double()), _ref64(model, x)) < 1e-10


@pytest.mark.parametrize("name,count", [("resnet18", 7), ("mobilenet_v2", 5)])
def test_inference_mode_writes_in_place_too(name, count, inplace_calls):
    """Under torch.inference_mode every tensor is an inference tensor, which may be updated in place there: the
    same residuals run in place as under no_grad, with the same result; the input stays untouched."""
    torchvision = pytest.importorskip("torchvision")
    model, fc = _pair(lambda: getattr(torchvision.models, name)(weights=None))
    x = torch.randn(1, 3, 64, 64)
    x_before = x.clone()
    with torch.inference_mode():
        for _ in range(3):
            inplace_calls.clear()
            y = fc(x)
    assert len(inplace_calls) == count
    assert max_rel_error(y, _ref64(model, x)) < TOL
    assert torch.equal(x, x_before)


def test_small_net_writes_blocks_after_the_first(inplace_calls):
    model, fc = _pair(lambda: Net(IdBlock, IdBlock, IdBlock))
    assert type(fc.stage) is OwnedInputSequential and isinstance(fc.stage, nn.Sequential)
    plain = copy.deepcopy(fc)
    plain.stage.__class__ = nn.Sequential
    assert list(fc.state_dict()) == list(plain.state_dict())  # the same objects, the same keys
    x = torch.randn(2, 3, 12, 12)
    y, n = _steady(fc, x, inplace_calls)
    assert n == 2 and max_rel_error(y, _ref64(model, x)) < TOL


def test_block_called_directly_keeps_its_input(inplace_calls):
    torchvision = pytest.importorskip("torchvision")
    model, fc = _pair(lambda: torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 64, 16, 16).contiguous(memory_format=CL)
    before = x.clone()
    with torch.no_grad():
        for _ in range(2):
            y = fc.layer1[1](x)
    assert torch.equal(x, before) and not inplace_calls
    assert max_rel_error(y, _ref64(model.layer1[1], x)) < TOL


def test_stage_input_and_block_outputs_held_by_hooks(inplace_calls):
    """Hooks added after convert: on the module making the stage's input (the Sequential's own input, never
    owned), on a block's output (the next block's input) and on the fused conv producing it."""
    torchvision = pytest.importorskip("torchvision")
    model, fc = _pair(lambda: torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 64, 64)
    _, base = _steady(fc, x, inplace_calls)
    assert base == 7
    # A hooked block (layer3.1) is called as written, without the mark. layer2.0.conv2 is the fused conv taking
    # layer2.0's downsample output: hooked, it neither writes that in place nor proves layer2.0's output fresh
    # for layer2.1 (its output, conv + BN + add + ReLU, is the block's).
    for path, path64, saved_less in (("maxpool", "maxpool", 0), ("layer1.0", "layer1.0", 1),
                                     ("layer2.0.conv2", "layer2.0", 2), ("layer3.1", "layer3.1", 1)):
        kept, kept64 = [], []
        h = fc.get_submodule(path).register_forward_hook(lambda m, i, o: kept.append(o))
        h64 = model.get_submodule(path64).register_forward_hook(lambda m, i, o: kept64.append(o))
        y, n = _steady(fc, x, inplace_calls, rounds=1)
        ref = _ref64(model, x)  # the deep copy keeps the hook: kept64 gets the float64 capture
        h.remove(), h64.remove()
        assert n == base - saved_less, path
        assert max_rel_error(y, ref) < TOL and max_rel_error(kept[-1], kept64[-1]) < TOL, path


def test_pre_hook_on_a_block_holding_its_input(inplace_calls):
    torchvision = pytest.importorskip("torchvision")
    model, fc = _pair(lambda: torchvision.models.resnet18(weights=None))
    # channels_last input: the layout boundary does not check (and switch) NCHW input while hooks are inside
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    kept = []
    fc.layer1[1].register_forward_pre_hook(lambda m, i: kept.append(i[0]))
    model.layer1[1].register_forward_pre_hook(lambda m, i: kept.append(i[0]))
    y, n = _steady(fc, x, inplace_calls)
    ref = _ref64(model, x)
    assert n == 6 and max_rel_error(y, ref) < TOL and max_rel_error(kept[-2], kept[-1]) < TOL


def test_global_hook_turns_the_route_off(inplace_calls):
    model, fc = _pair(lambda: Net(IdBlock, IdBlock))
    x = torch.randn(2, 3, 12, 12)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        y, n = _steady(fc, x, inplace_calls)
    finally:
        handle.remove()
    assert n == 0 and max_rel_error(y, _ref64(model, x)) < TOL


def test_skip_connection_into_a_stage_is_never_overwritten(inplace_calls):
    model, fc = _pair(lambda: Net(IdBlock, IdBlock, skip=True))
    x = torch.randn(2, 3, 12, 12)
    y, n = _steady(fc, x, inplace_calls)
    assert n == 1 and _close(y, _ref64(model, x))


def test_blocks_reading_or_returning_their_input_are_not_marked(inplace_calls):
    # (ReadsAfter's output is not a fused call's result either: the block after it is not marked.)
    for blocks, count in (((IdBlock, ReadsAfter, IdBlock), 0), ((IdBlock, ReturnsInput), 0)):
        model, fc = _pair(lambda: Net(*blocks))
        x = torch.randn(2, 3, 12, 12)
        y, n = _steady(fc, x, inplace_calls)
        assert n == count and _close(y, _ref64(model, x)), blocks


def test_sequential_subclasses_are_left_alone(inplace_calls):
    class Keeps(nn.Sequential):  # its own forward keeps every child's output
        def forward(self, x):
            outs = []
            for m in self:
                x = m(x)
                outs.append(x)
            return x, outs

    class Stage(nn.Sequential):  # nn.Sequential's forward, but a class of its own: not replaced either
        pass

    for cls, count in ((Keeps, 0), (Stage, 0)):
        torch.manual_seed(0)
        model = Net(IdBlock, IdBlock)
        model.stage = cls(*model.stage)
        model = randomize_bn(model.eval(), 0)
        fc = fusedconv.convert(copy.deepcopy(model), flatten=False)
        assert type(fc.stage) is cls
        x = torch.randn(2, 3, 12, 12)
        y, n = _steady(fc, x, inplace_calls)
        assert n == count and _close(y, _ref64(model, x))


def test_intermediate_layer_getter_and_timm_features(inplace_calls):
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models._utils import IntermediateLayerGetter
    layers = {"layer1": "a", "layer2": "b", "layer3": "c", "layer4": "d"}
    model, fc = _pair(lambda: IntermediateLayerGetter(torchvision.models.resnet18(weights=None), layers))
    x = torch.randn(1, 3, 64, 64)
    y, n = _steady(fc, x, inplace_calls)
    assert n == 7 and _close(y, _ref64(model, x))
    timm = pytest.importorskip("timm")
    model, fc = _pair(lambda: timm.create_model("resnet18", features_only=True, pretrained=False))
    y, n = _steady(fc, x, inplace_calls)
    assert n > 3 and _close(y, _ref64(model, x))


def test_smp_unet_encoder_features_stay_intact(inplace_calls):
    smp = pytest.importorskip("segmentation_models_pytorch")
    model, fc = _pair(lambda: smp.Unet("resnet18", encoder_weights=None, classes=2))
    # channels_last input: the layout boundary does not check (and switch) NCHW input while hooks are inside
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    kept, kept64 = [], []
    fc.encoder.register_forward_hook(lambda m, i, o: kept.append(list(o)))
    model.encoder.register_forward_hook(lambda m, i, o: kept64.append(list(o)))
    y, n = _steady(fc, x, inplace_calls)
    ref = _ref64(model, x)
    assert n == 7 and max_rel_error(y, ref) < TOL
    assert _close(kept[-1], kept64[-1])


def test_save_load_and_deepcopy_keep_the_route(inplace_calls, tmp_path):
    model, fc = _pair(lambda: Net(IdBlock, IdBlock, IdBlock))
    torch.save(fc, tmp_path / "m.pt")
    x = torch.randn(2, 3, 12, 12)
    ref = _ref64(model, x)
    for other in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(fc)):
        assert type(other.stage) is OwnedInputSequential
        y, n = _steady(other, x, inplace_calls)
        assert n == 2 and max_rel_error(y, ref) < TOL
    sd = fusedconv.convert(copy.deepcopy(model)).state_dict()
    loaded = copy.deepcopy(fc)
    loaded.load_state_dict(sd)
    assert loaded.state_dict().keys() == sd.keys()


def test_grad_mode_and_tracing_take_the_plain_path(inplace_calls):
    model, fc = _pair(lambda: Net(IdBlock, IdBlock, IdBlock))
    x = torch.randn(2, 3, 12, 12)
    ref = _ref64(model, x)
    for _ in range(2):
        inplace_calls.clear()
        y = fc(x)  # grad mode on
    assert not inplace_calls and max_rel_error(y, ref) < TOL
    with torch.no_grad():
        traced = torch.jit.trace(fc, (x,), check_trace=False)
        assert max_rel_error(traced(x), ref) < TOL
        # fx tracing the Sequential itself (its blocks as leaves) records nn.Sequential's plain loop.
        stage = fc.stage
        tracer = type("BlocksAsLeaves", (torch.fx.Tracer,), {"is_leaf_module": lambda self, m, q: m is not stage})
        gm = torch.fx.GraphModule(stage, tracer().trace(stage))
        s = fc.stem(x).contiguous(memory_format=CL)
        inplace_calls.clear()
        assert max_rel_error(gm(s.clone()), _ref64(model.stage, s)) < TOL and not inplace_calls
        # torch.compile (dynamo only: the eager backend) traces the plain loop and standard ops.
        compiled = torch.compile(copy.deepcopy(fc.stage), backend="eager")
        assert max_rel_error(compiled(s.clone()), _ref64(model.stage, s)) < TOL and not inplace_calls


def test_the_mark_never_reaches_another_call(inplace_calls):
    """An exception half-way through the Sequential, then direct calls (also from another thread while the
    Sequential runs): no direct call ever writes into its input."""
    model, fc = _pair(lambda: Net(IdBlock, IdBlock, IdBlock))
    s = torch.randn(2, 8, 12, 12).contiguous(memory_format=CL)

    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    stage = copy.deepcopy(fc.stage)
    stage.insert(2, Boom())
    with torch.no_grad(), pytest.raises(ValueError, match="boom"):
        stage(s.clone())
    errors = []

    def direct():
        with torch.no_grad():
            for _ in range(20):
                t = s.clone()
                fc.stage[1](t)
                if not torch.equal(t, s):
                    errors.append("input changed")

    worker = threading.Thread(target=direct)
    worker.start()
    with torch.no_grad():
        for _ in range(20):
            fc.stage(s.clone())
    worker.join()
    assert not errors
    t = s.clone()
    with torch.no_grad():
        y = fc.stage[2](t)
    assert torch.equal(t, s) and max_rel_error(y, _ref64(model.stage[2], s)) < TOL
    assert inplace_calls  # the Sequential itself did take the route meanwhile


@pytest.mark.parametrize("conv,arg", [("conv1", 0), ("conv2", 1)])
def test_hooks_on_a_block_s_own_convs_keep_seeing_its_input(conv, arg, inplace_calls):
    """A hook on the conv reading the block input (conv1) or on the fused conv taking it as its residual (conv2,
    argument 1) sees the input as the caller passed it: that block writes nothing in place."""
    torchvision = pytest.importorskip("torchvision")
    model, fc = _pair(lambda: torchvision.models.resnet18(weights=None))
    # channels_last input: the layout boundary does not check (and switch) NCHW input while hooks are inside
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    kept, kept64 = [], []
    getattr(fc.layer1[1], conv).register_forward_hook(lambda m, i, o: kept.append(i[arg]))
    model.layer1[1].register_forward_pre_hook(lambda m, i: kept64.append(i[0]))
    y, n = _steady(fc, x, inplace_calls)
    ref = _ref64(model, x)
    assert n == 6 and max_rel_error(y, ref) < TOL and max_rel_error(kept[-1], kept64[-1]) < TOL
