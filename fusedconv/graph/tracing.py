"""Per-scope torch.fx tracing without side effects.

Symbolic tracing runs a module's forward on Proxy objects. A forward that caches something on `self` (e.g.
torchvision's MultiScaleRoIAlign sets `self.scales` on its first call) would keep Proxies after tracing and
break the real model later. `trace_scope` restores the traced module's attributes afterwards and treats a
forward that wrote any as untraceable (the graph could not reproduce the write). `proxy_leak_guard` does the
same repair for a whole model around a pass that traces modules (used around re-parameterization).

A forward that inspects an argument's class decides its path on the Proxy's class: `isinstance` is answered as a
tensor (or a list) would answer and becomes part of the guard (`_ParamProxy`); `type(x)` and `x.__class__`
cannot be answered that way, nor can any type test of a value the forward computed (`_ValueProxy`: its type is
unknown while tracing), so model code that reads a class like that fails the trace (`ClassInspectedError`,
found with sys.setprofile while the trace runs, or by scanning the code the traced classes can reach when another
profiler holds that hook) and the scope is left unrewritten.
"""

from __future__ import annotations

import contextlib
import copy
import dis
import functools
import operator
import os
import sys
import sysconfig
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

_STATE_DICTS = ("_modules", "_parameters", "_buffers")
_CONTENTS = "\0contents"  # the snapshot's key for container contents (no attribute has this name)


def _is_isinstance_call(frame) -> bool:
    """Whether `frame` is executing a Python-level `isinstance(...)` / `issubclass(...)` call, as opposed to C code
    (e.g. torch.cat's argument parser) testing an object's type while called from that line: the current
    instruction's source span starts where a load of the name isinstance / issubclass does (read from the
    bytecode's positions, so it needs no source file)."""
    try:
        lineno, _, col, _ = list(frame.f_code.co_positions())[frame.f_lasti // 2]
    except (AttributeError, IndexError, TypeError):
        return False
    return lineno is not None and col is not None and (lineno, col) in _type_test_starts(frame.f_code)


@functools.lru_cache(maxsize=1024)
def _type_test_starts(code) -> frozenset:
    """(line, column) where `code` loads the builtins isinstance or issubclass."""
    return frozenset((i.positions.lineno, i.positions.col_offset) for i in dis.get_instructions(code)
                     if i.opname in ("LOAD_GLOBAL", "LOAD_NAME") and i.argval in ("isinstance", "issubclass")
                     and i.positions is not None)


@functools.lru_cache(maxsize=1024)
def _class_reads(code) -> frozenset:
    """Offsets of `code`'s instructions that read an attribute named __class__."""
    return frozenset(i.offset for i in dis.get_instructions(code)
                     if i.opname in ("LOAD_ATTR", "LOAD_METHOD") and i.argval == "__class__")


def _reads_class_attribute(frame) -> bool:
    """Whether `frame` is executing a Python-level `x.__class__` read."""
    return frame.f_lasti in _class_reads(frame.f_code)


class _ParamProxy(fx.Proxy):
    """A forward parameter's Proxy that answers the forward's own `isinstance(p, T)` as a tensor would.

    isinstance reads `p.__class__` once the check on the Proxy type fails. To the traced code's isinstance it
    answers torch.Tensor, so the trace takes the tensor branch, and the guard of that call pattern then
    requires a tensor (instead of just "not None"). torch's own code and C-level checks get the true class.
    """

    _answers = torch.Tensor

    @property
    def __class__(self):
        frame = sys._getframe(1)
        caller = frame.f_globals.get("__name__", "")
        if caller == "torch" or caller.startswith("torch.") or not _model_code(frame.f_code):
            return type(self)
        if not _is_isinstance_call(frame):
            if _reads_class_attribute(frame):
                raise ClassInspectedError(f"{frame.f_code.co_name} reads the class of parameter {self.node.target!r}")
            return type(self)  # C code called from that line (torch.cat's argument parser) testing the type
        self.tracer.type_checked.add(self.node.target)
        return self._answers


class _ListParamProxy(_ParamProxy):
    """A parameter traced as a list (patterns.LIST): the forward's isinstance sees a list; the Proxy may be passed
    on whole (torch.cat(p)) or indexed, never iterated: fx would unpack `a, b = p` into p[0], p[1], and the graph
    would then take the first two elements of a longer list where the forward itself raises."""

    _answers = list

    def __iter__(self):
        raise fx.proxy.TraceError(f"the list parameter {self.node.target!r} is iterated or unpacked; its length "
                                  "would be baked into the graph")


class ClassInspectedError(fx.proxy.TraceError):
    """The traced code reads a value's class with `type(...)` or `.__class__` (not through isinstance): it would see
    the Proxy's class, take a branch no real call takes, and no guard could tell."""


# Code that is not the traced model's: torch (fx itself, torch.nn.functional), this package, the standard library
# (but for the packages installed inside it, where an interpreter without a virtual environment keeps them).
_NOT_MODEL_CODE = tuple(os.path.join(os.path.realpath(d), "") for d in (
    os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__))))
