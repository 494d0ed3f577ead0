"""Per-scope torch.fx tracing without side effects.

Symbolic tracing runs a module's forward on Proxy objects. A forward that caches something on `self` (e.g.
torchvision's MultiScaleRoIAlign sets `self.scales` on its first call) would keep Proxies after tracing and
break the real model later. `trace_scope` restores the traced module's attributes afterwards and treats a
forward that wrote any as untraceable (the graph could not reproduce the write). `proxy_leak_guard` does the
same repair for a whole model around a pass that traces modules (used around re-parameterization).

A forward that inspects an argument's class decides its path on the Proxy's class: `isinstance` is answered as a
tensor (or a list) would answer and becomes part of the guard (`_ParamProxy`); `type(x)` and `x.__class__`
cannot be answered that way, nor can a type test of a value the forward computed (`_ValueProxy`: its type is
unknown while tracing; the whole-model flat tracer answers an isinstance against builtin classes or torch.Tensor
for a layer output it knows is a tensor, and guards that, `ScopeTracer.tensor_value`), so model code that reads a
class like that fails the trace (`ClassInspectedError`,
found with sys.setprofile while the trace runs, or by scanning the code the traced classes can reach when another
profiler holds that hook) and the scope is left unrewritten. What else the forward consulted — module-level
values, global-state queries, attributes holding objects with contents of their own, the module's instance dict
read directly (`self.__dict__[...]`, `vars(self)`: the names then read in it are not seen) — is checked after the
trace (`model_code.py`, `_check_attribute_reads`): guarded where a guard can compare it, else the trace fails
(`GlobalStateError`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dis
import functools
import operator
import sys
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from fusedconv.graph import model_code
from fusedconv.graph.model_code import ClassInspectedError, model_code as _is_model_code

# torch.fx's own argument containers (a node's args): dict and list subclasses it builds and reads back itself.
_FX_CONTAINERS = (fx.immutable_collections.immutable_dict, fx.immutable_collections.immutable_list)

_STATE_DICTS = ("_modules", "_parameters", "_buffers")
_CONTENTS = "\0contents"  # the snapshot's key for container contents (no attribute has this name)


def _is_isinstance_call(frame, names: tuple = ("isinstance", "issubclass")) -> bool:
    """Whether `frame` is executing a Python-level `isinstance(...)` / `issubclass(...)` call (one of `names`), as
    opposed to C code (e.g. torch.cat's argument parser) testing an object's type while called from that line: the
    current instruction's source span starts where a load of one of those names does (read from the bytecode's
    positions, so it needs no source file)."""
    try:
        lineno, _, col, _ = list(frame.f_code.co_positions())[frame.f_lasti // 2]
    except (AttributeError, IndexError, TypeError):
        return False
    return lineno is not None and col is not None and (lineno, col) in _type_test_starts(frame.f_code, names)


@functools.lru_cache(maxsize=1024)
def _type_test_starts(code, names: tuple = ("isinstance", "issubclass")) -> frozenset:
    """(line, column) where `code` loads one of the builtins `names` (isinstance or issubclass)."""
    return frozenset((i.positions.lineno, i.positions.col_offset) for i in dis.get_instructions(code)
                     if i.opname in ("LOAD_GLOBAL", "LOAD_NAME") and i.argval in names
                     and i.positions is not None)


@functools.lru_cache(maxsize=1024)
def _class_reads(code) -> frozenset:
    """Offsets of `code`'s instructions that read an attribute named __class__."""
    return frozenset(i.offset for i in dis.get_instructions(code)
                     if i.opname in ("LOAD_ATTR", "LOAD_METHOD") and i.argval == "__class__")


def _reads_class_attribute(frame) -> bool:
    """Whether `frame` is executing a Python-level `x.__class__` read."""
    return frame.f_lasti in _class_reads(frame.f_code)


def _model_caller():
    """The frame that read a Proxy's `__class__` (the caller of the property) when it runs model code, else None
    (torch's own code, this package's, the standard library's)."""
    frame = sys._getframe(2)
    return frame if _is_model_code(frame.f_code) else None


