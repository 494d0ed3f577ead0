"""What a traced forward depends on beyond its arguments and its module: the model code that ran, the module-level
values it read, the global state it queried.

fx runs a forward as plain Python on Proxies, so everything else the forward consults is evaluated once, at trace
time, and its outcome baked into the graph: a module-level `SCALE = 2.0` or a flag list `FLAGS[0]`, a setting of
another model module (`config.USE_X`), `torch.is_grad_enabled()`. A later call after `SCALE` changed, or in the
other grad mode, would run the graph of the old value: silently wrong. `watch(modules)` records, around a trace,
the model code that ran (with the globals it ran in) through sys.setprofile, and the calls it made to global-state
queries; `WatchedCode.check()` then
  * fails the trace (`ClassInspectedError`) where model code called `type(...)` (it would see fx's Proxy class),
  * fails it (`GlobalStateError`) where model code queried global state (grad mode, autocast, default dtype, fx
    tracing: the graph would hold one answer for every call) or read a real tensor's values into Python (`t.item()`,
    `if t > 0:` on a module-level tensor or a plain tensor attribute: an in-place edit would not reach the branch the
    graph took); a query about jit tracing or torch.compile / export
    instead puts `not traced_or_compiled()` into the guard (outside those its answer is the trace's: False),
  * fails it where torch computed a tensor the graph then holds as a constant from something other than plain
    values: a random draw with no traced argument (`torch.randn(1, c, 1, 1)`: the graph would add the same noise
    on every call) or a real tensor (`self.mask.sigmoid()` on a plain tensor attribute, a module-level tensor: an
    in-place edit or a later draw would not reach it), and where model code wrote into a real tensor in place while
    tracing (the write happens once, at trace time, and never in the graph) (`TensorLineage`);
  * lists the module-level values the code reads (`LOAD_GLOBAL`, and `module.NAME` of a model module, `Config.NAME`
    of a model class used as a namespace, `helper.NAME` set on a model function, up to three attributes deep): plain
    values and containers of them, tensors and modules become guard terms (`patterns.build_guard`: by value, by
    value and identity, by identity); functions, classes, dtypes and the like are the code they are, guarded by
    identity (a name rebound after the trace); modules are not guarded; anything else (an object whose contents
    the code may have read) fails the trace (`GlobalStateError`);
  * fails it where model code drew a Python or numpy random number or read the clock (`random.random()`,
    `np.random.rand()`, `time.time()`: the graph would keep one draw), or called a function leaving out an argument
    whose default is a mutable object (`def scale(y, cfg={"gain": 1.0})`: the graph would keep what it held),
  * counts what a forward reads on a module it imports itself (`import config` inside the forward, then
    `config.GAIN`; `from config import GAIN`) and attributes set on a model function (`helper.gain`) as module-level
    values (the guard reads the function's dict: `FunctionNamespace`),
  * lists the same way the closure variables the code reads that were bound before the trace (a class made by a
    factory function reading the factory's `scale` or calling its `activation`, or a cell a `nonlocal` assignment
    rebinds): the guard reads the cell itself (`ClosureCell`). Variables of a function that ran during the trace (a
    lambda or comprehension inside the forward) are locals of the traced code, computed anew on every call, and need
    no guard.
Where another profiler holds the hook, the code the modules' classes can reach is scanned instead (`reachable_code`),
with the same rules for every global it names and every state query it names.

Model code is everything but torch, this package and the standard library (whose installed packages are model
code again: torchvision, timm, a user's own modules).
"""

from __future__ import annotations

import contextlib
import datetime
import dis
import enum
import functools
import gc
import logging
import operator
import os
import pickle
import random
import sys
import sysconfig
import time
import types

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
import torch.nn as nn
from torch.overrides import TorchFunctionMode

_NOT_MODEL_CODE = tuple(os.path.join(os.path.realpath(d), "") for d in (
    os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__))))
_STDLIB = os.path.join(os.path.realpath(sysconfig.get_paths()["stdlib"]), "")
_INSTALLED = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


class ClassInspectedError(fx.proxy.TraceError):
    """The traced code reads a value's class with `type(...)` or `.__class__` (not through isinstance): it would see
    the Proxy's class, take a branch no real call takes, and no guard could tell."""


class GlobalStateError(fx.proxy.TraceError):
    """The traced code consulted something a guard cannot check on every call: a global-state query (grad mode,
    autocast, tracing) or a module-level object whose contents it may have read."""


def model_code(code) -> bool:
    return model_file(code.co_filename)


@functools.lru_cache(maxsize=4096)
def model_file(filename: str) -> bool:
    if filename.startswith(("<fusedconv ", "<frozen ")):  # this package's generated code; the frozen stdlib
        return False
    path = os.path.realpath(filename)
    if path.startswith(_NOT_MODEL_CODE):
        return False
    return not path.startswith(_STDLIB) or any(d in path[len(_STDLIB) - 1:] for d in _INSTALLED)


def _calls_type(code) -> bool:
    """Whether `code` loads the builtin `type` (an attribute named type, such as Tensor.type, does not count)."""
    return "type" in code.co_names and any(name == "type" for name, _ in _global_loads(code))


_ATTRIBUTE_OPS = ("LOAD_ATTR", "LOAD_METHOD")
_CHAIN = 3  # attributes followed after a global: `config.Settings.GAIN`


@functools.lru_cache(maxsize=4096)
def _global_loads(code) -> tuple:
    """(name, attributes) for each global `code` loads: the attributes are those read right after it, in order,
    up to _CHAIN of them (`config.FLAG` -> ("config", ("FLAG",)); `Config.GAIN` -> ("Config", ("GAIN",)))."""
    out = []
    instructions = list(dis.get_instructions(code))
    for i, ins in enumerate(instructions):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            attrs = []
            for nxt in instructions[i + 1:i + 1 + _CHAIN]:
                if nxt.opname not in _ATTRIBUTE_OPS:
                    break
                attrs.append(nxt.argval)
            out.append((ins.argval, tuple(attrs)))
    return tuple(dict.fromkeys(out))


