"""Call patterns of a block's forward and the guards that recognise them.

A traced graph is only valid for the calls that would take the same Python path as the trace did. What a
trace of one scope can depend on, and how each dependency is recorded here:
  * each forward parameter: traced as a Proxy (the forward sees "not None", and a tensor if it inspects the
    type with isinstance — where it did, once more as a list: `list_patterns`; `type(p)` or `p.__class__` fail
    the trace, tracing.ClassInspectedError), or fixed to a concrete value through fx `concrete_args` (None, or a
    plain Python default);
  * attributes the forward read on the block (`tracing.trace_scope` logs them): plain values (flags, ints,
    strings; `training`) and lists / dicts of them by value, tensors and submodules (which may be None) by identity,
    parameter and buffer slots by whether they are None, class-level plain values where the class defines them;
    the same for what it read on the submodules it calls (`self.h.factor`, `leaf_terms`); an object whose contents
    no guard can compare fails the trace instead (model_code.GlobalStateError);
  * module-level values its code read (`model_code.py`: `SCALE`, `FLAGS[0]`, `config.GAIN`), by value in their
    module's namespace (`global_terms`); a question whether it is being traced or compiled, by
    `not traced_or_compiled()` (other global-state queries fail the trace).
`CallPattern` is one assignment of parameters; `Guard` turns a pattern plus the reads of its trace into one
Python boolean expression evaluated before each call (`specialize.GuardTable` compiles them).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import types
from dataclasses import dataclass, field

import torch.nn as nn

from fusedconv.graph import model_code
from fusedconv.graph.tracing import ScopeTrace

# Concrete values a guard compares by value (anything else is compared by identity).
_PLAIN = (bool, int, float, str, type(None))
# nn.Module's own bookkeeping attributes: reading them decides nothing about the computation.
MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
# At most this many parameters defaulting to None get both of their patterns traced (2**n traces).
MAX_OPTIONAL_PARAMS = 3

PROXY = "proxy"      # traced as a Proxy: any value that is not None (a tensor if the forward checked the type)
CONCRETE = "value"   # fixed to a concrete value
ANY = "any"          # two patterns (Proxy and None) merged: the graph is the same either way, no guard
LIST = "list"        # traced as a Proxy the forward's isinstance sees as a list (passed on or indexed, never
                     # iterated): a parameter the tensor pattern type-checked, called with a list of tensors


class UnsupportedSignature(ValueError):
    """The forward's signature has a shape the guards do not handle (*args / **kwargs)."""


def _plain_value(v) -> bool:
    if isinstance(v, tuple):
        return all(_plain_value(x) for x in v)
    return type(v) in _PLAIN


@dataclass(frozen=True)
class Param:
    name: str
    keyword_only: bool
    default: object  # inspect.Parameter.empty when required


def forward_params(module: nn.Module) -> list[Param]:
    """The parameters of `type(module).forward` after self; raises UnsupportedSignature for *args/**kwargs."""
    sig = inspect.signature(type(module).forward)
    params = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise UnsupportedSignature(f"forward takes {'*' if p.kind is p.VAR_POSITIONAL else '**'}{p.name}")
        if p.kind is p.POSITIONAL_ONLY:
            raise UnsupportedSignature(f"forward has positional-only parameter {p.name}")
        params.append(Param(p.name, p.kind is p.KEYWORD_ONLY, p.default))
    return params


@dataclass(frozen=True)
class CallPattern:
    """For each parameter, (PROXY, None) or (CONCRETE, value)."""

    slots: tuple

    def concrete_args(self, params: list[Param]) -> dict:
        return {p.name: v for p, (kind, v) in zip(params, self.slots) if kind == CONCRETE}

    def list_params(self, params: list[Param]) -> frozenset[str]:
        return frozenset(p.name for p, (kind, _) in zip(params, self.slots) if kind == LIST)


def call_patterns(params: list[Param]) -> list[CallPattern]:
    """The patterns to trace, the one fx traces by default (every parameter a Proxy, except non-None plain
    defaults, which are fixed) first: then each parameter that defaults to None as None too."""
    choices = []
    optional = 0
    for p in params:
        if p.default is inspect.Parameter.empty:
            choices.append([(PROXY, None)])
        elif p.default is None:
            optional += 1
            choices.append([(PROXY, None), (CONCRETE, None)])
        elif type(p.default) in model_code.MUTABLE_DEFAULTS:
            # A mutable default (`cfg={"gain": 1.0}`): traced as an argument, so the graph reads what it holds on
            # every call (a default edited in place, or another dict passed, reaches the graph; a forward that
            # branches on its contents cannot be traced so, and is left as it is). fx cannot take it as a
            # concrete argument anyway (its flattened placeholders do not compile).
            choices.append([(PROXY, None)])
        else:
            choices.append([(CONCRETE, p.default)])
    if optional > MAX_OPTIONAL_PARAMS:  # all given, or all left out
        first = tuple(c[0] for c in choices)
        last = tuple(c[-1] for c in choices)
        return [CallPattern(first), CallPattern(last)]
    return [CallPattern(tuple(s)) for s in itertools.product(*choices)]


