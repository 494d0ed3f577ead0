"""Modules the model's own code looks into rather than only calls: `self.bn.eps`, `self.conv.bias is None`,
`isinstance(self.act, nn.ReLU)`, `type(self.body[1])`, `self.conv.weight.mean()` in a forward.

A fused chain replaces its modules: the conv's attribute holds a FusedConv2d, the BatchNorm and activation become
nn.Identity. A forward that only calls them computes the same after that; one that reads them would read the
stand-ins (an AttributeError, another branch of an `isinstance` test, a FusedConv2d's attributes) wherever it runs
as written: in a guarded block's fallback, in a block convert could not trace, after an edit sends a call there. So
these modules stay as they are (`legality.hook_reason` names them; the passes then leave their chains unfused).

Found by reading the bytecode of every forward written outside torch (`model_code.model_code`), and of the
functions and comprehensions defined inside it: an attribute path from `self` through submodules (attributes,
constant indices of Sequential / ModuleList, constant keys of ModuleDict) that ends in something other than a
submodule or a call (a direct child's parameter or buffer excepted: the parent's graph reads it with get_attr, and
the passes keep that child), or that is the first argument of isinstance / type / hasattr / getattr / id / callable. A
submodule reached another way (a loop variable over `self.children()`, a local alias) is not seen: the per-scope
trace's own reads (`tracing.ScopeTrace.leaf_reads`) cover what the scope's forward reads on its direct children.
"""

from __future__ import annotations

import contextlib
import contextvars
import dis
import functools
import types

import torch
import torch.nn as nn

from fusedconv.graph import model_code

_TESTS = frozenset({"isinstance", "type", "hasattr", "getattr", "id", "callable", "vars"})
_ATTRIBUTE_OPS = ("LOAD_ATTR", "LOAD_METHOD")
# What calling a module reads on it (`self.bn.forward(x)` is a call too).
_CALL_NAMES = frozenset({"forward", "__call__", "_call_impl"})

_current: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar("fusedconv_inspected", default=None)


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _child(module: nn.Module, key) -> nn.Module | None:
    """The submodule `module.key` / `module[key]` (a Sequential's or ModuleList's constant index, a ModuleDict's
    constant key), or None."""
    if isinstance(key, str):
        return module._modules.get(key)
    if isinstance(key, int) and isinstance(module, (nn.Sequential, nn.ModuleList)):
        try:
            return module[key]
        except IndexError:
            return None
    return None


@functools.lru_cache(maxsize=1024)
def _instructions(code: types.CodeType) -> tuple:
    return tuple(dis.get_instructions(code))  # (one class's forward is read once for all its instances)


def _tensor_of(module: nn.Module, name) -> bool:
    """A parameter or buffer holding a tensor: a direct child's, read in its parent's forward, is a get_attr node of
    the parent's graph, and the passes keep the child for it (its chain fused beside it, never in its place)."""
    return isinstance(module._parameters.get(name), nn.Parameter) or module._buffers.get(name) is not None


def _scan(owner: nn.Module, code: types.CodeType, found: dict[int, str]) -> None:
    """Record in `found` the submodules of `owner` that `code` (a forward of `owner`, or code defined in it) reads
    into or tests the class of; `self` is the code's first argument, or a free variable of that name."""
    self_name = code.co_varnames[0] if code.co_argcount else "self"
    ins = _instructions(code)
    i = 0
    while i < len(ins):
        op = ins[i]
        starts = (op.opname in ("LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE") and op.argval == self_name) or \
            (op.opname == "LOAD_FAST_LOAD_FAST" and isinstance(op.argval, tuple) and op.argval[-1] == self_name)
        if not starts:
            i += 1
            continue
        tested = i > 0 and ins[i - 1].opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins[i - 1].argval in _TESTS
        current, names, j = owner, [], i + 1
        while j < len(ins):
            nxt = ins[j]
            key, step = None, 0
            if nxt.opname in _ATTRIBUTE_OPS:
                key, step = nxt.argval, 1
            elif nxt.opname == "LOAD_CONST" and j + 1 < len(ins) and ins[j + 1].opname == "BINARY_SUBSCR":
                key, step = nxt.argval, 2
            if step == 0:
                break
            child = _child(current, key)
            if child is None:
                if current is not owner and nxt.opname in _ATTRIBUTE_OPS and key not in _CALL_NAMES and \
                        not (len(names) == 1 and _tensor_of(current, key)):
                    where = ".".join(names)
                    found.setdefault(id(current), f"{type(owner).__name__}.forward reads self.{where}.{key}")
                break
            current = child
            names.append(str(key))
            j += step
        if tested and current is not owner and (j >= len(ins) or ins[j].opname not in _ATTRIBUTE_OPS):
            where = ".".join(names)
            found.setdefault(id(current), f"{type(owner).__name__}.forward calls {ins[i - 1].argval}() on "
                                          f"self.{where}")
        i = max(j, i + 1)


def inspected_modules(model: nn.Module) -> dict[int, str]:
    """id(module) -> where the model's code reads into it (module doc), for every such module of `model`."""
    found: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue  # compiled code, left alone by the rewrites (as are its submodules)
        forward = getattr(type(module), "forward", None)
        fn = getattr(forward, "__code__", None)
        if fn is None or forward is nn.Module.forward or not model_code.model_code(fn):
            continue
        for code in _codes(fn):
            _scan(module, code, found)
    return found


@contextlib.contextmanager
def inspecting(model: nn.Module):
    """Makes `inspected(m)` answer for `model`'s modules while the rewrites run."""
    token = _current.set(inspected_modules(model))
    try:
        yield
    finally:
        _current.reset(token)


def inspected(module: nn.Module) -> str | None:
    """Where the model being converted reads into `module` (None when nothing does, or outside `inspecting`)."""
    table = _current.get()
    return None if table is None else table.get(id(module))
