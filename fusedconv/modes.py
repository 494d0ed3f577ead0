"""Torch function and dispatch modes around a converted model's forward: user code that runs on every op.

A `TorchFunctionMode` (`__torch_function__` on every torch function) or `TorchDispatchMode` (`__torch_dispatch__`
on every aten op) sees each op of a forward and each tensor it returns: it may keep a tensor, count the ops, or
edit a module in the middle of the forward. What fusedconv does beyond the model's own ops must then step aside:
the flat forward's direct calls, checked once before the forward (fusedconv/graph/flat_fused.py); in-place
residual writes into a tensor the mode may have kept (fusedconv/graph/private_residual.py); the extra forwards of
the layout check on a first call (fusedconv/cpu_boundary.py), which the mode would see three times.
"""

from __future__ import annotations

import torch
from torch.overrides import _get_current_function_mode_stack as _function_mode_stack
from torch.utils._device import DeviceContext as _DeviceContext

_is_compiling = torch.compiler.is_compiling
_function_modes = torch._C._len_torch_function_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack


def user_modes() -> bool:
    """Whether a TorchFunctionMode or TorchDispatchMode is active (entered with `with`, or set globally), other
    than the one `torch.set_default_device` / `with torch.device(...)` install (it only fills in factory
    functions' device). Two C++ counters in the common case (no mode). Under torch.compile / torch.export it
    answers False: their tracer handles modes itself (and would stop at the counters, which it does not know)."""
    if _is_compiling():
        return False
    if _dispatch_modes():
        return True
    if not _function_modes():
        return False
    return not all(type(m) is _DeviceContext for m in _function_mode_stack())