def list_patterns(params: list[Param], traced: list) -> list[CallPattern]:
    """More patterns worth tracing after `traced` ((pattern, trace) pairs): a parameter whose type the forward
    tested (`isinstance(p, Tensor)`) may be called with something else, most often a list of tensors (torchvision's
    DenseNet layers take `Tensor | list[Tensor]` and are called with lists); each such parameter traced as a
    list (LIST), one at a time."""
    out: list[CallPattern] = []
    for pattern, trace in traced:
        for i, (p, (kind, _)) in enumerate(zip(params, pattern.slots)):
            if kind == PROXY and p.name in trace.type_checked:
                slots = list(pattern.slots)
                slots[i] = (LIST, None)
                candidate = CallPattern(tuple(slots))
                if candidate not in out:
                    out.append(candidate)
    return out


def _global_keys(trace: ScopeTrace) -> set:
    return {(id(ns), name) for ns, name, _, _ in trace.global_reads}


def merge_patterns(items: list) -> list:
    """Merge traced patterns that differ only in one parameter being given (Proxy) or None, when both ran
    the same code (equal `key`: the rewritten graph's normalized source) and read the same attributes: the
    parameter then needs no guard. `items` are (pattern, trace, key, payload); returns the merged list."""
    items = list(items)
    merged = True
    while merged:
        merged = False
        for i, j in itertools.combinations(range(len(items)), 2):
            (pa, ta, ka, xa), (pb, tb, kb, _) = items[i], items[j]
            if (ka != kb or set(ta.reads) != set(tb.reads) or ta.type_checked != tb.type_checked
                    or _global_keys(ta) != _global_keys(tb) or ta.asks_tracing != tb.asks_tracing):
                continue
            diff = [k for k, (a, b) in enumerate(zip(pa.slots, pb.slots)) if a != b]
            if len(diff) == 1 and {pa.slots[diff[0]], pb.slots[diff[0]]} == {(PROXY, None), (CONCRETE, None)}:
                slots = list(pa.slots)
                slots[diff[0]] = (ANY, None)
                items[i] = (CallPattern(tuple(slots)), ta, ka, xa)
                del items[j]
                merged = True
                break
    return items


@dataclass
class Guard:
    """The assumptions of one traced pattern, as source text over `d` (the block's __dict__), `m` (its
    _modules), `e` (the list of objects compared by identity), `MISSING` (a sentinel no attribute holds) and
    the parameter names. `labels[i]` says in words what `terms[i]` checks (for error messages)."""

    terms: list[str] = field(default_factory=list)
    described: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def check(self, term: str, label: str, describe: bool = True) -> None:
        self.terms.append(term)
        self.labels.append(label)
        if describe:
            self.described.append(label)

    def expression(self) -> str:
        return " and ".join(self.terms) if self.terms else "True"


_NOTHING = object()


def _defaults_terms(value, ref: int, expect: list) -> list[str]:
    """A term comparing the plain defaults of the function `e[ref]` (a CodeRef) holds with those it has now, when it
    has any: the trace used the ones its calls left out."""
    snapshot = model_code.plain_defaults(value)
    if snapshot is None:
        return []
    expect.append(snapshot)
    return [f"same_plain(e[{ref}].defaults(), e[{len(expect) - 1}])"]


def _value_term(expr: str, value, expect: list) -> str:
    if value is None or isinstance(value, bool):
        return f"{expr} is {value!r}"
    if _plain_value(value) and _round_trips(value):
        return f"(type({expr}) is {type(value).__name__} and {expr} == {value!r})"
    if model_code.plain_container(value) and not _plain_value(value):
        # A list / dict / set of plain values (a flag list, a config dict): holding what it held at trace time (the
        # code may have read any of it; an in-place edit must miss), compared by value and type.
        expect.append(copy.deepcopy(value))
        return f"same_plain({expr}, e[{len(expect) - 1}])"
    expect.append(value)
    return f"{expr} is e[{len(expect) - 1}]"


def _round_trips(value) -> bool:
    """Whether repr(value) evaluates back to an equal value (not for nan / inf, whose repr names no builtin)."""
    try:
        return eval(repr(value), {"__builtins__": {}}) == value  # noqa: S307 - repr of a plain constant
    except Exception:  # noqa: BLE001
        return False