def _resolve(*names: str):
    """The objects at these dotted paths under torch that this PyTorch has."""
    found = []
    for name in names:
        obj = torch
        for part in name.split(".")[1:]:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            found.append((name, obj))
    return found


# Global-state queries whose answer a trace would bake in. `torch.jit.is_scripting()` is not among them: outside
# TorchScript (the only place a graph of this package runs) it is always False.
_STATE_ONLY = _resolve(
    "torch.is_grad_enabled", "torch.is_inference_mode_enabled", "torch.is_autocast_enabled",
    "torch.is_autocast_cpu_enabled", "torch.get_autocast_dtype", "torch.get_autocast_cpu_dtype",
    "torch.get_autocast_gpu_dtype", "torch._C._is_any_autocast_enabled", "torch.get_default_dtype",
    "torch.are_deterministic_algorithms_enabled", "torch.is_anomaly_enabled", "torch.fx._symbolic_trace.is_fx_tracing",
    "torch.fx._symbolic_trace.is_fx_symbolic_tracing")
# The environment, read through the standard library's functions (a read of `os.environ` itself is refused as a
# module-level object with contents): `os.getenv("FLAG")` in a forward would keep its trace-time answer.
_STATE_ONLY += [(f"os.{name}", getattr(os, name)) for name in ("getenv", "getenvb") if hasattr(os, name)]
# Queries that answer True only under jit tracing, torch.compile or torch.export: False while fx traces the
# forward, and False on every call the guard lets in (`traced_or_compiled()` is its first term), so the graph's
# answer holds where it runs (smp's models skip an input check when tracing or compiling).
_TRACING_QUERIES = _resolve(
    "torch._C._get_tracing_state", "torch._C._is_tracing", "torch.jit.is_tracing", "torch.compiler.is_compiling",
    "torch.compiler.is_exporting", "torch.compiler.is_dynamo_compiling", "torch._dynamo.is_compiling",
    "torch._utils.is_compiling")
# Nondeterministic reads: Python's random numbers, the clock, the OS's random bytes. A trace would keep one draw or
# one reading for every later call (torch's own random ops on a traced value are graph ops, drawn anew on every
# call; one with no traced argument runs once, at trace time: TensorLineage). The functions of the `random` module
# are methods of its hidden Random instance: the Python ones are matched by code, the C ones (`random.random`,
# `getrandbits`) as methods of any Random instance, as are numpy.random's (`_random_source`).
_NONDETERMINISTIC = [(f"time.{name}", getattr(time, name)) for name in (
    "time", "time_ns", "perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "process_time",
    "process_time_ns", "thread_time", "thread_time_ns", "clock_gettime", "clock_gettime_ns", "localtime", "gmtime",
    "ctime", "asctime", "strftime") if hasattr(time, name)]
_NONDETERMINISTIC += [("os.urandom", os.urandom)]
_NONDETERMINISTIC += [(f"random.{name}", fn) for name, fn in vars(random.Random).items()
                      if isinstance(fn, types.FunctionType) and not name.startswith("_")]
_NONDETERMINISTIC += [(f"random.{name}", getattr(random, name)) for name in ("random", "getrandbits")
                      if hasattr(random, name)]
# (name, query, whether it asks about tracing)
_STATE_QUERIES = [(name, obj, False) for name, obj in _STATE_ONLY + _NONDETERMINISTIC] + [
    (name, obj, True) for name, obj in _TRACING_QUERIES]
# (name, whether it asks about tracing) by the builtin's id / the Python function's code; and by bare name for the
# static scan.
_QUERY_BUILTINS = {id(obj): (name, tracing) for name, obj, tracing in _STATE_QUERIES if not hasattr(obj, "__code__")}
_QUERY_CODES = {obj.__code__: (name, tracing) for name, obj, tracing in _STATE_QUERIES if hasattr(obj, "__code__")}
# The static scan finds the nondeterministic ones through the global they are read from (`random.randint`, `time`
# imported from time), not by bare name: names such as `time` or `sample` are too common to refuse on.
_NONDETERMINISTIC_SOURCES = {id(obj): name for name, obj in _NONDETERMINISTIC}
_QUERY_NAMES = {name.rsplit(".", 1)[1]: (name, tracing) for name, obj, tracing in _STATE_QUERIES
                if id(obj) not in _NONDETERMINISTIC_SOURCES}
_NONDETERMINISTIC_SOURCES.update({id(random): "random", id(time): "time"})


def _numpy_random(value) -> str | None:
    """numpy.random itself, or a function of it (a bound method of its global RandomState / a Generator): numpy's
    compiled functions make no profiler event, so these are found where the code names them."""
    if type(value) is types.ModuleType:
        return "numpy.random" if value.__name__ == "numpy.random" else None
    owner = getattr(value, "__self__", None)
    if owner is None or not type(owner).__module__.startswith("numpy.random"):
        return None
    return f"{type(owner).__name__}.{getattr(value, '__name__', '?')}"


def _random_source(fn) -> str | None:
    """The name of a C method of a random generator object (a `random.Random` the model made, numpy's RandomState /
    Generator, datetime's now / today), else None."""
    owner = getattr(fn, "__self__", None)
    if owner is None or type(owner) is types.ModuleType:
        return None
    if isinstance(owner, random.Random) or type(owner).__module__.startswith("numpy.random"):
        return f"{type(owner).__name__}.{getattr(fn, '__name__', '?')}"
    if owner in (datetime.datetime, datetime.date) and getattr(fn, "__name__", None) in ("now", "utcnow", "today"):
        return f"{owner.__name__}.{fn.__name__}"
    return None
_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) \
    or torch.fx._symbolic_trace.is_fx_tracing


def traced_or_compiled() -> bool:
    """jit tracing, torch.compile / torch.export, or fx symbolic tracing in progress: a guard's first term where the
    traced code asked about tracing."""
    return torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None or _fx_symbolic_tracing()

