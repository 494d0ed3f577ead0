"""The backward formula of `fusedconv::conv_bn_act`: gradients for x, weight, scale, shift and the residual.

The fused modules never need it: a call that autograd must record takes their differentiable standard-op path
(FusedConv2d's routing test `ops.grad_needed`). A graph that holds the op itself does: the ExportedProgram from
`convert_exported` run in grad mode, and `torch.compile` of it, whose AOTAutograd traces a backward for every op
whose inputs require grad (parameters do) even when the caller never calls backward — without a formula that
compile failed. The formula recomputes the conv (the op saves only its inputs) and follows the forward's own
arithmetic: y = act(z), z = conv(x, weight) * scale + shift (+ residual) in the epilogue dtype (float32, float64 for
float64 input), so dz = dy * act'(z); the residual's gradient is dz, shift's the sum of dz over batch and space,
scale's the sum of dz * conv, and x's and weight's the conv's backward of dz * scale (aten convolution_backward).
"""

from __future__ import annotations

import torch

_VIEW = (1, -1, 1, 1)


def activation_backward(grad: torch.Tensor, z: torch.Tensor, name: str, param: float) -> torch.Tensor:
    """dy/dz * grad for y = act(z), with aten's own backward of each epilogue activation (its subgradient at
    kinks included: relu's and relu6's derivative is 0 at the threshold, as PyTorch's)."""
    aten = torch.ops.aten
    if name == "identity":
        return grad
    if name == "relu":
        return aten.threshold_backward(grad, z, 0.0)
    if name == "relu6":
        return aten.hardtanh_backward(grad, z, 0.0, 6.0)
    if name == "leaky_relu":
        return aten.leaky_relu_backward(grad, z, param, False)
    if name == "silu":
        return aten.silu_backward(grad, z)
    if name == "hardswish":
        return aten.hardswish_backward(grad, z)
    if name == "gelu":
        return aten.gelu_backward(grad, z, approximate="none")
    if name == "gelu_tanh":
        return aten.gelu_backward(grad, z, approximate="tanh")
    raise ValueError(f"activation: no backward for {name!r}")


def setup_context(ctx, inputs, output) -> None:
    x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, act_param = inputs
    ctx.save_for_backward(x, weight, scale, shift, residual)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
    ctx.act = (activation, act_param)


def backward(ctx, grad: torch.Tensor):
    x, weight, scale, shift, residual = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    need = ctx.needs_input_grad
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    conv = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    conv_acc = conv.to(acc)
    z = conv_acc * scale.to(acc).view(_VIEW) + shift.to(acc).view(_VIEW)
    if residual is not None:
        z = z + residual.to(acc)
    dz = activation_backward(grad.to(acc), z, *ctx.act)
    gx = gw = gscale = gshift = gres = None
    if need[4]:
        gres = dz.to(residual.dtype)
    if need[3]:
        gshift = dz.sum((0, 2, 3)).to(shift.dtype)
    if need[2]:
        gscale = (dz * conv_acc).sum((0, 2, 3)).to(scale.dtype)
    if need[0] or need[1]:
        dconv = (dz * scale.to(acc).view(_VIEW)).to(conv.dtype)
        gx, gw, _ = torch.ops.aten.convolution_backward(dconv, x, weight, None, stride, padding, dilation, False,
                                                        [0, 0], groups, [need[0], need[1], False])
    return gx, gw, gscale, gshift, gres, None, None, None, None, None, None


def register(op) -> None:
    """Register the formula on the op (a torch.library custom_op / triton_op definition)."""
    op.register_autograd(backward, setup_context=setup_context)
