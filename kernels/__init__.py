"""Triton kernels and their launchers: pure functions on tensors, no nn.Module knowledge.

`conv_bn_act(x, weight, scale, shift, *, stride, padding, dilation, groups, activation, act_param, residual)`
computes act(conv(x, weight) * scale + shift [+ residual]) in one kernel (implicit GEMM; depthwise convs go to
`kernels.depthwise` when present); `pack_weight` lays a weight out the way the kernels read it fastest;
`conv_bn_act_ref` is the plain-PyTorch reference; `aot_variants()` lists every kernel variant x autotune config
(of the GEMM kernel and, when present, the depthwise kernel) for ahead-of-time compile tests.

The launcher module (and triton) is imported with the package when triton is installed; without triton the
reference and packing still work and `conv_bn_act` raises a clear error. TRITON_INTERPRET=1 must therefore be
set before `fusedconv` is first imported (tests/conftest.py runs interpreter tests in a child process for that).
"""

from fusedconv.kernels.packing import is_packed, pack_weight
from fusedconv.kernels.reference import ACTIVATIONS, apply_activation, conv_bn_act_ref

__all__ = ["ACTIVATIONS", "aot_variants", "apply_activation", "conv_bn_act", "conv_bn_act_ref", "is_packed",
           "pack_weight"]


try:
    # Binds the launcher function over the same-named submodule attribute.
    from fusedconv.kernels.conv_bn_act import conv_bn_act
except ImportError as _exc:  # triton not installed
    _TRITON_IMPORT_ERROR = _exc

    def conv_bn_act(*args, **kwargs):
        """Unavailable: the Triton kernels need triton installed."""
        raise RuntimeError(f"fusedconv.kernels.conv_bn_act needs triton, which failed to import: {_TRITON_IMPORT_ERROR}")


def aot_variants() -> list[dict]:
    """Every kernel variant x autotune config to compile ahead of time: the GEMM kernel's
    (`kernels.configs.aot_variants`, see there for the dict format), the TMA 1x1 kernel's
    and stride-1 KxK kernel's (`kernels.conv_tma.aot_variants`, `kernels.conv_tma_kxk.aot_variants`, which add
    `expects_tma`), their stream-K forms' (`kernels.conv_tma_streamk.aot_variants`) and the depthwise kernel's
    (`kernels.depthwise.aot_variants`) when that module exists."""
    from fusedconv.kernels.configs import aot_variants as _gemm_variants

    variants = list(_gemm_variants())
    try:
        from fusedconv.kernels.conv_tma import aot_variants as _tma_variants
        from fusedconv.kernels.conv_tma_kxk import aot_variants as _tma_kxk_variants
        from fusedconv.kernels.conv_tma_streamk import aot_variants as _tma_streamk_variants
    except ImportError:
        pass
    else:
        variants.extend(_tma_variants())
        variants.extend(_tma_kxk_variants())
        variants.extend(_tma_streamk_variants())
    try:
        from fusedconv.kernels import depthwise
    except ImportError:
        return variants
    depthwise_variants = getattr(depthwise, "aot_variants", None)
    if depthwise_variants is not None:
        variants.extend(depthwise_variants())
    return variants