# Values that are code, not data: read by the forward, they stand for the same computation until reassigned.
_CODE_LIKE = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
              types.MethodWrapperType, types.WrapperDescriptorType, types.MethodDescriptorType,
              types.ClassMethodDescriptorType, type, functools.partial, enum.Enum, logging.Logger,
              staticmethod, classmethod, property, functools.cached_property, types.MemberDescriptorType,
              types.GetSetDescriptorType,
              torch.dtype, torch.device, torch.layout, torch.memory_format, torch._ops.OpOverloadPacket,
              torch._ops.OpOverload, type(functools.lru_cache(maxsize=None)(len)),
              *[t for t in (getattr(torch._C, "ScriptFunction", None),) if isinstance(t, type)])
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def plain(value, depth: int = 0) -> bool:
    """A scalar (bool, int, float, str, None, ...) or a tuple of them: compared by value."""
    if type(value) in _SCALARS:
        return True
    return type(value) in (tuple, torch.Size) and depth < 4 and all(plain(v, depth + 1) for v in value)


def plain_container(value, depth: int = 0) -> bool:
    """A list, dict or set holding plain values or code (a table of activation functions; nested up to 4 deep, at
    most 256 items each): its contents can be compared on every call against a copy taken at trace time (a copy
    holds the same functions and classes)."""
    if plain(value):
        return True
    if depth >= 4:
        return False
    if type(value) in (list, set, frozenset, tuple):
        return len(value) <= 256 and all(_item(v, depth + 1) for v in value)
    if type(value) is dict:
        return len(value) <= 256 and all(plain(k) and _item(v, depth + 1) for k, v in value.items())
    return False


def _item(value, depth: int) -> bool:
    # (not a module object: the trace-time copy of the container could not hold one)
    return plain_container(value, depth) or (isinstance(value, _CODE_LIKE) and type(value) is not types.ModuleType)


def guard_kind(value) -> str | None:
    """How a guard checks a value the traced code read: "code" (nothing to check), "value" (plain, or a plain
    container: its contents), "identity" (a tensor or a module: the same object; what it holds is read at run
    time), or None: an object whose contents the code may have read, which no guard can check."""
    if plain(value) or plain_container(value):
        return "value"
    if isinstance(value, (torch.Tensor, nn.Module)):
        return "identity"
    if isinstance(value, _CODE_LIKE) or type(value).__module__ == "typing":
        return "code"
    return _numpy_kind(value)


def _numpy_kind(value) -> str | None:
    """numpy's functions (ufuncs) are code; its scalars and dtypes are immutable (the same object, the same value);
    an array is not (a graph would hold a copy of its contents)."""
    cls = type(value)
    if cls.__module__ != "numpy":
        return None
    if cls.__name__ == "ufunc":
        return "code"
    if cls.__name__ != "ndarray" and hasattr(value, "dtype") and hasattr(value, "itemsize"):
        return "identity"
    return None