_STDLIB = os.path.join(os.path.realpath(sysconfig.get_paths()["stdlib"]), "")
_INSTALLED = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def _calls_type(code) -> bool:
    """Whether `code` loads the builtin `type` (an attribute named type, such as Tensor.type, does not count)."""
    return "type" in code.co_names and any(
        i.opname in ("LOAD_GLOBAL", "LOAD_NAME") and i.argval == "type" for i in dis.get_instructions(code))


def _model_code(code) -> bool:
    return _model_file(code.co_filename)


@functools.lru_cache(maxsize=4096)
def _model_file(filename: str) -> bool:
    if filename.startswith(("<fusedconv ", "<frozen ")):  # this package's generated code; the frozen stdlib
        return False
    path = os.path.realpath(filename)
    if path.startswith(_NOT_MODEL_CODE):
        return False
    return not path.startswith(_STDLIB) or any(d in path[len(_STDLIB) - 1:] for d in _INSTALLED)


def _reachable_code(functions, depth: int = 3) -> set:
    """The code of `functions` (methods, static and class methods, properties), of the functions nested in them and
    of the module-level functions they name, `depth` calls deep: what a forward may run, found without running it."""
    seen: set = set()
    todo = []
    for fn in functions:
        for f in (getattr(fn, "__func__", fn), getattr(fn, "fget", None)):
            if getattr(f, "__code__", None) is not None:
                todo.append((f.__code__, getattr(f, "__globals__", {}), 0))
    while todo:
        code, glb, level = todo.pop()
        if code in seen or not _model_code(code):
            continue
        seen.add(code)
        todo += [(c, glb, level) for c in code.co_consts if hasattr(c, "co_names")]
        if level < depth:
            for name in code.co_names:
                target = glb.get(name)
                if callable(target) and getattr(target, "__code__", None) is not None:
                    todo.append((target.__code__, getattr(target, "__globals__", {}), level + 1))
    return seen


@contextlib.contextmanager
def _no_type_calls(modules: list[nn.Module]):
    """Around a trace of modules[0] (through the others): fail it when model code that ran (the forwards, their
    helpers, module-level functions they called) calls `type(...)`. Seen with sys.setprofile; where another
    profiler holds that hook, the code the modules' classes can reach is scanned instead (`_reachable_code`)."""
    if sys.getprofile() is not None:
        yield
        classes = {cls for m in modules for cls in type(m).__mro__}
        functions = [fn for cls in classes for fn in vars(cls).values()]
        for code in _reachable_code(functions):
            if _model_code(code) and _calls_type(code):
                raise ClassInspectedError(f"{code.co_name} ({os.path.basename(code.co_filename)}:"
                                          f"{code.co_firstlineno}) calls type()")
        return
    seen: set = set()

    def profile(frame, event, arg):
        if event == "call":
            seen.add(frame.f_code)

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(None)
    for code in seen:
        if _model_code(code) and _calls_type(code):
            raise ClassInspectedError(f"{code.co_name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno}) "
                                      "calls type()")


class _ValueProxy(fx.Proxy):
    """The Proxy of a value the traced code computed (a layer's or an op's output). Its type is unknown while
    tracing, so model code testing it (`isinstance(y, Tensor)`, `y.__class__`) would take the branch of fx's Proxy
    class whatever the value is when the graph runs: that fails the trace (ClassInspectedError)."""

    @property
    def __class__(self):
        frame = sys._getframe(1)
        caller = frame.f_globals.get("__name__", "")
        if caller == "torch" or caller.startswith("torch.") or not _model_code(frame.f_code):
            return type(self)
        if _is_isinstance_call(frame) or _reads_class_attribute(frame):
            raise ClassInspectedError(f"{frame.f_code.co_name} tests the type of a computed value ({self.node.name})")
        return type(self)


class ScopeTracer(fx.Tracer):
    """Traces one module's own forward: every submodule it calls is a leaf (its inside is another scope)."""

    def __init__(self, list_params: frozenset[str] = frozenset()):
        super().__init__()
        self.type_checked: set[str] = set()  # placeholders whose type the forward inspected
        self.list_params = frozenset(list_params)  # placeholders traced as lists (patterns.LIST)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op != "placeholder":
            return _ValueProxy(node, self)
        return _ListParamProxy(node, self) if node.target in self.list_params else _ParamProxy(node, self)


