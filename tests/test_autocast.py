"""Converted models inside torch.autocast (fusedconv/autocast.py): the same output dtype as the original model in
the same region, and an error against the float64 model at most twice the original's own (on CPU, bf16 and fp16;
on CUDA the `gpu` tests, which the GPU check runs, with the Triton op; without a GPU the op's routing is checked
with a stand-in)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import fusedconv
from fusedconv import cpu_boundary, ops
from fusedconv.modules import FusedConv2d
from tests.util import max_rel_error, randomize_bn

DTYPES = (torch.bfloat16, torch.float16)


class _Block(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, + x, ReLU (a residual the fused epilogue takes)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _net2d(c: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), _Block(c), _Block(c),
                         nn.Conv2d(c, 1, 3, padding=1))


def _layer_net(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """Two fused layers of one kind in a row (the second sees the region's dtype as its input)."""
    if kind == "conv1d":
        layers = [nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.SiLU(),
                  nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU()]
        return nn.Sequential(*layers), torch.randn(2, 3, 16)
    if kind == "conv3d":
        layers = [nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                  nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU()]
        return nn.Sequential(*layers), torch.randn(1, 3, 5, 6, 6)
    if kind == "conv_transpose2d":
        layers = [nn.ConvTranspose2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                  nn.ConvTranspose2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU()]
        return nn.Sequential(*layers), torch.randn(1, 3, 8, 8)
    if kind == "linear":
        layers = [nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), nn.GELU(),
                  nn.Linear(8, 4), nn.BatchNorm1d(4)]
        return nn.Sequential(*layers), torch.randn(5, 6)
    if kind == "post_bn":  # ConvMixer's conv -> GELU -> BN
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.BatchNorm2d(8),
                  nn.Conv2d(8, 8, 1), nn.GELU(), nn.BatchNorm2d(8)]
        return nn.Sequential(*layers), torch.randn(1, 3, 8, 8)
    raise ValueError(kind)


def _check_region(model: nn.Module, converted: nn.Module, x: torch.Tensor, dtype: torch.dtype, calls: int = 3):
    """Original and converted in the same autocast region (x's device type): same output dtype, and the converted
    error against the float64 model at most twice the original's (plus one unit in the dtype's last place at the
    output's largest value)."""
    ref = copy.deepcopy(model).double()(x.double())
    with torch.autocast(x.device.type, dtype=dtype):
        want = model(x)
        for _ in range(calls):  # later calls take the routes and caches the first ones set up
            got = converted(x)
            assert got.dtype == want.dtype == dtype
            assert max_rel_error(got, ref) <= 2 * max_rel_error(want, ref) + torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_conv2d_blocks_in_an_autocast_region(dtype):
    model = randomize_bn(_net2d().eval(), 1, example=torch.randn(2, 3, 56, 56))
    converted = fusedconv.convert(model)
    assert sum(isinstance(m, FusedConv2d) for m in converted.modules()) == 6
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        _check_region(model, converted, x, dtype)
        # channels_last input (the oneDNN route outside a region) too
        _check_region(model, converted, x.contiguous(memory_format=torch.channels_last), dtype)


@pytest.mark.parametrize("kind", ("conv1d", "conv3d", "conv_transpose2d", "linear", "post_bn"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_fused_layers_in_an_autocast_region(kind, dtype):
    model, x = _layer_net(kind)
    model = randomize_bn(model.eval(), 2, example=torch.cat([x, x.flip(0)]))
    converted = fusedconv.convert(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    with torch.no_grad():
        _check_region(model, converted, x, dtype)


@pytest.mark.parametrize("freeze", (False, True))
def test_resnet18_flat_and_frozen_in_an_autocast_region_and_after_it(freeze):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None).eval(), 3, example=torch.randn(2, 3, 64, 64))
    converted = fusedconv.convert(model, freeze=freeze)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want32 = model(x)
        for _ in range(2):  # the flat forward's direct calls take over from the second call outside a region
            assert max_rel_error(converted(x), want32) < 1e-5
        _check_region(model, converted, x, torch.bfloat16)
        # Leaving the region: float32 again, through the same routes as before it.
        out = converted(x)
        assert out.dtype == torch.float32 and max_rel_error(out, want32) < 1e-5


def test_flat_forward_direct_calls_step_aside_in_a_region(onednn_small_convs, module_calls):
    # Outside a region the flat forward calls the oneDNN op of each fused layer directly (float32, not autocast
    # aware); inside one every fused layer must go through its module, which computes in the region's dtype.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _Block(8))
    model = randomize_bn(model.eval(), 9, example=torch.randn(2, 3, 16, 16))
    converted = fusedconv.convert(model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        converted(x)
        module_calls[0] = 0
        assert max_rel_error(converted(x), model(x)) < 1e-5
        assert module_calls[0] == 0  # all three direct
        _check_region(model, converted, x, torch.bfloat16, calls=2)
        assert module_calls[0] == 6


def test_layout_boundary_decides_nothing_inside_a_region():
    # The first call with a signature decides the CPU layout boundary's switch for it (fusedconv/cpu_boundary.py);
    # inside a region no fused layer takes oneDNN, so a decision made there would keep later float32 calls NCHW.
    torch.manual_seed(1)
    model = randomize_bn(torchvision.models.resnet18(weights=None).eval(), 4, example=torch.randn(2, 3, 64, 64))
    converted = fusedconv.convert(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _check_region(model, converted, x, torch.bfloat16, calls=1)
        assert converted.__dict__[cpu_boundary.ATTRIBUTE].checked == {}
        assert cpu_boundary.layout_used(converted, x) == "channels_last"
        assert max_rel_error(converted(x), model(x)) < 1e-5


def _tiny_scale_net(kind: str) -> tuple[nn.Module, torch.Tensor]:
    layer, bn, x = {
        "conv2d": (nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), torch.rand(1, 4, 8, 8)),
        "conv1d": (nn.Conv1d(4, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4), torch.rand(2, 4, 8)),
        "conv_transpose2d": (nn.ConvTranspose2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), torch.rand(1, 4, 6, 6)),
        "linear": (nn.Linear(36, 4, bias=False), nn.BatchNorm1d(4), torch.rand(3, 36)),
    }[kind]
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.0)
        bn.running_var.fill_(1e12)  # scale = 1 / sqrt(1e12) = 1e-6
        bn.weight.fill_(1.0)
        bn.running_mean.zero_()
        bn.bias.zero_()
    return nn.Sequential(layer, bn).eval(), x * 10