class WatchedCode:
    """The model code one trace ran: code object -> the globals it ran in, and the state queries it made."""

    def __init__(self):
        self.codes: dict = {}
        # (code, {free variable it reads: value when the call began}, source: the call's `self` or None, or in the
        # static scan the function whose cells were read), once per distinct set of values
        self.closure_calls: dict = {}
        self.queries: list[str] = []  # state queries no guard can cover ("<where> calls <query>()")
        self.value_reads: list[str] = []  # a real tensor's values read into Python while tracing
        self.lineage = TensorLineage()  # the real tensors torch computed while tracing (a graph constant's source)
        self.tracing_queries: list[str] = []  # tracing queries: covered by `traced_or_compiled()` in the guard
        self.default_reads: list[str] = []  # calls that used a mutable default argument
        self._defaults: dict = {}  # code -> its function's mutable defaults (_mutable_defaults), found once
        # (id(class), name) -> (class, name, value, where): what `super().name` found in the classes of `self`
        self.super_reads: dict = {}

    def _called(self, code, query) -> None:
        name, tracing = query
        (self.tracing_queries if tracing else self.queries).append(f"{_where(code)} calls {name}()")

    def check(self) -> list[tuple[dict, str, object, str]]:
        """Raise for what no guard can cover; else the module-level values to guard: (namespace, name, value at
        trace time, where it was read)."""
        for code in self.codes:
            if _calls_type(code):
                raise ClassInspectedError(f"{_where(code)} calls type()")
        if self.queries:
            raise GlobalStateError(f"{self.queries[0]}: the graph would keep its trace-time answer")
        if self.value_reads:
            raise GlobalStateError(f"{self.value_reads[0]} while tracing: the graph would keep the trace-time value")
        if self.lineage.writes:
            raise GlobalStateError(f"{self.lineage.writes[0]} while tracing: the write would happen once, at trace "
                                   "time, and never in the graph")
        if self.default_reads:
            raise GlobalStateError(f"{self.default_reads[0]}: the graph would keep what it held at trace time")
        reads: dict = {}
        for code, glb in self.codes.items():
            for ns, key, value in _module_level_reads(code, glb):
                numpy_random = _numpy_random(value)
                if numpy_random is not None:
                    raise GlobalStateError(f"{_where(code)} calls {numpy_random}: the graph would keep its "
                                           "trace-time draw")
                if ns is None or (id(ns), key) in reads:
                    continue  # (a module the code imports itself: code)
                kind = guard_kind(value)
                if kind is None:
                    raise GlobalStateError(f"{_where(code)} reads the module-level {key} "
                                           f"({type(value).__name__}), whose contents a guard cannot check")
                if kind != "code" or (type(value) is not types.ModuleType and _named_namespace(ns)):
                    # Code too (a function, a class, a dtype): the trace ran what it is now, and a name rebound
                    # later (`mymodel.ACT = other_fn`) would not reach the graph; guarded by identity (`CodeRef`).
                    # Not an imported module's name (rebinding `F` or `torch` is no way to change a model), nor the
                    # names of code generated at run time (a namedtuple's or dataclass's methods, exec'd).
                    reads[(id(ns), key)] = (ns, key, value, _where(code))
        for (cell, name, value, where) in self._closure_reads():
            reads.setdefault((id(cell), name), (cell, name, value, where))
        for key, read in self.super_reads.items():
            reads.setdefault(key, read)
        return list(reads.values())

    def _closure_reads(self) -> list:
        """(cell, name, value at trace time, where) for each closure variable bound before the trace that model
        code read, to guard like a module-level value; raises where no guard can check one."""
        parents = {c: code for code in self.codes for c in code.co_consts if isinstance(c, types.CodeType)}
        out = []
        for code, values, source in self.closure_calls.values():
            parent = parents.get(code)
            for name, value in values:
                if parent is not None and name in parent.co_cellvars:
                    continue  # a local of a function that ran in this trace: its cell was made during the call
                kind = guard_kind(value)
                if kind == "code" and type(value) is types.ModuleType:
                    continue  # (code is guarded by identity, as for module-level names: a `nonlocal` rebinding)
                if kind is None:
                    raise GlobalStateError(f"{_where(code)} reads the closure variable {name} "
                                           f"({type(value).__name__}), whose contents a guard cannot check")
                cells = _cells_holding(code, name, value, source)
                if not cells:
                    raise GlobalStateError(f"{_where(code)} reads the closure variable {name}, whose cell could "
                                           "not be found to guard it")
                out += [(cell, name, value, _where(code)) for cell in cells]
        return out

    def _record_static_closures(self, code) -> None:
        # Without a call to look at: what the cells of every function with this code hold now (the function is the
        # record's source: its cells are the ones to guard).
        names = _free_reads(code)
        for fn in _functions_of(code):
            values = []
            for n in names:
                held = _cell_contents(fn, code.co_freevars.index(n))
                if held is not _EMPTY:
                    values.append((n, held))
            values = tuple(values)
            self.closure_calls.setdefault((code, tuple(id(v) for _, v in values), id(fn)), (code, values, fn))

    def _record_defaults(self, frame) -> None:
        code = frame.f_code
        defaults = self._defaults.get(code)
        if defaults is None:
            defaults = self._defaults[code] = _mutable_defaults(frame)
        if defaults:
            f_locals = frame.f_locals
            for name, value in defaults:
                if f_locals.get(name, _EMPTY) is value:
                    self.default_reads.append(f"{_where(code)} uses its mutable default {name} "
                                              f"({type(value).__name__})")

    def _record_super(self, code, f_locals: dict, glb: dict, owner) -> None:
        """What `super().name` / `super(Class, self).name` in `code` finds for the instance or class `owner`: the
        method a base class defines, which the trace ran and a guard must see replaced (`Base.post = fn`). These
        lookups go through the class's MRO, not through the instance, so the read-recording modules never see them."""
        mro = (owner if isinstance(owner, type) else type(owner)).__mro__
        for source, name in _super_attrs(code):
            start = f_locals.get("__class__") if source is None else f_locals.get(source, glb.get(source))
            if not isinstance(start, type) or start not in mro:
                continue
            found = next((c for c in mro[mro.index(start) + 1:] if name in vars(c)), None)
            if found is None or _torch_class(found) or (id(found), name) in self.super_reads:
                continue
            value = vars(found)[name]
            if guard_kind(value) is not None:
                self.super_reads[(id(found), name)] = (found, name, value, _where(code))

    def _record_closure(self, frame) -> None:
        code = frame.f_code
        if "__class__" in code.co_freevars or "super" in code.co_names:
            f_locals = frame.f_locals
            first = f_locals.get(code.co_varnames[0], _EMPTY) if code.co_argcount else _EMPTY
            if first is not _EMPTY and _super_attrs(code):
                self._record_super(code, f_locals, frame.f_globals, first)
        names = _free_reads(code)
        if not names:
            return
        f_locals = frame.f_locals
        values = tuple((n, f_locals[n]) for n in names if n in f_locals)
        owner = f_locals.get("self") if code.co_argcount else None
        key = (code, tuple(id(v) for _, v in values), id(owner))
        if key not in self.closure_calls:
            self.closure_calls[key] = (code, values, owner)


def _where(code) -> str:
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


_DEREF_OPS = frozenset({"LOAD_DEREF", "LOAD_CLASSDEREF"})


@functools.lru_cache(maxsize=4096)
def _free_reads(code) -> tuple:
    """The free (closure) variables `code` loads, but `__class__` (the cell zero-argument `super()` reads: a
    class, which is code)."""
    if not code.co_freevars:
        return ()
    free = set(code.co_freevars) - {"__class__"}
    return tuple(dict.fromkeys(ins.argval for ins in dis.get_instructions(code)
                               if ins.opname in _DEREF_OPS and ins.argval in free))


_EMPTY = object()  # what `_cell_contents` reads in an empty cell
# What a guard or a guard helper reads for an attribute a module no longer has (the guards' `MISSING`).
MISSING = object()
# Instructions that carry no operand of a super() lookup (call set-up and the interpreter's own bookkeeping).
_SUPER_SKIP = frozenset({"CACHE", "PRECALL", "PUSH_NULL", "NOP", "EXTENDED_ARG", "RESUME", "KW_NAMES"})


@functools.lru_cache(maxsize=4096)
def _super_attrs(code) -> tuple:
    """(class, name) for each `super().name` (class None: the `__class__` cell) and `super(Class, obj).name` (class:
    the global or free variable `Class`) in `code`: 3.12's LOAD_SUPER_ATTR, or 3.11's call of `super` followed by an
    attribute load."""
    if "super" not in code.co_names:
        return ()
    found = []
    window: list = []
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in _SUPER_SKIP:
            continue
        if op == "LOAD_SUPER_ATTR" and len(window) >= 3:
            cls = window[-2]
            found.append((None if cls.argval == "__class__" else cls.argval, ins.argval))
        elif op in ("LOAD_ATTR", "LOAD_METHOD") and window and window[-1].opname == "CALL":
            call = window[-1]
            if call.arg == 0 and len(window) >= 2 and _loads_super(window[-2]):
                found.append((None, ins.argval))
            elif (call.arg == 2 and len(window) >= 4 and _loads_super(window[-4])
                  and window[-3].opname in ("LOAD_GLOBAL", "LOAD_DEREF", "LOAD_CLASSDEREF")):
                found.append((window[-3].argval, ins.argval))
        window = (window + [ins])[-4:]
    return tuple(dict.fromkeys(found))