class SideEffectError(RuntimeError):
    """The traced forward assigned attributes on the module (state the graph cannot reproduce)."""


def _contents(value):
    """What a plain dict / list attribute holds (by identity), so a write into it is seen; None for others."""
    if type(value) in (dict, list):
        return [(k, id(v)) for k, v in value.items()] if type(value) is dict else [id(v) for v in value]
    return None


def _snapshot(module: nn.Module) -> dict:
    snap = {k: v for k, v in module.__dict__.items() if k not in _STATE_DICTS}
    for k in _STATE_DICTS:
        snap[k] = dict(module.__dict__.get(k, {}))
    # A forward may also write into a container attribute it keeps (a cache dict filled in place, as timm's
    # LeViT does): the attribute is the same object afterwards, so its contents are kept as well.
    snap[_CONTENTS] = {k: (copy.copy(v), _contents(v)) for k, v in snap.items()
                       if k not in _STATE_DICTS and _contents(v) is not None}
    return snap


def _restore(module: nn.Module, snap: dict) -> list[str]:
    """Put `module`'s attributes back as in `snap`; returns the names that had changed."""
    changed = []
    for k in _STATE_DICTS:
        current = module.__dict__.get(k, {})
        # Compare by identity: tensors' == is elementwise.
        if [(n, id(v)) for n, v in current.items()] != [(n, id(v)) for n, v in snap[k].items()]:
            changed.append(k)
            current.clear()
            current.update(snap[k])
    for k, (saved, ids) in snap[_CONTENTS].items():
        current = module.__dict__.get(k)
        if current is snap[k] and _contents(current) != ids:  # written in place: put the old contents back
            changed.append(k)
            if type(current) is dict:
                current.clear()
                current.update(saved)
            else:
                current[:] = saved
    for k in list(module.__dict__):
        if k not in _STATE_DICTS and (k not in snap or module.__dict__[k] is not snap[k]):
            changed.append(k)
            del module.__dict__[k]
    for k, v in snap.items():
        if k not in _STATE_DICTS and k != _CONTENTS and k not in module.__dict__:
            module.__dict__[k] = v
    return changed


@dataclass
class ScopeTrace:
    """One traced call pattern of a scope: the graph, the attribute names the forward read on the module
    (directly or through its own methods), the parameters whose type it inspected, and, for a tracer that
    traces through submodules, the names read on each of those (by dotted path)."""

    graph: fx.Graph
    reads: list[str]
    type_checked: set[str]
    nested_reads: dict[str, list[str]] = field(default_factory=dict)


@contextlib.contextmanager
def _recording_reads(module: nn.Module):
    """Log every attribute name read on `module` (the instance only) while the block runs, by giving it a
    throwaway subclass with a logging __getattribute__; the class is restored afterwards."""
    cls = type(module)
    log: list[str] = []

    def __getattribute__(self, name):
        if self is module:
            log.append(name)
        return super(recorder, self).__getattribute__(name)

    recorder = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})
    module.__class__ = recorder
    try:
        yield log
    finally:
        module.__class__ = cls


def _drop_fx_asserts(graph: fx.Graph) -> None:
    """Remove the checks fx inserts for concrete arguments: the guards of the call pattern check them before
    the graph runs, so they would only cost time."""
    for node in list(graph.nodes):
        if node.op == "call_function" and (node.target is torch.fx._symbolic_trace._assert_is_none
                                           or node.target is torch._assert) and not node.users:
            inputs = node.all_input_nodes
            graph.erase_node(node)
            for inp in inputs:
                if inp.op == "call_function" and not inp.users and inp.target is operator.eq:
                    graph.erase_node(inp)


def traced_through(module: nn.Module, tracer: fx.Tracer) -> dict[str, nn.Module]:
    """The submodules (by dotted path) whose forward `tracer` inlines into `module`'s graph."""
    out: dict[str, nn.Module] = {}

    def walk(m: nn.Module, prefix: str) -> None:
        for name, child in m._modules.items():
            path = f"{prefix}{name}"
            if child is not None and not tracer.is_leaf_module(child, path):
                out[path] = child
                walk(child, path + ".")

    walk(module, "")
    return out


# Attributes fx itself adds to the traced root (tensor constants met in the forward): not the forward's writes.
_FX_CONSTANT = "_tensor_constant"


