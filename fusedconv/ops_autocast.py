"""torch.autocast rules for fusedconv's ops: inside a region an op computes in the dtype of the layer it replaced.

A graph that calls `fusedconv::conv_bn_act` where it called aten conv2d -> batch_norm (the ExportedProgram from
`convert_exported`, or a traced converted model) runs those calls through the dispatcher. Inside
`torch.autocast(device_type, dtype)` aten's conv casts its input and weight to `dtype` and the BatchNorm after it
keeps that dtype; an op without an autocast rule is passed its tensors as they are, so it would meet a `dtype` input
from the layer before next to its float32 weight (and refuse it), or compute in float32 and hand the next layer
another dtype than the original graph did. With the rule registered here the op's input, weight and residual are
cast as autocast casts a conv's arguments (floating-point tensors of the region's device type, float64 left alone),
the scale / shift vectors stay in float32 (the epilogue's precision, as BatchNorm computes in), and the op then runs
with that device type's autocast off, as torch.library.register_autocast does (which casts to one fixed dtype and
every floating-point argument, the scale and shift included, so it cannot express this rule).
"""

from __future__ import annotations

import torch

# The autocast dispatch key of each device type the ops run on.
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
# A Library's registrations last as long as the object: kept for the life of the process.
_LIBRARIES: list = []


def _cast(t, device_type: str, dtype: torch.dtype):
    """`t` as autocast passes a conv's tensor argument: floating point on the region's device type and not float64
    is cast to the region's dtype; anything else (None, float64, another device) is passed as it is."""
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.dtype != dtype
            and t.device.type == device_type):
        return t.to(dtype)
    return t


def register(qualname: str, cast_positions: tuple[int, ...]) -> None:
    """Register the autocast rule for the op `qualname` ("namespace::name", overload "default") on CPU and CUDA:
    inside a region the positional arguments at `cast_positions` are cast to the region's dtype (`_cast`), then the
    op runs with that device type's autocast off."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "IMPL")
    for device_type, key in _AUTOCAST_KEYS.items():
        off = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _off=off):
            dtype = torch.get_autocast_dtype(_device_type)
            args = list(args)
            for i in cast_positions:
                args[i] = _cast(args[i], _device_type, dtype)
            with torch._C._ExcludeDispatchKeyGuard(_off):
                return op(*args)

        lib.impl(name, kernel, key, with_keyset=True)
    _LIBRARIES.append(lib)