def _function_of(value):
    """The function behind a class attribute or code value: itself, a bound / static / class method's, a property's
    getter."""
    return getattr(value, "__func__", None) or getattr(value, "fget", None) or value


def _code_of(value):
    """The code a class attribute runs when called or read."""
    return getattr(_function_of(value), "__code__", None)


def _loads_super(ins) -> bool:
    return ins.opname == "LOAD_GLOBAL" and ins.argval == "super"


def _functions_of(code) -> list:
    """Every live function object with this code and a closure."""
    return [r for r in gc.get_referrers(code)
            if type(r) is types.FunctionType and r.__code__ is code and r.__closure__]


def _cell_contents(fn, index: int):
    closure = fn.__closure__ or ()
    try:
        return closure[index].cell_contents if index < len(closure) else _EMPTY
    except ValueError:  # an empty cell
        return _EMPTY


def _cells_holding(code, name: str, value, source) -> list:
    """The closure cells of the functions with this code whose variable `name` holds `value` (the very object):
    the source function itself (static scan), else found through the class of the call's `self` (a method of a
    class a factory made), else among every function object with this code (more than one may qualify: all of them
    are guarded; a guard too many can only miss)."""
    index = code.co_freevars.index(name)
    functions = [source] if type(source) is types.FunctionType else []
    if source is not None and not functions:
        functions = _methods_with_code(source, code)
    if not functions:
        functions = _functions_of(code)
    cells = {}
    for fn in functions:
        if _cell_contents(fn, index) is value:
            cells[id(fn.__closure__[index])] = fn.__closure__[index]
    return list(cells.values())


def _methods_with_code(owner, code) -> list:
    """The functions with this code among the methods (static and class methods, property getters) of `owner`'s
    class and its bases."""
    functions = []
    for cls in type(owner).__mro__:
        if _torch_class(cls):
            continue  # (nn.Module's own methods are torch's code, never the model code looked for)
        for attr in vars(cls).values():
            for fn in (attr, getattr(attr, "__func__", None), getattr(attr, "fget", None)):
                if getattr(fn, "__code__", None) is code:
                    functions.append(fn)
    return functions


# Default values a call that leaves the argument out shares with every other such call, and that can be edited in place.
MUTABLE_DEFAULTS = (list, dict, set, bytearray)


def _mutable_defaults(frame) -> tuple:
    """(parameter, default) for each default of the called function that is a mutable object (a list, dict or set;
    an object with contents): a call that leaves the argument out reads what the default holds *now*, which a trace
    would keep. The function is found through the `self` of the call or of its caller (a method, a static method
    called from one) or by name in its globals; a function found neither way (made inside another, whose defaults
    are then made during the traced call itself) has none recorded."""
    code = frame.f_code
    functions = []
    for f in (frame, frame.f_back):
        owner = f.f_locals.get("self") if f is not None and f.f_code.co_argcount else None
        if owner is not None:
            functions = _methods_with_code(owner, code)
            if functions:
                break
    if not functions:
        fn = frame.f_globals.get(code.co_name)
        functions = [fn] if getattr(fn, "__code__", None) is code else []
    out = []
    positional = code.co_varnames[:code.co_argcount]
    for fn in functions:
        defaults = fn.__defaults__ or ()
        named = list(zip(positional[len(positional) - len(defaults):], defaults))
        named += list((fn.__kwdefaults__ or {}).items())
        out += [(name, value) for name, value in named if type(value) in MUTABLE_DEFAULTS or guard_kind(value) is None]
    return tuple(out)