def build_guard(module: nn.Module, params: list[Param], pattern: CallPattern, trace: ScopeTrace,
                local: dict[str, str], expect: list, removed: frozenset = frozenset()) -> Guard:
    """The guard of `pattern` traced as `trace`. `local` maps parameter names to the names the generated
    dispatcher uses for them; objects compared by identity are appended to `expect`; `removed` names
    attributes the rewrite took off the block (they must stay absent)."""
    g = Guard()
    if trace.asks_tracing:
        # The forward asked whether it is being traced or compiled; the graph holds the answer "no".
        expect.append(model_code.traced_or_compiled)
        g.check(f"not e[{len(expect) - 1}]()", "not traced or compiled")
    for p, (kind, value) in zip(params, pattern.slots):
        name = local[p.name]
        if kind == ANY:
            continue
        if kind == LIST:
            # The trace answered the forward's type tests as for a list and used the list only through torch
            # ops and indexing (tracing._ParamProxy): any list takes that path; its contents reach the ops as is.
            g.check(f"type({name}) is list", f"{p.name} is a list")
        elif kind == PROXY:
            if p.name in trace.type_checked:
                g.check(f"isinstance({name}, Tensor)", f"{p.name} is a tensor")
            else:
                g.check(f"{name} is not None", f"{p.name} is not None", describe=p.default is None)
        else:
            g.check(_value_term(name, value, expect), f"{p.name}={value!r}" if value is not None
                    else f"{p.name} is None")
    attribute_terms(g, module, trace.reads, "d", "m", "self", expect, removed)
    leaf_terms(g, module, trace, expect)
    global_terms(g, trace.global_reads, expect)
    return g


def leaf_terms(g: Guard, module: nn.Module, trace: ScopeTrace, expect: list) -> None:
    """Terms for what the forward read on the submodules it calls (`self.h.factor`, `self.blocks[0].scale`), as on
    the block itself, each over the submodule as it is now (after the rewrite; a path the rewrite removed has nothing
    left to check). Each step of the path to a submodule with terms is checked by identity first, so that the
    expression reaching it is safe to evaluate."""
    children = {"": "m"}  # dotted path -> expression of that module's _modules, once its identity is checked
    for path in sorted(trace.leaf_reads, key=lambda p: p.count(".")):
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            continue
        h = Guard()
        expr = "\0"  # placeholder for the module's expression, filled in below
        attribute_terms(h, sub, trace.leaf_reads[path], f"{expr}.__dict__", f"{expr}._modules", f"self.{path}", expect)
        if not h.terms:
            continue
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            step = ".".join(parts[:i])
            if step not in children:
                parent = children[".".join(parts[:i - 1])]
                expect.append(module.get_submodule(step))
                g.check(f"{parent}.get({parts[i - 1]!r}, MISSING) is e[{len(expect) - 1}]", f"self.{step} unchanged",
                        describe=False)
                children[step] = f"{parent}[{parts[i - 1]!r}]._modules"
        here = children[path][:-len("._modules")]
        for term, label in zip(h.terms, h.labels):
            g.check(term.replace(expr, here), label, describe=label in h.described)


def global_terms(g: Guard, global_reads, expect: list) -> None:
    """A term per module-level value, class-level value of a class used as a namespace (`Config.GAIN`), attribute
    set on a model function (`helper.gain`) or closure variable the traced code read
    (tracing.ScopeTrace.global_reads): plain values and containers by value, tensors and modules by identity, each
    looked up in its module's namespace (the class's dict, the function's dict, its closure cell) on every call."""
    for ns, name, value, where in global_reads:
        expect.append(model_code.guard_namespace(ns))
        if isinstance(ns, types.CellType):
            label = f"closure variable {name}"
        elif isinstance(ns, type):
            label = f"class-level {ns.__qualname__}.{name}"
        elif isinstance(ns, types.FunctionType):
            label = f"function attribute {ns.__qualname__}.{name}"
        else:
            label = f"module-level {name}"
        if model_code.guard_kind(value) == "code":
            # The same function / class / dtype object (not listed in the report: every forward has a few).
            # (A class's own method, property or staticmethod is found again through the class after pickling.)
            in_class = isinstance(ns, type) and vars(ns).get(name, _NOTHING) is value
            expect.append(model_code.ClassAttrRef(ns, name) if in_class else model_code.CodeRef(value))
            term = f"e[{len(expect) - 2}].d.get({name!r}, MISSING) is e[{len(expect) - 1}].obj"
            g.check(" and ".join([term, *_defaults_terms(value, len(expect) - 1, expect)]),
                    f"{label} is the same object (read in {where})", describe=False)
            continue
        label = f"{label} = {value!r}" if _plain_value(value) else f"{label} unchanged"
        g.check(_value_term(f"e[{len(expect) - 1}].d.get({name!r}, MISSING)", value, expect),
                f"{label} (read in {where})")


