"""Fused modules under autograd: every tensor that requires grad gets its exact gradient, never silently none.

The fused modules are built with requires_grad=False (inference), but a user may turn it on (fine-tuning,
saliency w.r.t. weights). Checked in float64: `torch.autograd.gradcheck` of every fused layer kind w.r.t. x,
weight, scale, shift, residual (and the post-affine, FusedLinear's bias); a converted torchvision resnet18
against the original model, the BN gradients mapped through the fold; the CUDA routing (the Triton op has no
backward) with the op patched in on CPU, and for real in a gpu-marked test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedconv import FusedConv2d, ops, ops_nd
from fusedconv.activations import ActivationSpec
from fusedconv.fused_layers import FusedConv1d, FusedConv3d
from fusedconv.fused_linear import FusedLinear
from fusedconv.fused_transpose import FusedConvTranspose2d
from fusedconv.kernels.reference import apply_activation

CL = torch.channels_last
F64 = torch.float64


def _requiring_grad(module: nn.Module) -> list[torch.Tensor]:
    """The module's weight and every per-channel vector (buffers included), switched to requires_grad."""
    tensors = [t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()]
    for t in tensors:
        t.requires_grad_(True)
    return tensors


def _fused_conv2d(groups: int, act: str, param: float = 0.0, cout: int = 4, cin: int = 4) -> FusedConv2d:
    g = torch.Generator().manual_seed(groups * 7 + len(act))
    weight = torch.randn(cout, cin // groups, 3, 3, generator=g, dtype=F64)
    scale = torch.rand(cout, generator=g, dtype=F64) + 0.5
    shift = torch.randn(cout, generator=g, dtype=F64)
    return FusedConv2d(weight, scale, shift, padding=1, groups=groups, activation=ActivationSpec(act, param))


# ------------------------------------------------------------------------------------------------ FusedConv2d
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("act", [("silu", 0.0), ("leaky_relu", -0.3)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_conv2d_gradcheck(with_residual, act, layout, groups):
    """Gradients w.r.t. x, weight, scale, shift (and residual) of FusedConv2d, as the user gets them after
    `p.requires_grad_(True)` on the module's own tensors."""
    module = _fused_conv2d(groups, *act)
    weight, scale, shift = _requiring_grad(module)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_(True)
    inputs = [x, weight, scale, shift]
    if with_residual:
        residual = torch.randn(2, 4, 5, 5, dtype=F64, requires_grad=True)
        inputs.append(residual)
        fn = lambda x, w, s, b, r: module(x, r)  # noqa: E731 (w, s, b are the module's own tensors)
    else:
        fn = lambda x, w, s, b: module(x)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-6)
    # Same call twice (the eager CPU path remembers the last call's route): gradients reach every tensor.
    for _ in range(2):
        for t in inputs:
            t.grad = None
        fn(*inputs).square().sum().backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_conv2d_gradcheck_weights_only(with_residual, layout):
    """Neither x nor the residual requires grad, only the module's tensors (fine-tuning a first layer, saliency
    w.r.t. weights): the CPU fast path's cached fold must not be taken."""
    module = _fused_conv2d(1, "relu6")
    tensors = tuple(_requiring_grad(module))
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    x = x.contiguous(memory_format=CL) if layout == "channels_last" else x
    residual = torch.randn(2, 4, 5, 5, dtype=F64) if with_residual else None
    assert torch.autograd.gradcheck(lambda w, s, b: module(x, residual), tensors, eps=1e-6, atol=1e-7, rtol=1e-6)


def _reference_conv2d(x, weight, scale, shift, residual, module: FusedConv2d):
    """The same function from nn.functional ops and the module's own tensors: act(conv(x, w) * s + b [+ r])."""
    y = F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    y = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return apply_activation(y, module.act.name, module.act.param)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_conv2d_gradients_equal_functional_reference(layout):
    """dL/dx, dL/dweight, dL/dscale, dL/dshift, dL/dresidual equal those of the nn.functional reference."""
    module = _fused_conv2d(1, "relu")
    tensors = _requiring_grad(module)
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    x = (x.contiguous(memory_format=CL) if layout == "channels_last" else x).requires_grad_(True)
    residual = torch.randn(2, 4, 6, 6, dtype=F64, requires_grad=True)
    upstream = torch.randn(2, 4, 6, 6, dtype=F64)
    inputs = [x, residual, *tensors]
    got = torch.autograd.grad((module(x, residual) * upstream).sum(), inputs)
    want = torch.autograd.grad((_reference_conv2d(x, *tensors, residual, module) * upstream).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_bfloat16_gradients_follow_the_float64_reference():
    """Half precision applies scale / shift to the conv output in fp32 (no fold): gradients reach every tensor
    and agree with the float64 reference to bfloat16 precision."""
    module = _fused_conv2d(1, "silu").to(torch.bfloat16)
    tensors = _requiring_grad(module)
    x = torch.randn(1, 4, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(1, 4, 6, 6, dtype=F64)
    inputs = [x, *tensors]
    got = torch.autograd.grad((module(x).double() * upstream).sum(), inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = _reference_conv2d(ref_inputs[0], *ref_inputs[1:], None, module)
    want = torch.autograd.grad((ref * upstream).sum(), ref_inputs)
    for g, w in zip(got, want):
        rel = float((g.double() - w).norm() / w.norm())
        assert rel < 3e-2, rel


def test_no_grad_and_plain_calls_keep_the_cached_route():
    """Under no_grad (or when nothing requires grad) the eager CPU path keeps its cached, non-autograd route even
    when the module's tensors require grad; a grad-mode call then takes the general path (and gets gradients)."""
    module = _fused_conv2d(1, "relu")
    weight, _, _ = _requiring_grad(module)
    x = torch.randn(1, 4, 6, 6, dtype=F64)
    with torch.no_grad():
        y_no_grad = module(x)
    assert module._cpu_state.last_route == "folded"
    assert not y_no_grad.requires_grad
    y = module(x)
    assert module._cpu_state.last_route == "generic" and y.requires_grad
    torch.testing.assert_close(y, y_no_grad, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert weight.grad is not None
    weight.requires_grad_(False)
    module.scale.requires_grad_(False)
    module.shift.requires_grad_(False)
    assert not module(x).requires_grad
    assert module._cpu_state.last_route == "folded"


def test_private_residual_is_never_written_when_a_gradient_is_needed():
    """The in-place residual route (convert's private residual) is refused once the weight requires grad: the
    residual keeps its values and the weight gets its gradient."""
    module = _fused_conv2d(1, "relu").float()
    module.weight.requires_grad_(True)
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=CL)
    residual = torch.randn(1, 4, 6, 6).contiguous(memory_format=CL)
    before = residual.clone()
    y = module(x, residual, residual_private=True)
    assert y.data_ptr() != residual.data_ptr()
    assert torch.equal(residual, before)
    y.sum().backward()
    assert module.weight.grad is not None


# ------------------------------------------------------------------------------------------------ the other layers
def _gradcheck_module(module, x, residual=None):
    tensors = _requiring_grad(module)
    inputs = [x.requires_grad_(True)] + ([residual.requires_grad_(True)] if residual is not None else []) + tensors
    if residual is None:
        fn = lambda x, *rest: module(x)  # noqa: E731 (rest are the module's own tensors)
    else:
        fn = lambda x, r, *rest: module(x, r)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-6)
    out = fn(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    assert all(gr.abs().sum() > 0 for gr in grads)


def _vec(n, seed, lo=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=F64) + lo


def test_fused_conv1d_gradcheck():
    weight = torch.randn(4, 2, 3, dtype=F64)
    module = FusedConv1d(weight, _vec(4, 1), _vec(4, 2, -1.0), padding=1, groups=2, activation="gelu",
                         post_scale=_vec(4, 3), post_shift=_vec(4, 4, -1.0))
    _gradcheck_module(module, torch.randn(2, 4, 6, dtype=F64), torch.randn(2, 4, 6, dtype=F64))


def test_fused_conv3d_gradcheck():
    weight = torch.randn(3, 2, 2, 2, 2, dtype=F64)
    module = FusedConv3d(weight, _vec(3, 5), _vec(3, 6, -1.0), padding=1, activation="hardswish")
    _gradcheck_module(module, torch.randn(1, 2, 3, 3, 3, dtype=F64), torch.randn(1, 3, 4, 4, 4, dtype=F64))


def test_fused_conv_transpose2d_gradcheck():
    weight = torch.randn(4, 3, 3, 3, dtype=F64)  # (Cin, Cout/groups, k, k), groups 2 -> 6 output channels
    module = FusedConvTranspose2d(weight, _vec(6, 7), _vec(6, 8, -1.0), stride=2, padding=1, groups=2,
                                  activation=ActivationSpec("leaky_relu", 0.2))
    _gradcheck_module(module, torch.randn(1, 4, 3, 3, dtype=F64), torch.randn(1, 6, 5, 5, dtype=F64))


@pytest.mark.parametrize("rank", [2, 3])
def test_fused_linear_gradcheck(rank):
    """2-D input (BN folded into the weight) and 3-D input (BN on dim 1 of the output), with bias and post-BN."""
    channels = 5 if rank == 2 else 3
    module = FusedLinear(torch.randn(5, 4, dtype=F64), torch.randn(5, dtype=F64), _vec(channels, 9),
                         _vec(channels, 10, -1.0), activation="silu", post_scale=_vec(channels, 11),
                         post_shift=_vec(channels, 12, -1.0))
    x = torch.randn(2, 4, dtype=F64) if rank == 2 else torch.randn(2, 3, 4, dtype=F64)
    _gradcheck_module(module, x)


# ------------------------------------------------------------------------------------------------ a whole model
def _conv_bn_pairs(model: nn.Module) -> dict[str, tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """Each Conv2d of a torchvision ResNet with the BatchNorm2d registered right after it (its fold partner)."""
    pairs, conv = {}, None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            conv = (name, m)
        elif isinstance(m, nn.BatchNorm2d):
            pairs[conv[0]] = (name, conv[1], m)
            conv = None
    return pairs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.slow
@pytest.mark.parametrize("layout,x_grad", [("nchw", True), ("channels_last", True), ("nchw", False)])
def test_converted_resnet18_gradients_match_the_original(layout, x_grad):
    """With every parameter and scale/shift of a converted resnet18 requiring grad, dL/dx and dL/dweight equal the
    original model's, and dL/dscale, dL/dshift mapped through the fold equal dL/dgamma, dL/dbeta (float64)."""
    torchvision = pytest.importorskip("torchvision")
    import fusedconv
    from fusedconv.model_specs import randomize_batchnorm

    original = torchvision.models.resnet18(weights=None).eval()
    randomize_batchnorm(original, seed=3)
    original = original.double()
    converted = fusedconv.convert(original)
    fused_layers = {n: m for n, m in converted.named_modules() if isinstance(m, FusedConv2d)}
    pairs = _conv_bn_pairs(original)
    assert set(fused_layers) == set(pairs) and len(fused_layers) == 20
    for p in converted.parameters():
        p.requires_grad_(True)
    for m in fused_layers.values():
        m.scale.requires_grad_(True)
        m.shift.requires_grad_(True)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 40, generator=g, dtype=F64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    upstream = torch.randn(2, 1000, generator=g, dtype=F64)
    x_fused, x_orig = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    (converted(x_fused) * upstream).sum().backward()
    (original(x_orig) * upstream).sum().backward()

    assert all(p.grad is not None for p in converted.parameters())
    if x_grad:
        assert _rel(x_fused.grad, x_orig.grad) < 1e-9
    for name in ("weight", "bias"):
        assert _rel(getattr(converted.fc, name).grad, getattr(original.fc, name).grad) < 1e-9
    for name, fused in fused_layers.items():
        _, conv, bn = pairs[name]
        # The fused weight is the conv's weight (scale applied separately): the same gradient.
        assert _rel(fused.weight.grad, conv.weight.grad) < 1e-9, name
        # scale = gamma / std, shift = beta - mean * scale: the chain rule back to gamma and beta.
        inv_std = (bn.running_var + bn.eps).rsqrt()
        assert _rel(fused.shift.grad, bn.bias.grad) < 1e-9, name
        assert _rel(fused.scale.grad * inv_std - fused.shift.grad * bn.running_mean * inv_std, bn.weight.grad) < 1e-9


# ------------------------------------------------------------------------------------------------ CUDA routing
class _OpCalls:
    """Patches the fused ops in as if on CUDA (CPU tensors run the op's own fallback) and counts their calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real_2d = ops.conv_bn_act

        def counting_2d(*args):
            self.calls += 1
            return real_2d(*args)

        def counting_3d(x, weight, scale, shift, residual, post_scale, post_shift, stride, padding, dilation,
                        groups, act, param):
            # The 3-D op has no CPU fallback: the same function in nn.functional ops stands in for it.
            self.calls += 1
            view = (1, -1, 1, 1, 1)
            y = F.conv3d(x, weight, None, stride, padding, dilation, groups) * scale.view(view) + shift.view(view)
            y = apply_activation(y if residual is None else y + residual, act, param)
            return y if post_scale is None else y * post_scale.view(view) + post_shift.view(view)

        monkeypatch.setattr(ops, "use_kernel", lambda x, w: True)
        monkeypatch.setattr(ops_nd, "use_kernel_3d", lambda x, w: True)
        monkeypatch.setattr(ops, "conv_bn_act", counting_2d)
        monkeypatch.setattr(ops_nd, "conv3d_bn_act", counting_3d)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "conv3d"])
def test_kernel_route_is_taken_only_without_a_gradient(monkeypatch, kind):
    """Where the fused op would run (CUDA), a call that needs a gradient takes the differentiable path instead
    (the op has no backward); under no_grad the op still runs, with the same output."""
    op_calls = _OpCalls(monkeypatch)
    if kind == "conv2d":
        module, x = _fused_conv2d(1, "relu").float(), torch.randn(1, 4, 5, 5)
    elif kind == "conv1d":
        module, x = FusedConv1d(torch.randn(4, 4, 3), padding=1, activation="relu"), torch.randn(1, 4, 5)
    else:
        module, x = FusedConv3d(torch.randn(4, 4, 3, 3, 3), padding=1, activation="relu"), torch.randn(1, 4, 3, 3, 3)
    module.weight.requires_grad_(True)
    with torch.no_grad():
        y_op = module(x)
    assert op_calls.calls == 1
    y = module(x)
    assert op_calls.calls == 1 and y.requires_grad
    torch.testing.assert_close(y, y_op, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    module.weight.requires_grad_(False)
    module(x.requires_grad_(True))
    assert op_calls.calls == 1  # a gradient for x alone needs the differentiable path too
    x.requires_grad_(False)
    module(x)
    assert op_calls.calls == 2  # grad mode, nothing requires grad: the op


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True])
def test_cuda_gradients_match_the_float64_reference(with_residual):
    """On CUDA (fp32, where the Triton op is the inference route) every tensor gets the reference gradient."""
    module = _fused_conv2d(1, "silu", cout=16, cin=8).float().cuda()
    tensors = _requiring_grad(module)
    x = torch.randn(2, 8, 12, 12, device="cuda").contiguous(memory_format=CL).requires_grad_(True)
    residual = torch.randn(2, 16, 12, 12, device="cuda", requires_grad=True) if with_residual else None
    upstream = torch.randn(2, 16, 12, 12, device="cuda")
    inputs = [x, *tensors] + ([residual] if with_residual else [])
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        got = torch.autograd.grad((module(x, residual) * upstream).sum(), inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_res = ref_inputs[4] if with_residual else None
    ref = _reference_conv2d(ref_inputs[0], *ref_inputs[1:4], ref_res, module)
    want = torch.autograd.grad((ref * upstream.double()).sum(), ref_inputs)
    for gr, w in zip(got, want):
        torch.testing.assert_close(gr.double(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