_STORE_OPS = frozenset({"STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "STORE_DEREF"})


@functools.lru_cache(maxsize=4096)
def _import_loads(code) -> tuple:
    """((module name, imported name or None), attributes) for each name an import statement inside `code` binds
    that the code then reads attributes on, as `_global_loads` gives them for globals: `import config` in a
    forward, then `config.GAIN` (the name is local, the module and its values are not)."""
    instructions = list(dis.get_instructions(code))
    bound = {}
    for i, ins in enumerate(instructions):
        if ins.opname != "IMPORT_NAME":
            continue
        fromlist = instructions[i - 1].argval if i and instructions[i - 1].opname == "LOAD_CONST" else None
        j = i + 1
        if j < len(instructions) and instructions[j].opname in _STORE_OPS:
            # `import a.b` binds the package a; `import a as x` binds a
            bound[instructions[j].argval] = (ins.argval.split(".")[0], None)
        path = ins.argval if fromlist else None
        while j + 1 < len(instructions) and instructions[j].opname == "IMPORT_FROM" \
                and instructions[j + 1].opname in _STORE_OPS:
            # `from a import b as x`: a's b; `import a.b as x`: the module a.b itself
            bound[instructions[j + 1].argval] = (ins.argval, instructions[j].argval) if path else (ins.argval, None)
            j += 2
    if not bound:
        return ()
    out = []
    for i, ins in enumerate(instructions):
        if (ins.opname.startswith("LOAD_FAST") or ins.opname in ("LOAD_DEREF", "LOAD_NAME")) \
                and ins.argval in bound:
            attrs = []
            for nxt in instructions[i + 1:i + 1 + _CHAIN]:
                if nxt.opname not in _ATTRIBUTE_OPS:
                    break
                attrs.append(nxt.argval)
            out.append((bound[ins.argval], tuple(attrs)))
    return tuple(dict.fromkeys(out))


def _module_level_reads(code, glb: dict):
    """(namespace, name, value) of every module-level value `code` reads: its globals (`_read`) and what it reads
    on modules it imports itself (the imported module or name is code; what is read on it is not)."""
    for name, attrs in _global_loads(code):
        yield from _read(glb, name, attrs)
    for (module, name), attrs in _import_loads(code):
        imported = sys.modules.get(module)
        if imported is None or _torch_module(imported):
            continue
        if name is None:
            # `import config`: the module itself is code; what is read on it is in its namespace
            yield (None, module, imported)
            yield from _read({module: imported}, module, attrs)[1:]
        else:
            # `from config import SETTINGS`: a module-level value of config, read through its namespace
            yield from _read(vars(imported), name, attrs)


def _read(glb: dict, name: str, attrs: tuple):
    """(namespace, name, value) of a global load: the global itself, and for each attribute read on it in turn
    while the value is a module (`config.FLAG`, `os.environ`) or a class used as a namespace (`Config.GAIN`), the
    attribute in that module's namespace or the dict of the class that defines it. Builtins are not module-level
    values of the model, nor is what torch and this package hold (their settings are not the model's; the dispatch
    of this package reads them itself)."""
    if name not in glb:
        return []
    value = glb[name]
    out = [(glb, name, value)]
    for attr in attrs:
        ns = _namespace_of(value, attr)
        if ns is None:
            break
        value = vars(ns)[attr] if isinstance(ns, (type, types.FunctionType)) else ns[attr]
        out.append((ns, attr, value))
    return out


def _namespace_of(value, attr: str):
    """Where an attribute read on `value` finds `attr`: a model module's dict, or the first class in a model
    class's MRO that defines it (the class itself: its dict is read through it); None for anything else (torch's
    modules and classes, builtins, enums, instances)."""
    if type(value) is types.ModuleType:
        return vars(value) if attr in vars(value) and not _torch_module(value) else None
    if isinstance(value, type) and not _torch_class(value):
        for cls in value.__mro__:
            if attr in vars(cls):
                return cls if not _torch_class(cls) else None
    if type(value) is types.FunctionType and not attr.startswith("__") and attr in vars(value) \
            and model_code(value.__code__):
        return value  # an attribute set on a model function (`helper.gain = 2.0`): the function's own dict
    return None


def _torch_class(cls: type) -> bool:
    name = getattr(cls, "__module__", None) or ""
    return (name in ("builtins", "torch", "fusedconv") or name.startswith(("torch.", "fusedconv."))
            or isinstance(cls, enum.EnumMeta))


def _torch_module(module: types.ModuleType) -> bool:
    name = module.__name__
    return name == "torch" or name.startswith(("torch.", "fusedconv.")) or name == "fusedconv"


def reachable_code(functions, depth: int = 3) -> dict:
    """The code of `functions` (methods, static and class methods, properties), of the functions nested in them and
    of the module-level functions they name, `depth` calls deep, with the globals each runs in: what a forward may
    run, found without running it."""
    seen: dict = {}
    todo = []
    for fn in functions:
        for f in (getattr(fn, "__func__", fn), getattr(fn, "fget", None)):
            if getattr(f, "__code__", None) is not None:
                todo.append((f.__code__, getattr(f, "__globals__", {}), 0))
    while todo:
        code, glb, level = todo.pop()
        if code in seen or not model_code(code):
            continue
        seen[code] = glb
        todo += [(c, glb, level) for c in code.co_consts if hasattr(c, "co_names")]
        if level < depth:
            for name in code.co_names:
                target = glb.get(name)
                if callable(target) and getattr(target, "__code__", None) is not None:
                    todo.append((target.__code__, getattr(target, "__globals__", {}), level + 1))
    return seen


# Tensor methods that turn a tensor's values into Python values (or branch on them): evaluated while tracing on a real
# tensor (a module-level tensor, a plain tensor attribute), they bake its trace-time values into the graph, which an
# in-place edit would then not reach.
_VALUE_READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
                          "__array__"})


# torch functions whose result is a random draw (called with no traced argument, fx runs them once, at trace time).
_RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
    "log_normal_", "bernoulli_", "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout", "dropout1d", "dropout2d", "dropout3d", "rrelu", "rrelu_", "fractional_max_pool2d",
    "fractional_max_pool3d", "gumbel_softmax"})
# Tensor methods that write into a tensor in place besides the `name_` ones.
_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                               "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                               "__irshift__", "__imatmul__"})


def _model_caller() -> str:
    """Where the innermost model code on the stack is (for a message)."""
    frame = sys._getframe(1)
    while frame is not None and not model_code(frame.f_code):
        frame = frame.f_back
    return _where(frame.f_code) if frame is not None else "the forward"