class _ParamProxy(fx.Proxy):
    """A forward parameter's Proxy that answers the forward's own `isinstance(p, T)` as a tensor would.

    isinstance reads `p.__class__` once the check on the Proxy type fails. To the traced code's isinstance it
    answers torch.Tensor, so the trace takes the tensor branch, and the guard of that call pattern then
    requires a tensor (instead of just "not None"). torch's own code and C-level checks get the true class.
    """

    _answers = torch.Tensor

    @property
    def __class__(self):
        frame = _model_caller()
        if frame is None:
            return type(self)
        if not _is_isinstance_call(frame):
            if _reads_class_attribute(frame):
                raise ClassInspectedError(f"{frame.f_code.co_name} reads the class of parameter {self.node.target!r}")
            return type(self)  # C code called from that line (torch.cat's argument parser) testing the type
        self.tracer.type_checked.add(self.node.target)
        return self._answers

    # Used as an object or a dict of inputs (`batch.mask`, `d.get("mask")`), the parameter is not what its guard
    # says ("not None", "a tensor"), and what the trace made of it cannot be trusted: `d.get("mask") is not None` is
    # a Proxy compared by identity, always True while tracing, so the graph would keep that branch for every call.
    # (`d["x"]` is fine: the graph indexes the dict on every call, and a missing key raises as in the forward.)
    def __getattr__(self, name):
        if not name.startswith("__") and not hasattr(self._answers, name):
            raise fx.proxy.TraceError(f"parameter {self.node.target!r} is used as an object or a dict (.{name}), "
                                      f"not as a {self._answers.__name__}: what it holds may be None")
        return super().__getattr__(name)


class _ListParamProxy(_ParamProxy):
    """A parameter traced as a list (patterns.LIST): the forward's isinstance sees a list; the Proxy may be passed
    on whole (torch.cat(p)) or indexed, never iterated: fx would unpack `a, b = p` into p[0], p[1], and the graph
    would then take the first two elements of a longer list where the forward itself raises."""

    _answers = list

    def __iter__(self):
        raise fx.proxy.TraceError(f"the list parameter {self.node.target!r} is iterated or unpacked; its length "
                                  "would be baked into the graph")


# Classes an isinstance test answers the same way for every tensor, of any subclass: no tensor is also a list,
# a tuple, a dict... (their instance layouts exclude each other), and every one is a Tensor and an object.
_NOT_A_TENSOR = frozenset({list, tuple, dict, set, frozenset, str, bytes, bytearray, int, float, complex, bool,
                           type(None), slice, range})
_EVERY_TENSOR = frozenset({torch.Tensor, object})


def _isinstance_classes(frame) -> tuple | None:
    """The class (or tuple of classes) the isinstance call `frame` is executing tests against, when its source is
    a global name, an attribute chain from one (`torch.Tensor`) or a tuple of those; None for anything else (a
    local, a call, a constant), and for an issubclass call. Read from the bytecode before the call, resolved in the
    frame's globals."""
    if not _is_isinstance_call(frame, ("isinstance",)):
        return None
    instructions = [i for i in dis.get_instructions(frame.f_code) if i.offset < frame.f_lasti]
    while instructions and instructions[-1].opname in ("PRECALL", "KW_NAMES", "CACHE"):
        instructions.pop()

    def expression():  # one value, parsed backwards from the end of `instructions`
        if not instructions:
            raise LookupError
        i = instructions.pop()
        if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            for namespace in (frame.f_globals, frame.f_builtins):
                if i.argval in namespace:
                    return namespace[i.argval]
            raise LookupError
        if i.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            return getattr(expression(), i.argval)
        if i.opname == "BUILD_TUPLE":
            return tuple(reversed([expression() for _ in range(i.argval)]))
        raise LookupError

    try:
        value = expression()
    except (LookupError, AttributeError):
        return None
    classes = value if type(value) is tuple else (value,)
    return classes if all(isinstance(c, type) for c in classes) else None


class _ValueProxy(fx.Proxy):
    """The Proxy of a value the traced code computed (a layer's or an op's output). Its type is unknown while
    tracing, so model code testing it (`isinstance(y, Tensor)`, `y.__class__`) would take the branch of fx's Proxy
    class whatever the value is when the graph runs: that fails the trace (ClassInspectedError), unless the tracer
    knows the value is a tensor (`ScopeTracer.tensor_value`) and the test answers alike for every tensor
    (`isinstance(y, (tuple, list))`, `isinstance(y, torch.Tensor)`)."""

    @property
    def __class__(self):
        frame = _model_caller()
        if frame is None:
            return type(self)
        type_test = _is_isinstance_call(frame)
        if type_test:
            classes = _isinstance_classes(frame)
            if (classes is not None and all(c in _NOT_A_TENSOR or c in _EVERY_TENSOR for c in classes)
                    and self.tracer.tensor_value(self.node)):
                return torch.Tensor
        if type_test or _reads_class_attribute(frame):
            raise ClassInspectedError(f"{frame.f_code.co_name} tests the type of a computed value ({self.node.name})")
        return type(self)

    def __getattr__(self, name):
        # A dict a layer returned, read with a default (`out.get("aux")`): None when the key is missing, which the
        # trace cannot see (a Proxy is never None), as for a parameter above.
        if name in _DICT_LOOKUPS:
            raise fx.proxy.TraceError(f"a computed value ({self.node.name}) is read as a dict (.{name}): what it "
                                      "returns may be None")
        return super().__getattr__(name)


