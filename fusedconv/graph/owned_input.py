"""Owned block inputs: where a Sequential may tell a rewritten block that its input belongs to no one else.

A block's identity residual (`x + f(x)`, resnet's Bottleneck / BasicBlock without downsample, mobilenet_v2's
InvertedResidual) is the block's input, which belongs to its caller: the block may write its residual conv's
output into it only when the caller says nothing else holds that tensor. This module is that caller.
`install(model)` (run by convert) turns each plain nn.Sequential (exact class) holding such a block into an
`OwnedInputSequential` — the same object, its class a subclass of nn.Sequential with its own forward, so
state_dict keys, indexing, `isinstance(m, nn.Sequential)`, save / load and deepcopy stay as they were. Its
forward computes exactly what nn.Sequential.forward computes; for each child it also knows whether the tensor it
passes on is fresh:

- child 0's input is the Sequential's input: the caller's, never owned;
- a child's output is fresh when the child is a FusedConv2d without hooks, or a guarded block whose graph
  (the specialization its guard picks for this call, `Specialization.fresh_output`) returns a fused call's
  result that nothing else in it uses, the module making it being a hook-free FusedConv2d / fused Sequential
  before and after the call (`private_residual._fused_chain`). Anything else (a hooked child, a block the guard
  sends to its fallback, an unknown module) gives a not-fresh output;
- child i >= 1 whose input is fresh and whose picked specialization takes the `_fusedconv_input_owned` parameter
  (its graph half holds: private_residual.mark_owned_input) is called with that parameter set to True, through
  the specialization's code directly (what nn.Module.__call__ would run when the child, the Sequential and the
  process have no hooks, the child is not compiled in place and has no instance-level forward — all checked on
  every call); the block's own per-call check (`owned_residual`) then still decides.

The mark is an argument of one function call, never state, so it cannot leak into another call: a user calling
the block directly (`model.layer1[1](x)`), re-entrant or concurrent calls, an exception half-way, another model
sharing the block — all reach the specialization through `forward` with the default False. Grad mode (an
in-place write could invalidate a tensor autograd saved), torch.jit tracing, torch.compile / torch.export, fx
symbolic tracing, global hooks, hooks on the Sequential, and any input that is not a plain Tensor take
nn.Sequential.forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fusedconv.graph.private_residual import _fused_chain, global_observers, hooked
from fusedconv.graph.specialize import _CLASSES, _GUARDS
from fusedconv.modules import FusedConv2d
from fusedconv.scripting import refuse_script

_Tensor = torch.Tensor
_module_call = nn.Module.__call__
_module_call_impl = nn.Module._call_impl
_sequential_forward = nn.Sequential.forward
# fx symbolic tracing in progress (the narrower query where this PyTorch has it: the wider one warns that it
# also answers for torch.export, which torch.compiler.is_compiling() covers anyway).
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) \
    or torch.fx._symbolic_trace.is_fx_tracing


_grad_enabled = torch.is_grad_enabled
_compiler = torch.compiler  # its is_compiling looked up per call (a patched one is honoured)
# torch.jit tracing state, not None while tracing (what torch.jit.is_tracing() reads).
_jit_tracing_state = torch._C._get_tracing_state


def _plain_call_only(x) -> bool:
    """Calls that must see nn.Sequential.forward as written (no owned mark, no direct specialization call)."""
    return (type(x) is not _Tensor or _grad_enabled() or _compiler.is_compiling()
            or _jit_tracing_state() is not None or _fx_tracing())


def _submodule(module: nn.Module, path: tuple):
    for name in path:
        module = module.__dict__["_modules"].get(name) if isinstance(module, nn.Module) else None
    return module


def _direct_entry(module: nn.Module, x):
    """The specialization a plain call `module(x)` would run, when calling its code directly is the same call
    (no hooks, nothing that wraps or replaces forward); else None."""
    table = module.__dict__.get(_GUARDS)
    cls = type(module)
    if (table is None or hooked(module) or cls is not _CLASSES.get(table.original) or len(table.params) != 1
            or table.params[0].keyword_only or "forward" in module.__dict__
            or module.__dict__.get("_compiled_call_impl") is not None
            or cls.__call__ is not _module_call or cls._call_impl is not _module_call_impl):
        return None
    k = table.select(module, x)
    if k < 0:
        return None
    entry = table.entries[k]
    if entry.fn is None or not (entry.owned_input or entry.fresh_output):
        return None
    return entry


def call_child(module: nn.Module, x, owned: bool):
    """(module(x), whether that output is fresh), passing the owned mark where the child's graph takes it."""
    if type(module) is FusedConv2d:
        fresh = not hooked(module)
        y = module(x)
        return y, fresh and not hooked(module)
    entry = _direct_entry(module, x)
    if entry is None:
        return module(x), False
    target = entry.fresh_output
    fresh = target is not None and _fused_chain(_submodule(module, target))
    y = entry.fn(module, x, owned) if entry.owned_input else entry.fn(module, x)
    # Checked again after the call: a hook present at any time around it may have kept the output.
    fresh = fresh and type(y) is _Tensor and _fused_chain(_submodule(module, target))
    return y, fresh


class OwnedInputSequential(nn.Sequential):
    """nn.Sequential that tells a child block when its input is a tensor no one else holds (module doc)."""

    __prepare_scriptable__ = refuse_script  # (fusedconv/scripting.py)

    def forward(self, input):
        if _plain_call_only(input) or global_observers() or hooked(self):
            return _sequential_forward(self, input)
        fresh = False  # the Sequential's own input belongs to its caller
        for module in self._modules.values():
            input, fresh = call_child(module, input, fresh)
        return input



def _owns_a_child_input(seq: nn.Sequential) -> bool:
    """Some child after the first is a guarded block with a specialization that can take the owned mark."""
    for child in list(seq._modules.values())[1:]:
        table = child.__dict__.get(_GUARDS)
        if table is not None and any(e.owned_input for e in table.entries):
            return True
    return False


def install(model: nn.Module) -> int:
    """Make each plain nn.Sequential of `model` (itself included) that holds a block able to take the owned
    mark an OwnedInputSequential (in place: the same objects). Returns how many were changed."""
    changed = 0
    for m in model.modules():
        if type(m) is nn.Sequential and _owns_a_child_input(m):
            m.__class__ = OwnedInputSequential
            changed += 1
    return changed
