"""The `fusedconv::conv_bn_act` op: one PyTorch operator for act(conv(x, w) * scale + shift [+ residual]).

Schema: conv_bn_act(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, int[] stride,
int[] padding, int[] dilation, int groups, str activation, float act_param) -> Tensor. The output has x's dtype
and x's memory format (channels_last in -> channels_last out).

Implementation: CUDA tensors in fp16 / bf16 / fp32 (weight in the same dtype) run the Triton launcher
`fusedconv.kernels.conv_bn_act`; everything else (CPU, fp64, no triton, > 65535 groups) runs the standard-conv
fallback `conv_bn_act_ref` (F.conv2d, then the epilogue in fp32 / fp64).

Registration — chosen for torch 2.11 .. 2.14:
  * `torch.library.triton_op` (the default when torch has it). Its implementation is visible to
    torch.compile and torch.export: the launcher calls its kernels through `wrap_triton` while tracing (see
    `kernels.epilogue.traceable`), the autotuner included — torch >= 2.6 traces `triton.autotune` kernels
    with `configs`, `key` and `prune_configs_by` (our autotuner uses nothing else: no pre/post hooks, which
    wrap_triton rejects). triton_op also uses the implementation itself as the fake (meta) kernel: all launcher
    logic before the launch is shape arithmetic and tensor allocation, which fake tensors support.
  * a plain `torch.library.custom_op` + `register_fake` (opaque to tracing, still no graph break) when
    triton_op is missing, or when FUSEDCONV_OPAQUE_OP=1 is set before import — the escape hatch if a future
    torch / triton pairing cannot trace the kernels.
`OP_REGISTRATION` says which one is active.

Autograd: the fused modules never call the op on a graph that needs a backward: `grad_needed` is their routing test
(grad mode on and any of the call's tensors requiring grad), and when it holds they compute through differentiable
standard ops instead (see FusedConv2d). A graph that holds the op itself (convert_exported's programs, and
torch.compile of them in grad mode) gets its gradients from the formula in `ops_backward.py`. Inside torch.autocast
the op casts as the conv it replaced does (`ops_autocast.py`).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from fusedconv import ops_autocast, ops_backward
from fusedconv.validation import check_inputs
from fusedconv.kernels.reference import apply_activation, conv_bn_act_ref, conv_output_shape, output_memory_format

__all__ = ["OP_REGISTRATION", "conv_bn_act", "grad_needed", "kernel_available", "pack_weight", "use_kernel"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GROUPS = 65535  # CUDA grid y-dimension limit (groups are a grid axis of the GEMM kernel)


@functools.cache
def kernel_available() -> bool:
    """True when the Triton kernels can run on this machine's CUDA devices."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The same weight values laid out (via strides) the way the kernel reads them fastest."""
    from fusedconv.kernels import pack_weight as _pack

    return _pack(weight, groups)


def _kernel_dtype_on_cuda(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _KERNEL_DTYPES and weight.dtype == x.dtype and kernel_available()


def use_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether FusedConv2d should call the op (CUDA + a kernel dtype) rather than its folded fallback."""
    return _kernel_dtype_on_cuda(x, weight)


def grad_needed(*tensors) -> bool:
    """True when autograd must record this call: grad mode is on and any given tensor (None entries are skipped)
    requires grad. A fused module whose call this holds for takes a differentiable path of standard ops rather
    than the op (whose Triton kernels are inference kernels); the requires_grad reads happen only in grad mode
    (never under no_grad / inference_mode)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _runs_kernel(x, weight, residual, groups) -> bool:
    # Not `use_kernel`: that is FusedConv2d's routing decision (and patchable); this is the op's own.
    return (_kernel_dtype_on_cuda(x, weight) and groups <= _MAX_GROUPS
            and (residual is None or residual.is_floating_point()))


def _conv_bn_act_impl(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      residual: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                      groups: int, activation: str, act_param: float) -> torch.Tensor:
    if _runs_kernel(x, weight, residual, groups):
        from fusedconv.kernels import conv_bn_act as _launch

        return _launch(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       activation=activation, act_param=act_param, residual=residual)
    # The launcher validates its own inputs; the fallback gets the same named errors instead of F.conv2d's.
    check_inputs(x, weight, groups, residual, stride=stride, padding=padding, dilation=dilation)
    if x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype:
        # Standard-conv fallback: scale folded into the weight (exact to rounding at fp32 / fp64), so one conv
        # with bias does conv + BN, then the residual add and the activation in place — no extra passes.
        folded = weight * scale.to(x.dtype).view(-1, 1, 1, 1)
        y = F.conv2d(x, folded, shift.to(x.dtype), stride, padding, dilation, groups)
        if residual is not None:
            y.add_(residual)
        y = apply_activation(y, activation, act_param, inplace=True)
    else:  # half precision: keep the fp32 epilogue (a folded fp16 weight could overflow or lose precision)
        y = conv_bn_act_ref(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation,
                            groups=groups, activation=activation, act_param=act_param, residual=residual)
    # F.conv2d's CPU kernels do not always keep channels_last; the op's contract is x's memory format.
    return y.contiguous(memory_format=output_memory_format(x))


def _conv_bn_act_fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, act_param):
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


def _register():
    name = "fusedconv::conv_bn_act"
    opaque = os.environ.get("FUSEDCONV_OPAQUE_OP", "0") not in ("", "0")
    if not opaque and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
        return torch.library.triton_op(name, _conv_bn_act_impl, mutates_args=()), "triton_op"
    op = torch.library.custom_op(name, _conv_bn_act_impl, mutates_args=())
    op.register_fake(_conv_bn_act_fake)
    return op, "custom_op"


_conv_bn_act_op, OP_REGISTRATION = _register()
# Gradients for a graph that holds the op itself (ops_backward.py; the fused modules route around it).
ops_backward.register(_conv_bn_act_op)
# Inside torch.autocast: x, weight and residual in the region's dtype, scale / shift in float32 (ops_autocast.py).
ops_autocast.register("fusedconv::conv_bn_act", (0, 1, 4))


def conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, act_param):
    """Call the registered op (positional arguments as in its schema)."""
    return torch.ops.fusedconv.conv_bn_act(x, weight, scale, shift, residual, list(stride), list(padding),
                                           list(dilation), int(groups), activation, float(act_param))