_DICT_LOOKUPS = frozenset({"get", "pop", "setdefault", "popitem"})


class ScopeTracer(fx.Tracer):
    """Traces one module's own forward: every submodule it calls is a leaf (its inside is another scope).

    Buffers are read as graph nodes (`get_attr`), like parameters: what the forward computes from them
    (`self.gain.relu()`) then runs on every call, on the buffer as it is (fx's default runs it once, at trace time,
    and keeps the result: an in-place edit of the buffer would not reach the graph)."""

    proxy_buffer_attributes = True

    # trace_scope records what the forward reads on the leaves (their classes swapped while it runs): a subclass
    # that tells leaves by class while tracing sets this False.
    records_leaf_reads = True

    def __init__(self, list_params: frozenset[str] = frozenset()):
        super().__init__()
        self.type_checked: set[str] = set()  # placeholders whose type the forward inspected
        self.list_params = frozenset(list_params)  # placeholders traced as lists (patterns.LIST)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def tensor_value(self, node: fx.Node) -> bool:
        """Whether `node` is known to be a tensor on every call its graph runs for, so that a type test on it can be
        answered (`_ValueProxy`); a tracer that answers must also guard what makes it so. None here."""
        return False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op != "placeholder":
            return _ValueProxy(node, self)
        return _ListParamProxy(node, self) if node.target in self.list_params else _ParamProxy(node, self)

    def create_arg(self, a):
        # torch.fx writes any dict into the graph as a dict literal and any list as a list literal: an OrderedDict
        # the forward returns (torchvision's segmentation models and IntermediateLayerGetter) would come back a
        # plain dict. An OrderedDict is built as one; another dict or list subclass fails the trace.
        t = type(a)
        if t is collections.OrderedDict:
            return self.create_node("call_function", collections.OrderedDict, (super().create_arg(list(a.items())),),
                                    {})
        if (t is not dict and t not in _FX_CONTAINERS and isinstance(a, dict)) or (
                t is not list and t not in _FX_CONTAINERS and isinstance(a, list)):
            raise fx.proxy.TraceError(f"the forward passes a {t.__name__}, which the graph would hold as a plain "
                                      f"{'dict' if isinstance(a, dict) else 'list'}")
        return super().create_arg(a)


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
    # Module-level values the traced code read, to guard: (namespace dict, name, value, where it was read).
    global_reads: list[tuple[dict, str, object, str]] = field(default_factory=list)
    # The traced code asked whether jit tracing / torch.compile / export runs (model_code.traced_or_compiled).
    asks_tracing: bool = False
    # What the forward read on the submodules it calls as leaves, by dotted path (only for a plain ScopeTracer).
    leaf_reads: dict[str, list[str]] = field(default_factory=dict)


# What `_recording_reads` logs for model code reading a module's instance dict itself.
DIRECT_DICT_READ = "__dict__ (read directly)"


@contextlib.contextmanager
def _recording_reads(module: nn.Module):
    """Log every attribute name read on `module` (the instance only) while the block runs, by giving it a
    throwaway subclass with a logging __getattribute__; the class is restored afterwards."""
    cls = type(module)
    log: list[str] = []

    def __getattribute__(self, name):
        if self is module:
            if name == "__dict__" and model_code.model_code(sys._getframe(1).f_code):
                # `self.__dict__[...]` / `vars(self)` in model code (nn.Module's own lookups are torch's code): the
                # names it then reads there are not seen here.
                log.append(DIRECT_DICT_READ)
            if name == "__class__":
                return cls  # the module's own class, not this recording subclass (`x.__class__ is C`, isinstance)
            if name != "_modules" or _children_read(sys._getframe(1)):
                log.append(name)
        return super(recorder, self).__getattribute__(name)

    recorder = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})
    module.__class__ = recorder
    try:
        yield log
    finally:
        module.__class__ = cls


_MODULE_FILE = nn.modules.module.__file__
_CONTAINER_FILE = nn.modules.container.__file__


