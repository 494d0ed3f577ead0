"""A converted model composes with the PyTorch toolchain: torch.compile(fullgraph=True), torch.export, ONNX
export + onnxruntime, deepcopy, state_dict save/load (weights_only=True), .half(), channels_last."""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_convert_helpers import check_convert  # noqa: E402
from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import FusedConv2d  # noqa: E402

torchvision = pytest.importorskip("torchvision")


def _x(size=32, seed=0):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny_resnet(seed=0):
    """Stem + one BasicBlock with a downsample + head: every pattern of a ResNet, small enough to compile."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(seed)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          BasicBlock(8, 16, stride=2, downsample=down),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return randomize_bn(model, seed).eval()


@pytest.fixture(scope="module")
def resnet18_pair():
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10), seed=11).eval()
    converted = fusedconv.convert(model)
    with torch.no_grad():
        converted(_x())  # compute the fallback's folded weights once (as a deployment warm-up would)
    return model, converted


@torch.no_grad()
def test_torch_compile_fullgraph():
    model = _tiny_resnet()
    converted, report = check_convert(model, _x(16))
    assert any("add" in r.detail for r in report.fused)
    compiled = torch.compile(converted, fullgraph=True)
    assert max_rel_error(compiled(_x(16, seed=1)), model(_x(16, seed=1))) < 1e-5


@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("arch", ["tiny_resnet", "mobilenet_v2", "efficientnet_b0"])
@torch.no_grad()
def test_torch_compile_compiles_once(arch, freeze):
    # Nothing the converted model's forward runs under Dynamo may change Python state that Dynamo guards on (a
    # call counter did: every later call missed its guard and compiled the model again). mobilenet_v2 takes its
    # blocks' guard tables' fallback while traced, timm's efficientnet_b0 the whole-model flat table's.
    if arch == "tiny_resnet":
        model = _tiny_resnet()
    elif arch == "mobilenet_v2":
        model = randomize_bn(torchvision.models.mobilenet_v2(weights=None), 3).eval()
    else:
        timm = pytest.importorskip("timm")
        model = randomize_bn(timm.create_model("efficientnet_b0", pretrained=False), 3).eval()
    x = _x(32)
    converted = fusedconv.convert(model, freeze=freeze)
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend="eager")
    compiled(x)
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed in (1, 2):
            assert max_rel_error(compiled(_x(32, seed=seed)), model(_x(32, seed=seed))) < 1e-5


class _Config:
    GAIN = 2.0


class _ScaledBlock(nn.Module):
    """Conv -> BN -> ReLU, then a method of its own class that reads a class used as a namespace and a class-level
    value through the instance: the block's guard checks all three (the method is the same object, `_Config.GAIN`
    still 2.0, `offset` still 0.5 and not set on the instance)."""

    offset = 0.5

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def scale(self, x):
        return x * _Config.GAIN + self.offset

    def forward(self, x):
        return self.scale(torch.relu(self.bn(self.conv(x))))


class _CachingNet(nn.Module):
    """Writes to a dict in its forward before calling the block (as timm's attention layers fill their bias cache)."""

    def __init__(self):
        super().__init__()
        self.cache = {}
        self.block = _ScaledBlock()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        self.cache[x.device.type] = x.shape[0]
        return self.head(self.block(x))


@pytest.mark.parametrize("flatten", [True, False])
@torch.no_grad()
def test_torch_compile_fullgraph_after_a_dict_write_and_class_edits_are_seen(flatten):
    # Dynamo refuses to read a class's __dict__ (a mappingproxy) once the traced code wrote to any dict; the block
    # guard's class terms read it another way while compiling (model_code.ClassNamespace), and Dynamo's own guards
    # on what they read make an edit of the class compile again rather than run stale code.
    model = randomize_bn(_CachingNet(), 4).eval()
    converted = fusedconv.convert(model, flatten=flatten)
    assert any(isinstance(m, FusedConv2d) for m in converted.modules())
    torch._dynamo.reset()
    compiled = torch.compile(converted, fullgraph=True, backend="eager")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert max_rel_error(compiled(x), model(x)) < 1e-5
    original_scale = _ScaledBlock.scale
    try:
        _Config.GAIN = 3.0
        assert max_rel_error(compiled(x), model(x)) < 1e-5
        _ScaledBlock.offset = 1.5
        assert max_rel_error(compiled(x), model(x)) < 1e-5
        _ScaledBlock.scale = lambda self, t: t - 1.0
        assert max_rel_error(compiled(x), model(x)) < 1e-5
    finally:
        _Config.GAIN = 2.0
        _ScaledBlock.offset = 0.5
        _ScaledBlock.scale = original_scale
    assert max_rel_error(compiled(x), model(x)) < 1e-5


@torch.no_grad()
def test_torch_export(resnet18_pair):
    model, converted = resnet18_pair
    ep = torch.export.export(converted, (_x(),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets), targets
    assert max_rel_error(ep.module()(_x(seed=2)), model(_x(seed=2))) < 1e-5


def test_onnx_export_no_batchnorm_matches_onnxruntime(resnet18_pair):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, converted = resnet18_pair
    x = _x()
    buf = io.BytesIO()
    program = torch.onnx.export(converted, (x,), dynamo=True, verbose=False)
    program.save(buf)
    proto = onnx.load_from_string(buf.getvalue())
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops, ops
    assert "Conv" in ops and "Relu" in ops and "Add" in ops
    # FusedConv2d's traced path folds the BN scale into the weight in the graph (weight * scale): such a Mul
    # only reads initializers (constant, folded by onnxruntime at load); none may touch activations.
    constants = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Mul":
            assert all(i in constants for i in node.input), f"Mul on activations: {node.input}"
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert max_rel_error(torch.from_numpy(out), ref) < 1e-4


@torch.no_grad()
def test_deepcopy_and_state_dict_round_trip(resnet18_pair):
    model, converted = resnet18_pair
    x = _x(seed=3)
    ref = model(x)
    clone = copy.deepcopy(converted)
    assert max_rel_error(clone(x), ref) < 1e-5
    buf = io.BytesIO()
    torch.save(converted.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert not any("running_mean" in k for k in state)
    # Load into a freshly converted copy of an untrained model of the same architecture.
    fresh = fusedconv.convert(torchvision.models.resnet18(weights=None, num_classes=10).eval())
    fresh.load_state_dict(state)
    assert max_rel_error(fresh(x), ref) < 1e-5


@torch.no_grad()
def test_channels_last_and_dtypes():
    model = _tiny_resnet(seed=1)
    converted = fusedconv.convert(model)
    x = _x(16, seed=4)
    ref = model(x)
    cl = copy.deepcopy(converted).to(memory_format=torch.channels_last)
    assert max_rel_error(cl(x.to(memory_format=torch.channels_last)), ref) < 1e-5
    # .double() of a model converted in fp32 keeps the fp32-rounded scale / shift: fp32-level agreement.
    dbl = copy.deepcopy(converted).double()
    assert max_rel_error(dbl(x.double()), copy.deepcopy(model).double()(x.double())) < 1e-6
    half = copy.deepcopy(converted).half()
    assert all(m.scale.dtype == torch.float32 for m in half.modules() if isinstance(m, FusedConv2d))
    try:
        out = half(x.half())
    except RuntimeError as e:  # some CPU builds lack fp16 convolution
        pytest.skip(f"fp16 conv unavailable on this CPU: {e}")
    assert out.dtype == torch.float16 and max_rel_error(out.float(), ref) < 1e-2
