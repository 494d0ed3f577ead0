"""Guarded specializations: a rewritten block runs a traced graph only for calls that match its trace.

A rewritten block stays the same object, of a subclass of its own class (`isinstance`, its other methods,
attributes and hooks keep working) made by `guarded_class`. Its forward hands the call to the block's
`GuardTable`, whose generated `dispatch` checks each specialization's guard (`patterns.build_guard`: the call
pattern of the parameters and the attributes the traced forward read) and runs the first one that holds:
either the rewritten graph's code (run with `self` = the block, so it calls the block's own children) or the
class's own forward over the swapped children. A call no guard accepts takes the exact fallback: the class's
own forward with every changed child bound to its role (`roles.py`), i.e. what the original model computes.

The table is rebuilt, not shared, by `copy.deepcopy` (objects guarded by identity are the copies) and pickles
as source text plus an import block, like an fx GraphModule, so `torch.save` / `torch.load` keep the block.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn as nn
from torch.fx.graph_module import _format_import_block
from torch.package import sys_importer

from fusedconv.graph.folded_sources import folded_unchanged
from fusedconv.graph.inlined_containers import runs_as_written, unchanged_subtree
from fusedconv.graph.model_code import MISSING as _MISSING, same_children, same_plain
from fusedconv.graph.patterns import Param, forward_params
from fusedconv.graph.roles import substitute
from fusedconv.model_reach import escape, instance_dict
from fusedconv.scripting import refuse_script

_GUARDS = "_fusedconv_guards"
_CLASSES: dict[type, type] = {}


class GuardMiss(RuntimeError):
    """A call to a re-parameterized block that its merged weights cannot compute (e.g. a flag flipped after
    reparameterize)."""


class Specialization:
    """One guarded entry: a guard expression and what runs when it holds (graph source, or None for the
    class's own forward over the block's current children)."""

    # Facts about the graph for owned_input.OwnedInputSequential (set by scope_rewrite): whether its code takes
    # the `_fusedconv_input_owned` parameter, and the path of the module whose result it returns (private_residual).
    owned_input = False
    fresh_output = None

    def __init__(self, guard: str, described: list[str], src: str | None = None, fx_globals: dict | None = None,
                 checks: list[tuple[str, str]] | None = None, pattern=None):
        self.guard = guard
        self.described = list(described)
        self.checks = list(checks or [])  # (term, what it checks in words): to say why a call missed
        self.pattern = pattern  # the CallPattern it was traced with (a later pass re-traces it)
        self.src = src
        self.fx_globals = fx_globals
        self.fn = None
        if src is not None:
            self._compile()

    def _compile(self) -> None:
        namespace = dict(self.fx_globals)
        exec(compile(self.src, "<fusedconv specialization>", "exec"), namespace)  # noqa: S102 - fx codegen
        self.fn = namespace["forward"]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["fn"] = None
        if self.src is not None:  # globals are objects: pickle them as the imports that name them
            state["fx_globals"] = None
            state["import_block"] = _format_import_block(self.fx_globals, sys_importer)
        return state

    def __setstate__(self, state):
        block = state.pop("import_block", None)
        self.__dict__.update(state)
        if self.src is not None:
            if self.fx_globals is None:
                namespace: dict = {}
                exec(compile(block, "<fusedconv imports>", "exec"), namespace)  # noqa: S102
                self.fx_globals = namespace
            self._compile()


class GuardTable:
    """Per block: its specializations, the objects they compare by identity, the roles of the fallback.

    `kind` is "convert" (the fallback is the class's own forward over role children) or "reparam" (branches
    were merged away, so no forward of the block computes a call its guards reject: it raises `GuardMiss`).
    A convert table built over a reparam one keeps it as `base`: its fallback runs the base's specialization
    for the call over role children, or raises as the base would.
    """

    _deep_copied = ("expect", "roles", "base")  # state a deep copy copies (the rest is shared or rebuilt)

    def __init__(self, original: type, params: list[Param], entries: list[Specialization], expect: list,
                 roles: list[tuple[str, nn.Module, nn.Module]], kind: str = "convert", scope: str = "",
                 base: "GuardTable | None" = None, merged: tuple = ()):
        self.original = original
        self.params = list(params)
        self.entries = list(entries)
        self.expect = expect
        self.roles = list(roles)  # (dotted child path, object installed there, role for the fallback)
        self.kind = kind
        self.scope = scope
        self.base = base
        self.merged = tuple(merged)  # reparam: the merged convs' names
        self.fallback_calls = 0   # how often the fallback ran (tests and the report read it)
        self._compile()

    def describe(self) -> list[str]:
        return ["; ".join(s.described) or "no assumptions" for s in self.entries]

    # ------------------------------------------------------------------ dispatch
    def _call_args(self, keyword_only: bool) -> str:
        parts = []
        for i, p in enumerate(self.params):
            parts.append(f"{p.name}=a{i}" if (keyword_only and p.keyword_only) else f"a{i}")
        return ", ".join(["self"] + parts)

    def _guard_names(self) -> dict:
        """What the guard expressions read besides the block and the call's arguments (dispatch, select and
        miss_error evaluate the same terms)."""
        return {"e": self.expect, "Tensor": torch.Tensor, "MISSING": _MISSING, "same_plain": same_plain,
                "same_children": same_children, "unchanged_subtree": unchanged_subtree,
                "runs_as_written": runs_as_written, "folded_unchanged": folded_unchanged}

    def _compile(self) -> None:
        args = ", ".join(f"a{i}" for i in range(len(self.params)))
        positional, by_kind = self._call_args(False), self._call_args(True)
        # (`instance_dict`: an armed root's dispatch is no reach into it, fusedconv/graph/reach.py)
        lines = [f"def dispatch(self{', ' if args else ''}{args}):",
                 "    d = instance_dict(self)", "    m = d['_modules']"]
        namespace = {**self._guard_names(), "fallback": self.fallback, "original": self.original.forward,
                     "instance_dict": instance_dict}
        for k, s in enumerate(self.entries):
            lines.append(f"    if {s.guard}:")
            if s.fn is None:
                lines.append(f"        return original({by_kind})")
            else:
                namespace[f"s{k}"] = s.fn
                lines.append(f"        return s{k}({positional})")
        lines.append(f"    return fallback({by_kind})")
        lines += [f"def select(self{', ' if args else ''}{args}):", "    d = instance_dict(self)",
                  "    m = d['_modules']"]
        lines += [f"    if {s.guard}:\n        return {k}" for k, s in enumerate(self.entries)]
        lines.append("    return -1")
        exec(compile("\n".join(lines), "<fusedconv dispatch>", "exec"), namespace)  # noqa: S102
        self.dispatch = namespace["dispatch"]
        self.select = namespace["select"]  # the index of the specialization a call takes, -1 for none

    def _positional(self, args: tuple, kwargs: dict) -> list:
        return list(args) + [kwargs[p.name] for p in self.params[len(args):]]

    def count_fallback(self) -> None:
        """One more call took the fallback (`fallback_calls`), except while torch.compile traces: Dynamo would
        replay the increment and guard on the count, so every later call would miss that guard and compile the
        model again (measured: each call of a compiled mobilenet_v2, until Dynamo's recompile limit)."""
        if not torch.compiler.is_compiling():
            self.fallback_calls += 1

    def fallback(self, block: nn.Module, *args, **kwargs):
        """The class's own forward (or the base table's specialization), over the block's children with each
        changed one bound to its role; a reparam table raises GuardMiss instead."""
        if self.kind == "reparam":
            raise self.miss_error(block, self._positional(args, kwargs))
        escape(block)  # the block's own forward runs: user code over its children (graph/reach.py)
        self.count_fallback()
        if not self.roles and self.base is None:
            # No child stands in for another (a whole-model table, graph/flat.py): the block's own forward as is.
            return self.original.forward(block, *args, **kwargs)
        view = object.__new__(self.original)
        view.__dict__.update(block.__dict__)
        modules = dict(block.__dict__["_modules"])
        for path, installed, role in self.roles:
            substitute(modules, path, installed, role)
        view.__dict__["_modules"] = modules
        if self.base is None:
            return self.original.forward(view, *args, **kwargs)
        positional = self._positional(args, kwargs)
        k = self.base.select(block, *positional)  # the base's guards read the block as it is
        if k < 0:
            raise self.base.miss_error(block, positional)
        view.__dict__[_GUARDS] = self.base
        return self.base.entries[k].fn(view, *positional)

    def miss_error(self, block: nn.Module, args: list) -> "GuardMiss":
        """The error for a call no specialization of a reparam table accepts, naming what changed."""
        namespace = {**self._guard_names(), "d": block.__dict__, "m": block.__dict__["_modules"],
                     **{f"a{i}": a for i, a in enumerate(args)}}
        failed = []
        for s in self.entries:
            for term, label in s.checks:
                try:
                    ok = eval(term, namespace)  # noqa: S307 - a guard term this module generated
                except Exception:  # noqa: BLE001 - e.g. a nested submodule is gone: the check fails
                    ok = False
                if not ok:
                    failed.append(label)
                    break
        cls = self.original.__name__
        return GuardMiss(
            f"{cls} at {self.scope or '<root>'!r}: reparameterize merged its branches into "
            f"{', '.join(self.merged) or 'one conv'} for calls where " + " | ".join(
                f"[{'; '.join(s.described) or 'no assumptions'}]" for s in self.entries)
            + f"; this call breaks: {'; '.join(dict.fromkeys(failed)) or 'the guard'}. The merged weights cannot "
            "compute what the block's own forward would compute now (its branches are gone): re-parameterize "
            "the original model after making this change.")

    # ------------------------------------------------------------------ copying
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["dispatch"], state["select"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compile()

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        state = self.__getstate__()
        state["entries"] = list(self.entries)  # immutable once built: shared
        for k in self._deep_copied:
            state[k] = copy.deepcopy(state[k], memo)
        new.__setstate__(state)
        return new


def forward_signature(params: list[Param]) -> tuple[str, str, list[str]]:
    """For a generated forward over `params`: its parameter list (defaults read from `_fusedconv_defaults`), the
    arguments of its dispatch call, and the parameters' names."""
    sig, call = [], []
    star = False
    for i, p in enumerate(params):
        if p.keyword_only and not star:
            sig.append("*")
            star = True
        sig.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}=_fusedconv_defaults[{i}]")
        call.append(p.name)
    return ", ".join(["_fusedconv_self"] + sig), ", ".join(["_fusedconv_self"] + call), call


def _forward_source(params: list[Param]) -> str:
    head, body, _ = forward_signature(params)
    return f"def forward({head}):\n    return _fusedconv_self.__dict__[{_GUARDS!r}].dispatch({body})\n"


def _rebuild(original: type) -> nn.Module:
    """Unpickling: an empty instance of the guarded class (its state is set afterwards)."""
    return object.__new__(guarded_class(original))


def _reduce_ex(self, protocol):
    return _rebuild, (type(self).__fusedconv_original__,), self.__dict__.copy()


def guarded_class(original: type) -> type:
    """The subclass of `original` whose forward dispatches through the instance's GuardTable (one per class)."""
    cls = _CLASSES.get(original)
    if cls is None:
        probe = object.__new__(original)
        params = forward_params(probe)
        namespace = {"_fusedconv_defaults": [p.default for p in params]}
        exec(compile(_forward_source(params), "<fusedconv forward>", "exec"), namespace)  # noqa: S102
        forward = namespace["forward"]
        forward.__doc__ = original.forward.__doc__
        cls = type(original.__name__, (original,), {
            "forward": forward, "__reduce_ex__": _reduce_ex, "__fusedconv_original__": original,
            "__prepare_scriptable__": refuse_script,  # its forward is generated code (fusedconv/scripting.py)
            "__module__": original.__module__, "__qualname__": original.__qualname__})
        _CLASSES[original] = cls
    return cls


def install(block: nn.Module, table: GuardTable) -> None:
    """Make `block` (still the same object) dispatch through `table`."""
    block.__dict__[_GUARDS] = table
    block.__class__ = guarded_class(table.original)


def guard_table(module: nn.Module) -> GuardTable | None:
    return module.__dict__.get(_GUARDS)


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "__fusedconv_original__", type(module))