def _children_read(frame) -> bool:
    """Whether a read of a module's `_modules` (from `frame`) is the forward's own: torch's containers iterating,
    counting or indexing their children (nn.Sequential's forward, a ModuleList loop) or model code, directly or
    through nn.Module's own walkers (`self.children()`); not the tracer or a guard walking the tree (fx's
    path_of_module / collect_tensor_attrs, this package's generated checks), which say nothing of what the forward
    depends on (patterns.attribute_terms then checks every child)."""
    while frame is not None and frame.f_code.co_filename == _MODULE_FILE:
        frame = frame.f_back
    return frame is not None and (frame.f_code.co_filename == _CONTAINER_FILE or _is_model_code(frame.f_code))


# nn.Module's own bookkeeping (hook dicts, the parameter / buffer / submodule dicts): what a guard checks of these
# it checks through the entries the forward reads.
_MODULE_BOOKKEEPING = frozenset(nn.Module().__dict__)


def _check_attribute_reads(module: nn.Module, reads: list[str], where: str) -> None:
    """Fail the trace where it read an attribute holding an object whose contents it may have consulted (a helper
    or config object, a list of modules): a guard can compare plain values and containers of them, and tensors and
    modules by identity (patterns.attribute_terms), but not what such an object holds."""
    d = module.__dict__
    for attr in dict.fromkeys(reads):
        if (attr in d and not attr.startswith("__") and attr not in _MODULE_BOOKKEEPING
                and model_code.guard_kind(d[attr]) is None):
            raise model_code.GlobalStateError(f"the forward reads {where}.{attr} ({type(d[attr]).__name__}), whose "
                                              "contents a guard cannot check")


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
    watched = None
    try:
        with contextlib.ExitStack() as stack:
            reads = stack.enter_context(_recording_reads(module))
            nested = {path: stack.enter_context(_recording_reads(m)) for path, m in inner.items()}
            # The submodules the forward calls as leaves: what it reads on them (`self.h.factor`) decides the path
            # too. Only with a tracer whose leaf decisions do not look at classes while it runs (recording swaps
            # them): every submodule is a leaf of a ScopeTracer; the flat tracer decides before it traces.
            leaves = {path: stack.enter_context(_recording_reads(m)) for path, m in module.named_modules()
                      if path and path not in inner and tracer.records_leaf_reads}
            with model_code.watch([module, *inner.values()]) as watched:
                graph = tracer.trace(module, concrete_args=concrete_args)
            constants = {k: v for k, v in module.__dict__.items() if k.startswith(_FX_CONSTANT)}
    finally:
        changed = [k for m, snap in snaps for k in _restore(m, snap)]
        if watched is not None:
            watched.lineage.restore()  # (a write into a real tensor fails the trace below: undo it first)
    changed = [k for k in changed if not k.startswith(_FX_CONSTANT)]
    if changed:
        raise SideEffectError(f"forward assigns module attributes {changed} while running")
    global_reads = watched.check()
    for name, value in constants.items():
        held = watched.lineage.computed.get(id(value))
        if held is not None and held[0] is value:
            raise model_code.GlobalStateError(
                f"the forward computes a tensor from {held[1]} while tracing; the graph would hold that one value "
                f"({name}) for every call")
    for where, log in [("self", reads), *[(f"self.{p}", log) for p, log in [*nested.items(), *leaves.items()]]]:
        if DIRECT_DICT_READ in log:
            raise model_code.GlobalStateError(f"the forward reads {where}.__dict__ itself (`__dict__[...]`, "
                                              "`vars()`): a guard cannot follow the names it reads there")
    _check_attribute_reads(module, reads, "self")
    for path, m in inner.items():
        _check_attribute_reads(m, nested[path], f"self.{path}")
    leaf_reads = {}
    for path, log in leaves.items():
        names = [a for a in dict.fromkeys(log) if not a.startswith("__") and a not in _MODULE_BOOKKEEPING]
        if names:
            _check_attribute_reads(module.get_submodule(path), names, f"self.{path}")
            leaf_reads[path] = names
    module.__dict__.update(constants)  # the graph reads them with get_attr
    if concrete_args:
        _drop_fx_asserts(graph)
    return ScopeTrace(graph, reads, tracer.type_checked, nested, global_reads, bool(watched.tracing_queries),
                      leaf_reads)


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
    replaces a child by returning a new module). TorchScript children (torch.jit.script / trace inside an eager
    model) are not visited: their forward is compiled code with no Python to trace or rewrite, and they stay as
    they are (their own attribute protocol also breaks the passes' class-level reads)."""
    for name, child in list(module._modules.items()):
        if child is None or isinstance(child, torch.jit.ScriptModule):
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