@pytest.mark.parametrize("kind", ("conv2d", "conv1d", "conv_transpose2d", "linear"))
def test_fp16_region_keeps_a_scale_fp16_cannot_fold(kind):
    # A BN scale of 1e-6 folded into weights of ~0.75 puts them among fp16's subnormals (a dozen steps of 6e-8:
    # precision lost), while the layer's output (~100) times the scale stays a normal fp16 number: the original
    # applies the scale to the fp16 layer output in fp32, and so must the fused layer (not fold).
    model, x = _tiny_scale_net(kind)
    fused = fusedconv.convert(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    with torch.no_grad():
        _check_region(model, fused, x, torch.float16)


def test_edits_between_autocast_calls_are_seen():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval(), 4)
    fused = fusedconv.convert(model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        _check_region(model, fused, x, torch.bfloat16)
        model[0].weight.mul_(-1.5)
        fused[0].weight.mul_(-1.5)
        _check_region(model, fused, x, torch.bfloat16)
        model[1].running_mean.add_(0.5)
        fused[0].load_state_dict({**fused[0].state_dict(),
                                  **fusedconv.convert(copy.deepcopy(model))[0].state_dict()})
        _check_region(model, fused, x, torch.bfloat16)
        new = torch.randn_like(model[0].weight)
        model[0].weight.data = new.clone()
        fused[0].weight.data = new.clone()  # keeps the version counter, moves the data pointer
        _check_region(model, fused, x, torch.bfloat16)


def test_module_built_in_inference_mode_in_an_autocast_region():
    # Inference tensors have no version counter: nothing is cached for them, every call casts and folds anew.
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval(), 11)
    with torch.inference_mode():
        fused = fusedconv.convert(model)
        x = torch.randn(1, 3, 16, 16)
        _check_region(model, fused, x, torch.bfloat16)
        assert fused[0]._autocast_cache is None


def test_float64_is_left_alone_by_autocast():
    model = randomize_bn(_net2d().eval().double(), 5)
    converted = fusedconv.convert(model)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = converted(x)
        assert out.dtype == torch.float64
        assert max_rel_error(out, model(x)) < 1e-12


def test_gradient_reaches_the_weight_in_an_autocast_region():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)).eval(), 6)
    fused = fusedconv.convert(model)
    for p in fused.parameters():
        p.requires_grad_(True)
    x = torch.randn(1, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), fused(x)
    assert got.dtype == want.dtype == torch.bfloat16
    want.float().square().sum().backward()
    got.float().square().sum().backward()
    # The fused weight is the conv's (the scale is applied outside it): the same gradient, up to bf16 rounding.
    second = [m for m in fused.modules() if isinstance(m, FusedConv2d)][1]
    g_orig, g_fused = model[3].weight.grad, second.weight.grad
    assert g_fused is not None and max_rel_error(g_fused, g_orig) < 0.1


def test_cuda_region_hands_the_op_the_region_dtype(monkeypatch):
    # On CUDA FusedConv2d calls the Triton op: inside a region it must get input, residual and weight in the
    # region's dtype (scale / shift in fp32) and return that dtype. Here the routing answers True on CPU and the
    # op is a recording stand-in (no GPU in CI).
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval(), 7)
    fused = fusedconv.convert(model, flatten=False)[0]
    seen = []

    def op(x, weight, scale, shift, residual, *args):
        seen.append((x.dtype, weight.dtype, scale.dtype, shift.dtype, None if residual is None else residual.dtype))
        return torch.zeros(1, 8, 10, 10, dtype=x.dtype)

    monkeypatch.setattr(ops, "use_kernel", lambda x, w: x.dtype == w.dtype)
    monkeypatch.setattr(ops, "conv_bn_act", op)
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert fused(x).dtype == torch.float16
    assert seen == [(torch.float16, torch.float16, torch.float32, torch.float32, None)]


def test_torch_compile_in_an_autocast_region():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval(), 8)
    compiled = torch.compile(fusedconv.convert(model), backend="eager", fullgraph=True)
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        _check_region(model, compiled, x, torch.bfloat16, calls=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_cuda_region_runs_the_op_in_the_region_dtype(dtype, monkeypatch):
    model = randomize_bn(_net2d(16).eval(), 10, example=torch.randn(2, 3, 32, 32)).cuda()
    converted = fusedconv.convert(model)
    calls, real = [], ops.conv_bn_act

    def counting(x, weight, *args):
        calls.append((x.dtype, weight.dtype))
        return real(x, weight, *args)

    monkeypatch.setattr(ops, "conv_bn_act", counting)
    x = torch.randn(1, 3, 32, 32, device="cuda")
    with torch.no_grad():
        _check_region(model, converted, x, dtype)
        _check_region(model, converted, x.contiguous(memory_format=torch.channels_last), dtype)
    # five fused convs per call (the one-channel head keeps cuDNN), all in the region's dtype
    assert len(calls) == 5 * 6 and set(calls) == {(dtype, dtype)}
