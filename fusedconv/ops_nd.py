"""The `fusedconv::conv3d_bn_act` op: act(conv3d(x, w) * scale + shift [+ residual]) [* post_scale + post_shift].

Schema: conv3d_bn_act(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, Tensor? post_scale,
Tensor? post_shift, int[] stride, int[] padding, int[] dilation, int groups, str activation, float act_param)
-> Tensor, in x's dtype and memory format (channels_last_3d in -> channels_last_3d out).

CUDA tensors in fp16 / bf16 / fp32 (weight in the same dtype) run the Triton kernel `kernels.conv3d`; everything
else runs the standard-conv fallback (F.conv3d with the scale folded into the weight at fp32 / fp64, or the conv
in the input's dtype and the epilogue in fp32 for fp16 / bf16). Registered like `fusedconv::conv_bn_act`
(ops.py): `triton_op` where torch has it (torch.compile / torch.export see the kernel), else an opaque
`custom_op` with a fake implementation; FUSEDCONV_OPAQUE_OP=1 forces the latter.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fusedconv.kernels.reference import apply_activation
from fusedconv import ops_autocast
from fusedconv.ops import kernel_available

__all__ = ["OP_REGISTRATION", "conv3d_bn_act", "use_kernel_3d"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GROUPS = 65535


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def use_kernel_3d(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the 3-D Triton kernel runs for this input (CUDA, a kernel dtype, weight in the same dtype)."""
    return x.is_cuda and x.dtype in _KERNEL_DTYPES and weight.dtype == x.dtype and kernel_available()


def conv3d_reference(x, weight, scale, shift, residual, post_scale, post_shift, stride, padding, dilation, groups,
                     activation, act_param):
    """The fallback: standard conv, epilogue in fp32 (fp64 for fp64 input), one cast to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    view = (1, -1, 1, 1, 1)
    if x.dtype == acc and weight.dtype == acc:
        # Scale folded into the weight: exact to rounding at fp32 / fp64; one conv with bias does conv + BN.
        y = F.conv3d(x, weight * scale.to(acc).view(-1, 1, 1, 1, 1), shift.to(acc), stride, padding, dilation,
                     groups)
    else:
        y = F.conv3d(x, weight.to(x.dtype), None, stride, padding, dilation, groups)
        y = y.to(acc) * scale.to(acc).view(view) + shift.to(acc).view(view)
    if residual is not None:
        y = y + residual.to(acc)
    y = apply_activation(y, activation, act_param)
    if post_scale is not None:
        y = y * post_scale.to(acc).view(view) + post_shift.to(acc).view(view)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


def _impl(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
          residual: torch.Tensor | None, post_scale: torch.Tensor | None, post_shift: torch.Tensor | None,
          stride: list[int], padding: list[int], dilation: list[int], groups: int, activation: str,
          act_param: float) -> torch.Tensor:
    if (use_kernel_3d(x, weight) and groups <= _MAX_GROUPS
            and (residual is None or residual.is_floating_point())):
        from fusedconv.kernels.conv3d import conv3d_bn_act as _launch

        return _launch(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       activation=activation, act_param=act_param, residual=residual, post_scale=post_scale,
                       post_shift=post_shift)
    return conv3d_reference(x, weight, scale, shift, residual, post_scale, post_shift, stride, padding, dilation,
                            groups, activation, act_param)


def _fake(x, weight, scale, shift, residual, post_scale, post_shift, stride, padding, dilation, groups, activation,
          act_param):
    from fusedconv.kernels.conv3d import conv3d_output_shape

    shape = conv3d_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=_memory_format(x))


def _register():
    name = "fusedconv::conv3d_bn_act"
    opaque = os.environ.get("FUSEDCONV_OPAQUE_OP", "0") not in ("", "0")
    if not opaque and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
        return torch.library.triton_op(name, _impl, mutates_args=()), "triton_op"
    op = torch.library.custom_op(name, _impl, mutates_args=())
    op.register_fake(_fake)
    return op, "custom_op"


_op, OP_REGISTRATION = _register()
# Inside torch.autocast: x, weight and residual in the region's dtype, the scale / shift vectors (post-affine
# included) in float32 (ops_autocast.py).
ops_autocast.register("fusedconv::conv3d_bn_act", (0, 1, 4))


def conv3d_bn_act(x, weight, scale, shift, residual, post_scale, post_shift, stride, padding, dilation, groups,
                  activation, act_param):
    """Call the registered op (positional arguments as in its schema)."""
    return torch.ops.fusedconv.conv3d_bn_act(x, weight, scale, shift, residual, post_scale, post_shift,
                                             list(stride), list(padding), list(dilation), int(groups), activation,
                                             float(act_param))