def trace_scope(module: nn.Module, concrete_args: dict | None = None, tracer: ScopeTracer | None = None
                ) -> ScopeTrace:
    """fx graph of `module`'s forward (parameters in `concrete_args` fixed to those values); raises if it
    cannot be traced. The default tracer keeps every submodule a leaf; another ScopeTracer may trace through
    some, and the attributes read on those are recorded too (`ScopeTrace.nested_reads`)."""
    tracer = tracer or ScopeTracer()
    inner = traced_through(module, tracer)
    snaps = [(m, _snapshot(m)) for m in [module, *inner.values()]]
    constants: dict = {}
    try:
        with contextlib.ExitStack() as stack:
            reads = stack.enter_context(_recording_reads(module))
            nested = {path: stack.enter_context(_recording_reads(m)) for path, m in inner.items()}
            with _no_type_calls([module, *inner.values()]):
                graph = tracer.trace(module, concrete_args=concrete_args)
            constants = {k: v for k, v in module.__dict__.items() if k.startswith(_FX_CONSTANT)}
    finally:
        changed = [k for m, snap in snaps for k in _restore(m, snap)]
    changed = [k for k in changed if not k.startswith(_FX_CONSTANT)]
    if changed:
        raise SideEffectError(f"forward assigns module attributes {changed} while running")
    module.__dict__.update(constants)  # the graph reads them with get_attr
    if concrete_args:
        _drop_fx_asserts(graph)
    return ScopeTrace(graph, reads, tracer.type_checked, nested)


def _holds_proxy(value, depth: int = 0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth < 3 and isinstance(value, (list, tuple, set)):
        return any(_holds_proxy(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return any(_holds_proxy(v, depth + 1) for v in value.values())
    return False


@contextlib.contextmanager
def proxy_leak_guard(model: nn.Module, notes: list[str]):
    """Around a pass that traces `model`'s modules: restore any attribute that was left holding fx Proxies."""
    snaps = {id(m): (m, {k: v for k, v in m.__dict__.items() if k not in _STATE_DICTS}) for m in model.modules()}
    try:
        yield
    finally:
        for m, snap in snaps.values():
            for k, v in list(m.__dict__.items()):
                if k not in _STATE_DICTS and _holds_proxy(v):
                    if k in snap:
                        m.__dict__[k] = snap[k]
                    else:
                        del m.__dict__[k]
                    notes.append(f"repaired {type(m).__name__}.{k}, left holding fx Proxies by tracing")


def visit_children(module: nn.Module, scope: str, visit) -> None:
    """Call `visit(child, dotted_scope)` on each child of `module` and put back whatever it returns (a pass
    replaces a child by returning a new module)."""
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = visit(child, f"{scope}.{name}" if scope else name)
        if new is not child:
            module._modules[name] = new


class ScopeGraphModule(fx.GraphModule):
    """The fx.GraphModule that stands in for one rewritten module scope, under that module's class name.

    A plain GraphModule forgets its `class_name` when deep-copied (convert copies the model) or pickled, so a
    user's `ResidualBlock` would turn into `GraphModule` after `copy.deepcopy` or `torch.save(model)`; this
    keeps the name through both.
    """

    def __init__(self, root, graph: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, graph, class_name)
        self._graphmodule_cls_name = class_name  # GraphModule's unpickler reads this attribute

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        type(res).__name__ = self._graphmodule_cls_name  # type(res) is res's own per-instance subclass
        _keep_forward_hooks(res, copy.deepcopy({k: self.__dict__[k] for k in _FORWARD_HOOKS if k in self.__dict__},
                                               memo))
        return res

    def __reduce__(self):
        func, args = super().__reduce__()
        return _rebuild_scope_graph_module, (func, args)


# GraphModule drops forward hooks when it is deep-copied or unpickled (its __init__ makes new, empty hook dicts);
# a converted model's root carries hooks of its own (the CPU layout boundary), so they are carried over.
_FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _keep_forward_hooks(res: nn.Module, hooks: dict) -> None:
    for k, v in hooks.items():
        if v and not res.__dict__.get(k):
            res.__dict__[k] = v


def _rebuild_scope_graph_module(func, args) -> ScopeGraphModule:
    plain = func(*args)
    res = ScopeGraphModule(plain, plain.graph, getattr(plain, "_graphmodule_cls_name", type(plain).__name__))
    for k, v in plain.__dict__.items():  # attributes the graph does not reference, as GraphModule keeps them
        if k not in res.__dict__:
            res.__dict__[k] = v
    body = args[0] if args and isinstance(args[0], dict) else {}
    _keep_forward_hooks(res, {k: body[k] for k in _FORWARD_HOOKS if k in body})
    res.training = plain.training
    return res