class TensorLineage:
    """What torch computed on real tensors while a forward was traced (fx's Proxies record the ops on the call's
    values; these run once, at trace time). A tensor computed from plain values only (`torch.tensor(0.5)`,
    `torch.zeros(3)`) is the same on every call: a graph may hold it. One drawn at random, or computed from a real
    tensor the trace did not compute itself (a plain tensor attribute, a module-level tensor), is not: `computed`
    maps its id to the reason (the tensor kept, so the id stays its own). `writes` lists in-place writes into such
    real tensors (module state changed once, at trace time)."""

    def __init__(self):
        self.pure: dict[int, torch.Tensor] = {}
        self.computed: dict[int, tuple[torch.Tensor, str]] = {}
        self.writes: list[str] = []
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real tensor written, its values before)

    @staticmethod
    def _written(name: str, args, kwargs):
        """The tensor an op writes into in place (`t.add_(...)`, `t[i] = v`, `out=`), or None."""
        if "out" in kwargs:
            return kwargs["out"]
        if name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_")):
            return args[0] if args else None
        return None

    def before(self, name: str, args, kwargs) -> None:
        """Before an op runs: keep the values of a real tensor it is about to write into (`restore`)."""
        target = self._written(name, args, kwargs)
        if isinstance(target, torch.Tensor) and id(target) not in self.pure and not any(
                isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
            self.saved.append((target, target.detach().clone()))

    def restore(self) -> None:
        """Undo the writes into real tensors the trace made (the trace then fails: `writes`), newest first."""
        with torch.no_grad():
            for target, values in reversed(self.saved):
                target.copy_(values)
        self.saved.clear()

    def record(self, func, name: str, args, kwargs, out) -> None:
        leaves = pytree.tree_leaves((args, kwargs))
        if any(isinstance(a, fx.Proxy) for a in leaves):
            return  # a traced op: the graph runs it on every call
        inputs = [a for a in leaves if isinstance(a, torch.Tensor)]
        state = [a for a in inputs if id(a) not in self.pure]
        target = self._written(name, args, kwargs)
        in_place = isinstance(target, torch.Tensor)
        if in_place and id(target) not in self.pure:
            self.writes.append(f"{_model_caller()} writes into a tensor in place ({name})")
        reason = (f"a random draw ({name})" if name in _RANDOM_OPS else
                  f"a tensor the trace did not compute ({name} on a {tuple(state[0].shape)} tensor)" if state else None)
        for o in pytree.tree_leaves(out):
            if not isinstance(o, torch.Tensor):
                continue
            if any(o is a for a in inputs):  # an input itself (`t.contiguous()`, an in-place op's result)
                if in_place and reason is not None and self.pure.pop(id(o), None) is not None:
                    self.computed[id(o)] = (o, reason)  # a plain-valued tensor written from real ones
                continue
            if reason is None:
                self.pure[id(o)] = o
            else:
                self.pure.pop(id(o), None)
                self.computed[id(o)] = (o, reason)


class _TensorValueReads(TorchFunctionMode):
    """Around a trace: records model code reading a real tensor's values into Python (`t.item()`, `if t > 0:`) in
    `watched.value_reads` (fx's Proxies are not tensors and never get here with these names), and what torch
    computed on real tensors in `watched.lineage` (`TensorLineage`)."""

    def __init__(self, watched: "WatchedCode"):
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None) or ""
        if name in _VALUE_READS and args and isinstance(args[0], torch.Tensor):
            caller = sys._getframe(1).f_code
            if model_code(caller):
                self.watched.value_reads.append(f"{_where(caller)} reads a tensor's value ({func.__name__})")
        self.watched.lineage.before(name, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, (torch.Tensor, tuple, list)) or name in _IN_PLACE_DUNDERS:
            self.watched.lineage.record(func, name, args, kwargs, out)
        return out


@contextlib.contextmanager
def watch(modules: list[nn.Module]):
    """Around a trace of modules[0] (through the others): yields the WatchedCode the trace fills."""
    watched = WatchedCode()
    if sys.getprofile() is not None:
        # Another profiler holds the hook: what the modules' classes can reach, scanned without running it.
        with _TensorValueReads(watched):
            yield watched
        classes = {cls for m in modules for cls in type(m).__mro__ if cls.__module__ != "builtins"}
        watched.codes = reachable_code([fn for cls in classes for fn in vars(cls).values()])
        for code in watched.codes:
            for name in code.co_names:
                if name in _QUERY_NAMES:
                    watched._called(code, _QUERY_NAMES[name])
            glb = watched.codes[code]
            for name, attrs in _global_loads(code):
                source = _NONDETERMINISTIC_SOURCES.get(id(glb.get(name)))
                if source is not None:
                    watched._called(code, (".".join((source, *attrs[:1])), False))
                # (numpy.random is found by check() for either path)
            if _free_reads(code):
                watched._record_static_closures(code)
            if _super_attrs(code):
                for m in modules:  # super() as each module's class would resolve it, from the class defining `code`
                    for cls in type(m).__mro__:
                        if any(_code_of(v) is code for v in vars(cls).values()):
                            watched._record_super(code, {"__class__": cls}, glb, m)
        return

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code in _QUERY_CODES and frame.f_back is not None and model_code(frame.f_back.f_code):
                watched._called(frame.f_back.f_code, _QUERY_CODES[code])
            elif model_code(code):
                if code not in watched.codes:
                    watched.codes[code] = frame.f_globals
                if code.co_freevars or "super" in code.co_names:
                    watched._record_closure(frame)
                if code.co_argcount or code.co_kwonlyargcount:
                    watched._record_defaults(frame)
        elif event == "c_call" and model_code(frame.f_code):
            if id(arg) in _QUERY_BUILTINS:
                watched._called(frame.f_code, _QUERY_BUILTINS[id(arg)])
            else:
                source = _random_source(arg)
                if source is not None:
                    watched._called(frame.f_code, (source, False))

    # No garbage collection while the hook runs: gc callbacks (hypothesis installs one that times collections) and
    # finalizers are not the forward's code, and their reads would become guard terms that fail on every call.
    collecting = gc.isenabled()
    gc.disable()
    sys.setprofile(profile)
    try:
        with _TensorValueReads(watched):
            yield watched
    finally:
        sys.setprofile(None)
        if collecting:
            gc.enable()