def attribute_terms(g: Guard, module: nn.Module, reads, d_expr: str, m_expr: str, where: str, expect: list,
                    removed: frozenset = frozenset()) -> None:
    """Add to `g` a term per attribute of `module` in `reads`, over the expressions `d_expr` (its __dict__) and
    `m_expr` (its _modules); `where` names the module in the descriptions ("self", "self.body")."""
    d = module.__dict__
    seen = set()
    children: list[str] = []
    if "_modules" in reads and isinstance(d.get("_modules"), dict):
        # The code read the children dict itself: it iterated, counted or indexed the children (nn.Sequential's
        # forward, a ModuleList loop), so what ran depends on all of them.
        expect.append(tuple(d["_modules"].values()))
        g.check(f"same_children({m_expr}, e[{len(expect) - 1}])", f"{where}'s submodules unchanged")
    for attr in reads:
        if attr in seen or attr in MODULE_INTERNALS or attr.startswith("__") or attr.startswith("_fusedconv"):
            continue
        seen.add(attr)
        label = f"{where}.{attr}"
        # (.get with a sentinel: nn.Module moves a name between __dict__ and _modules when it is reassigned)
        if attr in d:
            value = d[attr]
            g.check(_value_term(f"{d_expr}.get({attr!r}, MISSING)", value, expect),
                    f"{label} is None" if value is None else f"{label}={value!r}" if _plain_value(value)
                    else f"{label} is the same object", describe=attr != "training" or bool(value))
        elif attr in d.get("_modules", {}):
            child = d["_modules"][attr]
            g.check(_value_term(f"{m_expr}.get({attr!r}, MISSING)", child, expect),
                    f"{label} is None" if child is None else f"{label} is the same module",
                    describe=child is None)
            if child is not None:
                children.append(attr)
        elif any(attr in d.get(slot, {}) for slot in ("_parameters", "_buffers")):
            for slot in ("_parameters", "_buffers"):
                if attr in d.get(slot, {}):
                    none = d[slot][attr] is None
                    g.check(f"({d_expr}[{slot!r}].get({attr!r}, MISSING) is None) is {none}",
                            f"{label} is {'' if none else 'not '}None")
        elif hasattr(type(module), attr):
            # A class attribute: a plain value or container (a class-level flag or table) is guarded by value where
            # the class defines it, and stays unset on the instance.
            owner = next((c for c in type(module).__mro__ if attr in vars(c)), None)
            value = vars(owner)[attr] if owner is not None else None
            kind = model_code.guard_kind(value) if owner is not None else None
            if owner is not None and owner is not nn.Module and kind == "value":
                expect.append(model_code.ClassNamespace(owner))  # (its `d`: readable while Dynamo traces)
                g.check(f"{d_expr}.get({attr!r}, MISSING) is MISSING and "
                        + _value_term(f"e[{len(expect) - 1}].d.get({attr!r}, MISSING)", value, expect),
                        f"{owner.__name__}.{attr}={value!r}" if _plain_value(value)
                        else f"{owner.__name__}.{attr} unchanged")
            elif (owner is not None and kind in ("code", "identity") and not model_code._torch_class(owner)
                  and "__fusedconv_original__" not in vars(owner)):
                # A method (or property, or other class-level object) of the model's own classes that the forward
                # called: the trace ran its code once and kept what it did, so it must still be the same object
                # where the class defines it, not shadowed on the instance (`block.post = fn`) nor patched on a
                # class (`Block.post = fn`) between the instance's class and that one. torch's own classes are
                # not checked (their methods are torch's, as everywhere in the trace), nor convert's guarded subclass
                # (its forward is the dispatcher, checked apart).
                between = [c for c in type(module).__mro__[:type(module).__mro__.index(owner)]
                           if "__fusedconv_original__" not in vars(c)]  # (not convert's guarded subclass)
                expect += [model_code.ClassNamespace(owner), model_code.ClassAttrRef(owner, attr)]
                terms = [f"{d_expr}.get({attr!r}, MISSING) is MISSING",
                         f"e[{len(expect) - 2}].d.get({attr!r}, MISSING) is e[{len(expect) - 1}].obj"]
                terms += _defaults_terms(value, len(expect) - 1, expect)
                for cls in between:
                    expect.append(model_code.ClassNamespace(cls))
                    terms.append(f"{attr!r} not in e[{len(expect) - 1}].d")
                g.check(" and ".join(terms), f"{owner.__qualname__}.{attr} is the same object and not shadowed",
                        describe=False)
        else:
            # Read but absent (`getattr(self, "flag", False)`), or taken off by the rewrite (a merged branch):
            # setting it later may change the path.
            g.check(f"{d_expr}.get({attr!r}, MISSING) is MISSING and {m_expr}.get({attr!r}, MISSING) is MISSING",
                    f"{label} was merged away (must stay unset)" if attr in removed else f"{label} is not set")
    if children:
        g.described.append(f"submodules {', '.join(f'{where}.{c}' if where != 'self' else c for c in children)} "
                           "not replaced")