def same_plain(a, b) -> bool:
    """`a == b` for plain values and plain containers, types included (1, 1.0 and True are not the same flag)."""
    if type(a) is not type(b):
        return False
    if type(a) in (list, tuple, torch.Size):
        return len(a) == len(b) and all(same_plain(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(same_plain(v, b[k]) for k, v in a.items())
    return a == b


def same_children(modules: dict, children: tuple) -> bool:
    """`modules` (a module's `_modules`) holds exactly `children`: the same objects, in the same order (what a forward
    iterating them, nn.Sequential's, ran over), none added, removed, replaced or moved. Compared by identity."""
    return len(modules) == len(children) and all(map(operator.is_, modules.values(), children))


class Namespace:
    """A module's globals as a guard reads them (`ns.d.get(name, MISSING)`): the same dict after copy.deepcopy (a
    copy would never change again, and the guard would pass forever), and the module's dict again, found by its
    name, after pickling."""

    __slots__ = ("d",)

    def __init__(self, d: dict):
        self.d = d

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        name = self.d.get("__name__")
        module = sys.modules.get(name) if isinstance(name, str) else None
        if module is None or vars(module) is not self.d:
            raise TypeError(f"cannot pickle a guard on the globals of {name!r}: they are not an importable module's")
        return (module_namespace, (name,))


def module_namespace(name: str) -> Namespace:
    """The Namespace of the module `name` (imported if need be): how a pickled guard finds its globals again."""
    import importlib

    return Namespace(vars(importlib.import_module(name)))


class ClosureCell:
    """A closure cell as a guard reads it, through the same spelling as a module's globals (`c.d.get(name,
    MISSING)`: its contents, MISSING when empty). The same cell after copy.deepcopy (a function's cells are not
    copied with a model either); a pickled guard cannot find the cell again and reads MISSING: that guard then
    always misses and the call takes the exact fallback."""

    __slots__ = ("cell",)

    def __init__(self, cell):
        self.cell = cell

    @property
    def d(self) -> "ClosureCell":
        return self

    def get(self, name: str, default=None):
        try:
            return self.cell.cell_contents
        except ValueError:
            return default

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (lost_cell, ())


def lost_cell() -> ClosureCell:
    """An empty cell: what an unpickled closure guard reads (its cell stayed in the process that pickled it)."""
    return ClosureCell(types.CellType())


# True while Dynamo traces (torch.compile, strict torch.export); in eager a bare `return False` (fusedconv/cpu.py).
_compiling = getattr(torch.compiler, "is_dynamo_compiling", None) or torch.compiler.is_compiling


class ClassNamespace:
    """A class used as a namespace (`Config.GAIN`) as a guard reads it: `c.d.get(name, MISSING)` over the class's
    own dict, as it is on every call. The same class after copy.deepcopy; pickled by reference to the class.

    While Dynamo traces (torch.compile, strict torch.export), `d` is this object, whose `get` / `in` read the class's own dict only through
    `name in cls.__dict__` and the class attribute itself (`getattr`): Dynamo refuses every other read of a class's
    `__dict__` (a mappingproxy) once the traced code has written to any dict ("mapping proxy affected by dictionary
    mutation": a model filling a cache in its forward broke `fullgraph=True`), and guards what `getattr` reads
    itself. For a plain value, a function or a property that is the dict's entry; for a staticmethod or classmethod
    entry it is not, and the guard misses: such a call takes the exact fallback."""

    __slots__ = ("cls",)

    def __init__(self, cls: type):
        self.cls = cls

    @property
    def d(self):
        if _compiling():
            return self
        return vars(self.cls)

    def get(self, name: str, default=None):
        if name not in self.cls.__dict__:
            return default
        return getattr(self.cls, name)

    def __contains__(self, name: str) -> bool:
        return name in self.cls.__dict__

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (ClassNamespace, (self.cls,))


class FunctionNamespace:
    """The attributes set on a model function (`helper.gain = 2.0`, read as `helper.gain`) as a guard reads them:
    `f.d.get(name, MISSING)` over the function's own dict. The same function after copy.deepcopy; pickled by
    reference where the function can be imported by its module and qualified name, else (a function made inside
    another) as an empty namespace: that guard then always misses and the call takes the exact fallback."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    @property
    def d(self) -> dict:
        return vars(self.fn) if self.fn is not None else {}

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (FunctionNamespace, (self.fn if _pickles(self.fn) else None,))


def _pickles(obj) -> bool:
    """Whether pickle can carry `obj` (a function or class: by reference, found again by its module and qualified
    name; not a lambda or a function made inside another)."""
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - whatever pickle refuses
        return False
    return True


def _named_namespace(ns) -> bool:
    """A class, a function, or the globals of a module imported under its name (not the namespace of generated
    code: a namedtuple's `__new__` runs in a dict of its own)."""
    if not isinstance(ns, dict):
        return True
    name = ns.get("__name__")
    module = sys.modules.get(name) if isinstance(name, str) else None
    return module is not None and vars(module) is ns


class CodeRef:
    """A function, class or other code a guard compares by identity (`e[k].obj`, the value a module-level name held
    at trace time): itself after copy.deepcopy; pickled by reference where pickle finds it again by name (a
    module-level function or class), else (a lambda, a function made inside another) as a reference to nothing:
    that guard then always misses and the call takes the exact fallback."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (CodeRef, (self.obj,)) if _pickles(self.obj) else (lost_code, ())

    def defaults(self):
        """The plain default values the function holds now (`plain_defaults`), for a guard to compare."""
        return plain_defaults(self.obj)


def plain_defaults(value):
    """(positional defaults, sorted keyword-only defaults) of the function behind `value` (itself, a bound, static or
    class method's, a property's getter) when it has some and all are plain values, else None. The trace used the
    defaults its calls left out; `fn.__defaults__ = (3.0,)` afterwards must not leave the graph behind."""
    fn = _function_of(value)
    if type(fn) is not types.FunctionType:
        return None
    positional, keyword = fn.__defaults__ or (), fn.__kwdefaults__ or {}
    if not positional and not keyword:
        return None
    snapshot = (positional, tuple(sorted(keyword.items())))
    return snapshot if plain(snapshot) else None


class ClassAttrRef(CodeRef):
    """A method, property or other object a class defines (`vars(owner)[name]`), compared by identity like CodeRef;
    pickled as (owner, name), so it is found again wherever the class is, whatever pickle makes of the object itself
    (a property or staticmethod has no name of its own to pickle by), provided the class still holds it when
    pickled; else as a reference to nothing (that guard then misses, the call takes the exact fallback)."""

    __slots__ = ("owner", "name")

    def __init__(self, owner: type, name: str):
        super().__init__(vars(owner)[name])
        self.owner = owner
        self.name = name

    def __reduce__(self):
        if vars(self.owner).get(self.name, self) is self.obj and _pickles(self.owner):
            return (ClassAttrRef, (self.owner, self.name))
        return (lost_code, ())


def lost_code() -> CodeRef:
    """What an unpickled guard on code pickle could not carry compares against: a fresh object, never the same."""
    return CodeRef(object())


def guard_namespace(ns):
    """The object a guard reads a recorded value through (WatchedCode.check's namespaces: a module's globals, a
    class, a function's attributes, a closure cell)."""
    if isinstance(ns, type):
        return ClassNamespace(ns)
    if isinstance(ns, types.FunctionType):
        return FunctionNamespace(ns)
    if isinstance(ns, types.CellType):
        return ClosureCell(ns)
    return Namespace(ns)
