"""One straight-line forward for a whole converted model: the model's own Python (containers, identity modules,
block dispatch) traced away, under guards, for the call pattern convert saw.

After convert, a forward still walks the model's module tree: every nn.Sequential, every nn.Identity left where a
BatchNorm was, every rewritten block's guard dispatch is a Python call. On CPU at batch 1 that walk costs about a
tenth of mobilenet_v2's forward (bench/cpu_gap.py). `flatten(model)` traces the converted root through everything
but its leaves (fused layers, torch.nn's own layers, modules with hooks) into one fx graph, inlining each rewritten
block through the specialization its own guard picks, and installs that graph as the root's specialization: the
root stays the same object, of a guarded subclass of its own class (`specialize.install`; a root convert had
rewritten itself keeps its table behind the flat one, `FlatTable`). A call the guard rejects runs the converted
model's own forward, exactly as before flattening.

What the graph bakes in, the guard checks on every call:
  * the root's call pattern and the attributes its forward read (`patterns.build_guard`);
  * the branch the trace took at each test of the inputs' shapes (smp's "height divisible by 32"), taken as False
    (flat_shape_tests.py);
  * every module on a path the graph uses is the same object (`FlatCheck`, one generated function walking the
    tree; the graph then calls its leaves without looking them up);
  * for every module the trace went through: the same class, whose forward is the one traced, no instance-level
    forward, no hooks, not compiled in place, and the values of the attributes its forward read;
  * for every rewritten block inlined: the same guard table, still picking the same specialization for an
    argument that is not None (an inlined entry may assume nothing else of an argument, and the trace inlines a
    block only where the argument is produced by a torch operation or layer, or is a list of such that the graph
    builds itself: DenseNet's layers, whose list specialization then guards "is a list");
  * no global module hooks, and no tracer or compiler running (they see the model's own forward).
The graph reaches its leaves and the parameters / buffers it reads (a norm layer traced through) through the
module objects that check holds, with no attribute walk from the root.
Leaves are called as modules (their own hooks, checks and routes run as usual), but for FusedConv2d calls whose
module already routed that call's signature to oneDNN: those run the oneDNN op directly after one check per forward
(flat_fused.py), and anything that check or the call's signature does not cover is the module call. A model that
does not trace as one graph, whose traced code reads a stateful object (a helper object, a dict of tensors: its
contents could change unseen; a list or dict of plain values is compared by contents), or whose guard would not hold
right after flattening, is left as convert made it.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import re
import types

import torch
import torch.fx as fx
import torch.nn as nn

from fusedconv.graph import flat_private_3d
from fusedconv.graph.flat_concat import fuse_upsample_cat
from fusedconv.graph.held_outputs import returns_held
from fusedconv.graph.flat_fused import FusedLeaves, fused_call, pure_leaf
from fusedconv.graph.flat_shape_tests import MAX_SHAPE_TESTS, ShapeTest, drop_unused, shape_only
from fusedconv.graph.flat_upsample_conv import fuse_upsample_conv
from fusedconv.bn_folded_layers import BN_FOLDED_LAYERS
from fusedconv.fused_layers import FusedAffineLayer, FusedConv3d
from fusedconv.graph.patterns import (
    MODULE_INTERNALS, PROXY, Guard, UnsupportedSignature, attribute_terms, build_guard, call_patterns, forward_params,
)
from fusedconv.graph import private_residual
from fusedconv.graph import model_code
from fusedconv.graph.model_code import ClassAttrRef, ClassNamespace, same_children, same_plain
from fusedconv.graph.owned_input import _compiler, _fx_tracing, _jit_tracing_state
from fusedconv.graph.private_residual import global_hooks, global_observers, hooked, hooked_source
from fusedconv.graph.specialize import _CLASSES, _GUARDS, _MISSING, GuardTable, Specialization, install
from fusedconv.graph.tracing import ScopeTracer, trace_scope
from fusedconv.model_reach import escape, instance_dict
from fusedconv.modules import FusedConv2d



class NotNone:
    """Stands for a block argument the flat graph proves is not None (a tensor from a torch op or layer) when the
    guard asks the block's table which specialization such a call takes."""

    def __repr__(self) -> str:
        return "<not None>"


_NOT_NONE = NotNone()
# Stands for a list the flat graph builds itself (of tensors from torch operations or layers) when the guard asks
# a block's table which specialization such a call takes (patterns.LIST: "is a list"). Never mutated.
_A_LIST: list = []
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.matmul,
               operator.neg, operator.iadd, operator.imul, operator.isub, operator.itruediv}


def _not_private(*args, **kwargs) -> bool:
    return False


_PER_CALL_FLAGS = (private_residual.residual_private, private_residual.owned_residual)


@contextlib.contextmanager
def _per_call_flags_off(fn):
    """A specialization decides per call whether a residual may be written in place (private_residual: hooks,
    the caller's mark) by calling plain functions on its modules; traced, they would run once and their answer
    would be baked into the graph. While `fn` is traced they answer False (the flat graph decides that itself,
    per call: `_mark_private_residuals`)."""
    namespace = fn.__globals__
    patched = {k: v for k, v in namespace.items() if any(v is f for f in _PER_CALL_FLAGS)}
    namespace.update(dict.fromkeys(patched, _not_private))
    try:
        yield
    finally:
        namespace.update(patched)


class _OneEntry:
    """Stands in for the rewritten root's table while the flat trace runs: its chosen specialization, unguarded."""

    def __init__(self, table: GuardTable, k: int):
        self.table, self.k = table, k

    def dispatch(self, block, *args):
        entry = self.table.entries[self.k]
        if entry.fn is None:
            return self.table.original.forward(block, *args)
        with _per_call_flags_off(entry.fn):
            return entry.fn(block, *args)


class FlatTable(GuardTable):
    """The table of a root that convert had rewritten itself: the flat graph first; any other call goes to the
    root's own table (`inner`), which still decides between its specializations and its exact fallback."""

    _deep_copied = GuardTable._deep_copied + ("inner",)

    def __init__(self, inner: GuardTable, params, entries, expect):
        self.inner = inner
        super().__init__(inner.original, params, entries, expect, [], kind="convert", scope=inner.scope)

    def fallback(self, block: nn.Module, *args, **kwargs):
        escape(block)  # the root's own table may run its own forward: user code (graph/reach.py)
        self.count_fallback()
        return self.inner.dispatch(block, *args, **kwargs)

    def describe(self) -> list[str]:
        return super().describe() + self.inner.describe()


def _is_leaf_layer(m: nn.Module) -> bool:
    # A BN-folded layer's own input check (`input.dim() != 2`) would be a branch on a traced value: called as a
    # leaf, it checks each call's input itself.
    return isinstance(m, (FusedConv2d, FusedAffineLayer, *BN_FOLDED_LAYERS))


# torch.nn's layers that return one tensor for tensor input (not nn.Identity, which returns its input, whatever
# it is; not MultiheadAttention nor a pooling layer with return_indices, which return tuples).
_TENSOR_LAYER_MODULES = frozenset(f"torch.nn.modules.{m}" for m in (
    "conv", "batchnorm", "activation", "pooling", "dropout", "flatten", "upsampling", "padding", "pixelshuffle",
    "channelshuffle", "normalization", "instancenorm")) | {"torch.nn.modules.linear"}


def _tensor_leaf(m: nn.Module) -> bool:
    """A leaf layer whose call returns a tensor for tensor input: a fused or BN-folded layer, or one of torch.nn's
    own tensor layers (exactly its class: `pure_leaf`)."""
    if _is_leaf_layer(m):
        return True
    cls = type(m)
    return (cls.__module__ in _TENSOR_LAYER_MODULES and cls not in (nn.Identity, nn.MultiheadAttention)
            and not getattr(m, "return_indices", False) and pure_leaf(m))


def _torch_layer(m: nn.Module) -> bool:
    """A torch.nn module that is not a container (fx's own default leaf rule)."""
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def inlined_entry(block: nn.Module, table: GuardTable, original: type, k: int, args: tuple) -> bool:
    """The guard term of a rewritten block whose specialization `k` the flat graph inlined."""
    d = block.__dict__
    return (d.get(_GUARDS) is table and type(block) is _CLASSES.get(original) and "forward" not in d
            and not hooked(block) and d.get("_compiled_call_impl") is None and table.select(block, *args) == k)


class FlatTracer(ScopeTracer):
    """Traces the root through every module but the leaves; a rewritten block is inlined through the
    specialization its table picks for arguments that are not None, or kept a leaf."""

    def __init__(self, root_pattern_proxies: set[str]):
        super().__init__()
        self.root_proxies = root_pattern_proxies   # root placeholders the root's guard proves not None
        self.inlined: list[tuple[str, nn.Module, GuardTable, int, tuple]] = []
        self.traced: dict[str, nn.Module] = {}     # modules traced through (path -> module), besides the root
        # Decided once per module, before tracing: while the trace runs, the modules it goes through wear a
        # read-recording subclass (tracing._recording_reads), which must not change the answer.
        self._leaf: dict[int, bool] = {}
        self._tensor: dict[int, bool] = {}  # a leaf whose call returns a tensor (`_tensor_leaf`), decided with it
        self.shape_tests: list[fx.Node] = []  # branches on the inputs' shapes, taken as False (flat_shape_tests)
        self.tensor_leaves: set[str] = set()  # leaves whose output a type test was answered for (`tensor_value`)

    def tensor_value(self, node: fx.Node) -> bool:
        """A leaf layer's output is a tensor (`_tensor_leaf`); the flat guard then checks, on every call, what makes
        it so: the leaf's class and its forward unchanged, no instance forward, no forward hooks (which may return
        anything), and the root's tensor arguments plain tensors (a subclass's __torch_function__ may return
        anything from a layer's ops)."""
        if node.graph is not self.graph or node.op != "call_module":
            return False
        if not self._tensor.get(id(self.root.get_submodule(node.target)), False):
            return False
        self.tensor_leaves.add(str(node.target))
        return True

    def to_bool(self, obj: fx.Proxy) -> bool:
        node = obj.node
        if node.graph is self.graph and len(self.shape_tests) < MAX_SHAPE_TESTS and shape_only(node):
            self.shape_tests.append(node)
            return False
        return super().to_bool(obj)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = self._leaf.get(id(m))
        if leaf is None:
            leaf = self._leaf[id(m)] = self._decide_leaf(m)
            self._tensor[id(m)] = leaf and _tensor_leaf(m)
        return leaf

    def _decide_leaf(self, m: nn.Module) -> bool:
        if _is_leaf_layer(m) or hooked(m):
            return True
        if m.__dict__.get(_GUARDS) is not None:
            return False  # decided per call in call_module
        if type(m) is nn.Identity:
            return False
        return _torch_layer(m)

    def _not_none(self, value) -> bool:
        if not isinstance(value, fx.Proxy):
            return False
        node = value.node
        if node.op == "placeholder":
            return node.target in self.root_proxies
        if node.op == "call_module":
            m = self.root.get_submodule(node.target)
            return _is_leaf_layer(m) or _torch_layer(m)
        if node.op == "call_function":
            return node.target in _ARITHMETIC or getattr(node.target, "__module__", "").startswith("torch")
        if node.op == "call_method":
            return hasattr(torch.Tensor, node.target)
        return False

    def call_module(self, m: nn.Module, forward, args, kwargs):
        table = m.__dict__.get(_GUARDS)
        path = self.path_of_module(m)
        if table is None or hooked(m):
            if not self.is_leaf_module(m, path):
                self.traced[path] = m
            return super().call_module(m, forward, args, kwargs)
        chosen = self._inline_choice(m, table, args, kwargs)
        if chosen is None:
            return self.create_proxy("call_module", path, args, kwargs)
        k, probe = chosen
        self.inlined.append((path, m, table, k, probe))
        entry = table.entries[k]
        args = (*args, *probe[len(args):])  # with the defaults of the parameters the call left out
        if entry.fn is None:  # the class's own forward over the swapped children
            return table.original.forward(m, *args)
        with _per_call_flags_off(entry.fn):
            return entry.fn(m, *args)

    def _inline_choice(self, m: nn.Module, table: GuardTable, args, kwargs):
        if kwargs or table.kind != "convert" or len(args) > len(table.params) or \
                any(p.keyword_only for p in table.params[:len(args)]):
            return None
        probe = []
        for a in args:
            if isinstance(a, fx.Proxy):
                if not self._not_none(a):
                    return None
                probe.append(_NOT_NONE)
            elif a is None or type(a) in (bool, int, float, str):
                probe.append(a)
            elif type(a) is list and all(isinstance(v, fx.Proxy) and self._not_none(v) for v in a):
                probe.append(_A_LIST)  # DenseNet's layers, called with the list of the features so far
            else:
                return None
        # Parameters the call leaves out take their defaults (the table's select and its specializations take
        # every parameter, and its own dispatch fills in the same defaults, recorded at convert time).
        for p in table.params[len(probe):]:
            if not (p.default is None or type(p.default) in (bool, int, float, str)):
                return None  # no default (the call would raise), or one that is not a plain value
            probe.append(p.default)
        k = table.select(m, *probe)
        return None if k < 0 else (k, tuple(probe))


class FlatCheck:
    """The part of the flat forward's guard that walks the module tree: one generated function that looks every
    module the graph depends on up by its path (each once, in a local) and checks it is the same object, and for
    the ones the trace went through or inlined, what their code assumed. Also holds the leaf modules the graph
    calls, in the order of `leaves` (their identity is checked here, so the graph calls them without a lookup), and
    the per-forward check of their FusedConv2d calls (`fused`, flat_fused.FusedLeaves). Pickles and deep-copies as
    its source and objects (the copies', under deepcopy), like GuardTable."""

    def __init__(self, src: str, expect: list, leaves: tuple, fused: FusedLeaves | None = None,
                 owners: tuple = (), returns_held: bool = True):
        self.src = src
        self.expect = expect
        self.leaves = leaves
        self.fused = fused  # the FusedConv2d calls' per-forward check (flat_fused.FusedLeaves)
        # Modules whose parameters / buffers the graph reads (identity checked here too): one getattr on the
        # module instead of a walk from the root (`_read_attributes_directly`).
        self.owners = owners
        # Whether an output of the graph may be a tensor the model holds, or a view of one (held_outputs.py): the
        # caller could then edit the model through it, so the model is never armed (graph/reach.py).
        self.returns_held = returns_held
        self.frozen = False  # `freeze()`: only the class-level terms are checked
        self.reach = None  # `arm()`: while the model has not escaped, only the class-level terms are checked
        self._compile()

    def arm(self, reach) -> None:
        """For a model no one outside has reached into (graph/reach.py): while `reach` has not escaped, check per
        call only the class-level terms and let the leaves' check keep the states it found, as `freeze()` does
        for good."""
        self.fast_fn = self._compiled(*frozen_check_source(self.src, self.expect))
        self.reach = reach

    def freeze(self) -> None:
        """For a model nothing else holds (fusedconv.frozen.FrozenModel's private copy, which no one can hook,
        edit or replace a module of): check per call only what lies outside its modules, the class-level terms
        (a class's forward or method patched, a class attribute changed), and let the leaves' per-forward check
        keep the states it found (FusedLeaves.freeze)."""
        self.frozen = True
        self.reach = None
        self._compile()
        if self.fused is not None:
            self.fused.freeze()

    def _compile(self) -> None:
        self.fn = self._compiled(*(frozen_check_source(self.src, self.expect) if self.frozen
                                   else (self.src, self.expect)))
        self.fast_fn = None

    @staticmethod
    def _compiled(src: str, expect: list):
        # The objects become locals of an enclosing function (closure cells) rather than items of a global list:
        # the check reads hundreds of them per call (measured ~3 % faster on mobilenet_v2's 1,100-line check).
        names = ", ".join(f"e{i}" for i in range(len(expect)))
        body = re.sub(r"\be\[(\d+)\]", r"e\1", src)
        src = "def make(e):\n" + (f"    {names}, = e\n" if expect else "") + \
            "".join(f"    {line}\n" for line in body.splitlines())
        src += "    return check\n"
        namespace = {"MISSING": _MISSING, "Tensor": torch.Tensor, "same_plain": same_plain,
                     "same_children": same_children}
        exec(compile(src, "<fusedconv flat check>", "exec"), namespace)  # noqa: S102 - generated here
        return namespace["make"](expect)

    def __call__(self, root: nn.Module) -> bool:
        reach = self.reach
        if reach is not None and not reach.escaped:
            return self.fast_fn(root)
        return self.fn(root)

    def states(self, *inputs) -> tuple:
        """The leaves' eager states for this forward (flat_fused.FusedLeaves): the ones kept while the model is
        armed and has not escaped (graph/reach.py), else checked now."""
        reach = self.reach
        if reach is not None and not reach.escaped:
            return self.fused.kept_states(*inputs)
        return self.fused.states(*inputs)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["fn"], state["fast_fn"]
        state["reach"] = None  # a copy is not armed
        return state

    def __setstate__(self, state):
        state.setdefault("fused", None)
        state.setdefault("owners", ())
        state.setdefault("frozen", False)
        state.setdefault("returns_held", True)
        state["reach"] = None
        self.__dict__.update(state)
        self._compile()

    def __deepcopy__(self, memo):
        new = object.__new__(FlatCheck)
        memo[id(self)] = new
        new.__setstate__({"src": self.src, "expect": copy.deepcopy(self.expect, memo),
                          "leaves": copy.deepcopy(self.leaves, memo), "fused": copy.deepcopy(self.fused, memo),
                          "owners": copy.deepcopy(self.owners, memo), "frozen": self.frozen,
                          "returns_held": self.returns_held})
        return new


# A tree check's line of terms; an inlined block's term (`inlined_entry(x, table, original, k, probe)`); a name of
# the instance's own state in a term (a module looked up, its __dict__ / _modules, the root, a call argument, or a
# helper reading modules a term holds: graph/inlined_containers.py).
_CHECK_LINE = re.compile(r"^    if not \((.*)\):$")
_INLINED_TERM = re.compile(r"^e\[\d+\]\(x\d+, e\[(\d+)\], e\[\d+\], (\d+), e\[\d+\]\)$")
_INSTANCE_NAME = re.compile(
    r"(?<![.\w'\"])(?:[xdm]\d*|self|root|a\d+|unchanged_subtree|runs_as_written|folded_unchanged)\b")


def conjuncts(expression: str) -> list[str]:
    """The top-level `and` operands of a guard expression (not those inside parentheses, brackets or strings)."""
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(expression):
        c = expression[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and expression.startswith(" and ", i):
            parts.append(expression[start:i])
            start = i + 5
            i += 4
        i += 1
    parts.append(expression[start:])
    return [p.strip() for p in parts if p.strip()]


def _identity_key(obj) -> tuple:
    """What a guard term's object stands for: a class's namespace, a class attribute, else the object itself
    (each module's terms hold their own ClassNamespace / ClassAttrRef of the same class)."""
    if isinstance(obj, ClassAttrRef):
        return ("attr", id(obj.owner), obj.name, id(obj.obj))
    if isinstance(obj, ClassNamespace):
        return ("namespace", id(obj.cls))
    return ("object", id(obj))


def frozen_check_source(src: str, expect: list) -> tuple[str, list]:
    """The class-level part of a tree check (`src` over `expect`) and of the guards of the blocks it inlined: the
    terms that read no module instance — a class's forward or method is the one traced, a class attribute holds
    its value, a function keeps its defaults — each once, as a `check(root)` over a list of its own objects."""
    objects: list = []
    index: dict[tuple, int] = {}
    terms: dict[str, None] = {}

    def add(term: str, over: list) -> None:
        if _INSTANCE_NAME.search(term):
            return

        def renumber(match):
            obj = over[int(match.group(1))]
            key = _identity_key(obj)
            if key not in index:
                index[key] = len(objects)
                objects.append(obj)
            return f"e[{index[key]}]"
        terms[re.sub(r"\be\[(\d+)\]", renumber, term)] = None

    for line in src.splitlines():
        match = _CHECK_LINE.match(line)
        if match is None:
            continue
        for term in conjuncts(match.group(1)):
            inlined = _INLINED_TERM.match(term)
            if inlined is None:
                add(term, expect)
                continue
            table, k = expect[int(inlined.group(1))], int(inlined.group(2))
            for entry_term, _ in table.entries[k].checks:
                for part in conjuncts(entry_term):
                    add(part, table.expect)
    body = " and ".join(f"({t})" for t in terms) or "True"
    return f"def check(root):\n    return bool({body})\n", objects


def tracing() -> bool:
    """torch.compile / torch.export (Dynamo), fx symbolic tracing or torch.jit tracing in progress."""
    return _compiler.is_compiling() or _jit_tracing_state() is not None or _fx_tracing()


def flat_check(model: nn.Module) -> FlatCheck | None:
    """The tree check of `model`'s whole-model flat forward (it holds the graph's leaves and their per-forward
    check), or None when flatten did not give the model one."""
    table = model.__dict__.get(_GUARDS)
    if table is None:
        return None
    return next((e for e in table.expect if isinstance(e, FlatCheck)), None)


def flat_leaves(table: GuardTable, k: int) -> tuple:
    """The leaf modules of the flat graph (their identity checked by the guard that let this call in)."""
    return table.expect[k].leaves


def flat_owners(table: GuardTable, k: int) -> tuple:
    """The modules whose parameters and buffers the flat graph reads (their identity checked like the leaves)."""
    return table.expect[k].owners


def flat_states(table: GuardTable, k: int, *inputs) -> tuple:
    """Per leaf, the eager state its FusedConv2d calls may use directly in this forward (flat_fused.FusedLeaves);
    `inputs`, the graph's, must be plain (flat_fused.plain_arguments)."""
    return table.expect[k].states(*inputs)


def call_leaf(leaves: tuple, i: int, *args, **kwargs):
    return leaves[i](*args, **kwargs)


def _check_source(root: nn.Module, tracer: FlatTracer, trace, paths: list[str], expect: list) -> str:
    """The tree-walking check (FlatCheck): every module on the paths the graph uses (`paths`: its leaves and the
    owners of the tensors it reads, besides those it traced through or inlined), by identity; for the modules
    traced through and the inlined blocks, also their assumptions."""
    inlined = {path: (table, k, probe) for path, _, table, k, probe in tracer.inlined}
    needed = set(paths) | set(tracer.traced) | set(inlined) | \
        {p for p, reads in trace.nested_reads.items() if reads}
    for path in list(needed):
        parts = path.split(".")
        needed.update(".".join(parts[:i]) for i in range(1, len(parts)))
    # Whose _modules the check reads: the parents of the checked paths. A module's __dict__ and _modules are
    # loaded only where something reads them: after a forward they are out of cache, and each load costs.
    parents = {p.rpartition(".")[0] for p in needed}
    lines = ["def check(root):", "    m0 = root.__dict__['_modules']"]
    local = {"": "0"}
    for n, path in enumerate(sorted(needed, key=lambda p: (p.count("."), p)), start=1):
        parent, _, name = path.rpartition(".")
        sub = root.get_submodule(path)
        expect.append(sub)
        lines += [f"    x{n} = m{local[parent]}.get({name!r})", f"    if x{n} is not e[{len(expect) - 1}]:",
                  "        return False"]
        local[path] = str(n)
        g = Guard()
        if path in tracer.traced or path in tracer.tensor_leaves:
            cls = type(sub)
            expect += [cls, cls.forward]
            c = len(expect) - 2
            g.check(f"type(x{n}) is e[{c}] and e[{c}].forward is e[{c + 1}] and 'forward' not in d{n} and "
                    f"d{n}.get('_compiled_call_impl') is None and not {hooked_source(f'd{n}')}",
                    f"self.{path} unchanged")
        if path in inlined:
            table, k, probe = inlined[path]
            expect += [inlined_entry, table, table.original, probe]
            c = len(expect) - 4
            g.check(f"e[{c}](x{n}, e[{c + 1}], e[{c + 2}], {k}, e[{c + 3}])", f"self.{path} takes the same path")
        # What its code read; a child that is itself on a checked path is already compared by identity.
        reads = [r for r in trace.nested_reads.get(path, ())
                 if not (f"{path}.{r}" in needed and sub._modules.get(r) is not None)]
        attribute_terms(g, sub, reads, f"d{n}", f"m{n}", f"self.{path}", expect)
        expression = g.expression() if g.terms else ""
        reads_m = path in parents or re.search(rf"\bm{n}\b", expression) is not None
        if reads_m or re.search(rf"\bd{n}\b", expression):
            lines.append(f"    d{n} = x{n}.__dict__")
        if reads_m:
            lines.append(f"    m{n} = d{n}['_modules']")
        if expression:
            lines += [f"    if not ({expression}):", "        return False"]
    lines.append("    return True")
    return "\n".join(lines) + "\n"


_SAFE_VALUES = (type(None), bool, int, float, str, type, types.FunctionType, types.BuiltinFunctionType,
                types.MethodType, nn.Module, torch.Tensor, torch.dtype, torch.device)


def _stateful_reads(root: nn.Module, trace) -> list[str]:
    """Attributes the traced code read whose value is an object with contents of its own that a guard cannot
    compare (a helper object such as timm's FeatureHooks, a dict of tensors): what the code did with them ran once,
    at trace time, and the guard could check only the object's identity. A list, dict or set of plain values (smp's
    encoder `_out_indexes`, a decoder's channel list) is not one: the guard compares its contents with a copy taken
    at trace time on every call (patterns.attribute_terms)."""
    found = []
    for path, reads in [("", trace.reads), *trace.nested_reads.items()]:
        sub = root.get_submodule(path) if path else root
        for attr in dict.fromkeys(reads):
            value = sub.__dict__.get(attr, _MISSING)
            if value is _MISSING or attr.startswith("__") or attr in MODULE_INTERNALS:
                continue
            plain = (isinstance(value, tuple) and all(isinstance(v, _SAFE_VALUES) for v in value)) or \
                model_code.plain_container(value)
            if not plain and not isinstance(value, _SAFE_VALUES):
                found.append(f"{path + '.' if path else ''}{attr} ({type(value).__name__})")
    return found


def _flat_entry(root: nn.Module, params, pattern, notes: list[str], inner: tuple | None = None):
    """The flat Specialization of `root` for `pattern` and its objects; `inner` = (the root's own table, the
    index of its specialization for this pattern) when convert rewrote the root itself."""
    proxies = {p.name for p, (kind, _) in zip(params, pattern.slots) if kind == PROXY}
    tracer = FlatTracer(proxies)
    tracer.root = root
    if inner is not None:
        root.__dict__[_GUARDS] = _OneEntry(*inner)
    try:
        trace = trace_scope(root, pattern.concrete_args(params) or None, tracer)
    finally:
        if inner is not None:
            root.__dict__[_GUARDS] = inner[0]
    if not tracer.inlined and all(type(m) is nn.Identity for m in tracer.traced.values()):
        return None  # nothing worth flattening: the root's forward calls only leaves (and identities)
    stateful = _stateful_reads(root, trace)
    if stateful:
        notes.append(f"flat forward: the traced code reads {', '.join(stateful[:3])}, whose contents a guard "
                     "cannot check; left as is")
        return None
    local = {p.name: f"a{i}" for i, p in enumerate(params)}
    expect: list = [tracing]
    g = Guard()
    # First, so that no tracer steps into the checks below: torch.compile / export, fx and jit see the model's
    # own forward over the converted children, as before flattening.
    g.check("not e[0]()", "not traced or compiled", describe=False)
    root_guard = build_guard(root, params, pattern, trace, local, expect)
    for term, label in zip(root_guard.terms, root_guard.labels):
        g.check(term, label, describe=label in root_guard.described)
    if inner is not None:
        # The root's own table must pick the specialization that was traced, for this very call.
        expect.append(inner[0])
        args = ", ".join(f"a{i}" for i in range(len(params)))
        g.check(f"e[{len(expect) - 1}].select(self{', ' if args else ''}{args}) == {inner[1]}",
                "the root's own rewrite takes the same path", describe=False)
    graph = trace.graph
    if tracer.tensor_leaves:
        # Type tests on leaf outputs were answered for tensors: the root's tensor arguments are plain tensors (the
        # leaves' own conditions are the tree check's, `_check_source`).
        expect.append(NotNone)
        for i, (p, (kind, _)) in enumerate(zip(params, pattern.slots)):
            if kind == PROXY:
                # (Or the probe flatten checks the new guard with, right after building it: "some tensor".)
                g.check(f"(type(a{i}) is Tensor or type(a{i}) is e[{len(expect) - 1}])", f"{p.name} is a torch.Tensor")
    if tracer.shape_tests:
        if sum(n.op == "placeholder" for n in graph.nodes) != len(params):
            notes.append("flat forward: the forward tests its inputs' shapes and its parameters are not one "
                         "placeholder each; left as is")
            return None
        args = ", ".join(f"a{i}" for i in range(len(params)))
        for node in tracer.shape_tests:
            test = ShapeTest(graph, node, NotNone)
            expect.append(test)
            g.check(f"e[{len(expect) - 1}]({args})", f"the inputs' shape test `{test.text}` is False")
        drop_unused(graph, tracer.shape_tests)
    expect.append(global_hooks)
    g.check(f"not e[{len(expect) - 1}]()", "no global module hooks", describe=False)
    calls = [n for n in graph.nodes if n.op == "call_module"]
    leaf_paths = list(dict.fromkeys(str(n.target) for n in calls))
    reads = _tensor_reads(root, graph)
    owner_paths = list(dict.fromkeys(owner for owner, _ in reads.values()))
    check_expect: list = []
    src = _check_source(root, tracer, trace, leaf_paths + owner_paths, check_expect)
    leaves = tuple(root.get_submodule(p) for p in leaf_paths)
    owners = tuple(root.get_submodule(p) for p in owner_paths)
    expect.append(FlatCheck(src, check_expect, leaves, _fused_leaves(graph, calls, leaf_paths, leaves), owners,
                            returns_held(graph, root)))
    k = len(expect) - 1
    g.check(f"e[{k}](self)", "every module on the way unchanged", describe=False)
    _call_leaves_directly(graph, calls, leaf_paths, k, leaves)
    _read_attributes_directly(graph, reads, owner_paths, k)
    upsample_cats = fuse_upsample_cat(graph)
    upsample_convs = fuse_upsample_conv(graph)
    code = graph.python_code(root_module="self")
    # The guard table read around the root's attribute protocol: no reach into an armed model (graph/reach.py).
    guards = f"self.{_GUARDS}"
    code.src = code.src.replace(guards, f"fusedconv_instance_dict(self)[{_GUARDS!r}]")
    code.globals["fusedconv_instance_dict"] = instance_dict
    entry = Specialization(g.expression(), [f"whole-model forward ({len(tracer.inlined)} blocks inlined, "
                                            f"{len(tracer.traced)} modules traced through"
                                            + (f", {upsample_cats} upsample + cat written as one"
                                               if upsample_cats else "")
                                            + (f", {upsample_convs} convs after an upsampling computed at the source "
                                               "resolution" if upsample_convs else "")
                                            + ")"],
                           code.src, code.globals, list(zip(g.terms, g.labels)), pattern)
    return entry, expect


# Where the functions a pure graph may call come from: torch and torchvision (whose stochastic_depth torch.fx keeps
# as a call in EfficientNet / ConvNeXt forwards), this package, and Python's own operator, math and collections
# modules and builtins (a function torch.fx.wrap kept as a call can be any user code).
_LIBRARY_MODULES = ("torch", "torchvision", "fusedconv", "operator", "_operator", "builtins", "math", "collections")


def _library_function(fn) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return any(module == m or module.startswith(m + ".") for m in _LIBRARY_MODULES)


def _fused_leaves(graph: fx.Graph, calls: list[fx.Node], leaf_paths: list[str], leaves: tuple) -> FusedLeaves:
    fused = tuple(i for i, m in enumerate(leaves) if type(m) is FusedConv2d)
    index = {p: i for i, p in enumerate(leaf_paths)}
    without = {index[str(n.target)] for n in calls if _residual_of(n.args, n.kwargs) is None}
    # Pure: no user code runs inside the forward (flat_fused.py), neither in a leaf nor in a function the graph calls.
    pure = all(pure_leaf(m) for m in leaves) and all(
        _library_function(n.target) for n in graph.nodes if n.op == "call_function")
    return FusedLeaves(leaves, fused, frozenset(fused) - without, pure)


def _residual_of(args: tuple, kwargs: dict):
    """The residual argument of a FusedConv2d call's (x, residual, ...) arguments, None when not given."""
    return args[1] if len(args) > 1 else kwargs.get("residual")


def _from_check(graph: fx.Graph, getter, k: int) -> tuple[fx.Node, fx.Node]:
    """Nodes at the top of the graph: the root's guard table, and `getter(table, k)` (what the FlatCheck holds)."""
    anchor = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(anchor[-1]) if anchor else graph.inserting_before(next(iter(graph.nodes))):
        table = graph.get_attr(_GUARDS)
    with graph.inserting_after(table):
        return table, graph.call_function(getter, (table, k))


def _call_leaves_directly(graph: fx.Graph, calls: list[fx.Node], leaf_paths: list[str], k: int,
                          root_leaves: tuple) -> None:
    """Each `call_module` node becomes a call of the module object the guard checked (no attribute walk); a
    FusedConv2d call becomes `flat_fused.fused_call` with the module's state from the per-forward check."""
    if not calls:
        return
    table, leaves = _from_check(graph, flat_leaves, k)
    states = None
    if any(type(m) is FusedConv2d for m in root_leaves):
        with graph.inserting_after(leaves):
            inputs = tuple(n for n in graph.nodes if n.op == "placeholder")
            states = graph.call_function(flat_states, (table, k, *inputs))
    index = {p: i for i, p in enumerate(leaf_paths)}
    fused = {}  # call node -> leaf index, for FusedConv2d leaves
    pooled = {}  # call node -> leaf index, for pooling leaves (a fresh output, see flat_private_pooled)
    fused3 = {}  # call node -> leaf index, for FusedConv3d leaves called with (x[, residual]) (flat_private_3d)
    for node in calls:
        i = index[str(node.target)]
        with graph.inserting_before(node):
            if type(root_leaves[i]) is FusedConv2d and _plain_fused_call(node):
                state = graph.call_function(operator.getitem, (states, i))
                leaf = graph.call_function(operator.getitem, (leaves, i))
                new = graph.call_function(fused_call, (state, leaf, *node.args), dict(node.kwargs))
            else:
                new = graph.call_function(call_leaf, (leaves, i, *node.args), dict(node.kwargs))
        plain3 = type(root_leaves[i]) is FusedConv3d and _plain_fused_call(node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if plain3:
            fused3[new] = i
        if type(root_leaves[i]) is FusedConv2d:
            fused[new] = i
        elif type(root_leaves[i]) in _POOLS:
            pooled[new] = i
    _mark_private_residuals(graph, leaves, states, fused, pooled)
    flat_private_3d.mark(graph, leaves, fused3)


def _tensor_reads(root: nn.Module, graph: fx.Graph) -> dict[fx.Node, tuple[str, str]]:
    """The graph's reads of a parameter or buffer of a module below the root (`get_attr` of "a.b.bn.weight"): node
    -> (owner path, name). Such a read walks the path from the root through nn.Module.__getattr__ on every call
    (timm's BatchNormAct2d traced through: ~1,400 lookups per dpn68 forward)."""
    reads = {}
    for node in graph.nodes:
        if node.op != "get_attr" or "." not in str(node.target):
            continue
        owner, _, name = str(node.target).rpartition(".")
        try:
            module = root.get_submodule(owner)
        except AttributeError:
            continue
        d = module.__dict__
        if name not in d and (name in d.get("_parameters", {}) or name in d.get("_buffers", {})):
            reads[node] = (owner, name)
    return reads


def _read_attributes_directly(graph: fx.Graph, reads: dict, owner_paths: list[str], k: int) -> None:
    """Each read of `_tensor_reads` becomes `getattr(owner, name)` on the module the guard checked (the same lookup
    nn.Module does for the last step of the walk: a parameter or buffer reassigned, or set to None, is seen)."""
    if not reads:
        return
    _, owners = _from_check(graph, flat_owners, k)
    index = {p: i for i, p in enumerate(owner_paths)}
    for node, (owner, name) in reads.items():
        with graph.inserting_before(node):
            module = graph.call_function(operator.getitem, (owners, index[owner]))
            new = graph.call_function(getattr, (module, name))
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _plain_fused_call(node: fx.Node) -> bool:
    """A FusedConv2d call with the arguments flat_fused.fused_call takes after the state and the module (x[, residual[,
    residual_private]])."""
    return 1 <= len(node.args) <= 3 and set(node.kwargs) <= {"residual", "residual_private"} and \
        not (len(node.args) >= 2 and "residual" in node.kwargs)


def _mark_private_residuals(graph: fx.Graph, leaves: fx.Node, states: fx.Node | None, fused: dict,
                            pooled: dict) -> None:
    """Let a fused call write its output into its residual where no one else can read that tensor afterwards
    (what private_residual.py proves inside one block, here across the whole graph). The graph half: the residual
    is the fresh output of another FusedConv2d call or of a torch.nn pooling layer (resnet18/34's first block adds
    the stem's max-pool output), read only by FusedConv2d calls, the last of them this one, and not returned. The
    per-call half (`flat_private`, `flat_private_pooled`): none of those modules has a hook that could keep it, and
    the pooling layer still computes a fresh tensor."""
    order = {n: k for k, n in enumerate(graph.nodes)}

    def call_args(node):  # (x, residual) of a FusedConv2d call node, whichever caller it uses
        args = node.args[2:]
        return (args[0] if args else None), _residual_of(args, node.kwargs)

    for call, c in fused.items():
        x, residual = call_args(call)
        if not isinstance(residual, fx.Node) or residual is x or (residual not in fused and residual not in pooled):
            continue
        readers = [u for u in residual.users if u is not call]
        if any(u not in fused or order[u] > order[call] or call_args(u)[1] is residual for u in readers):
            continue  # read by something else, after this call, or as another call's residual
        with graph.inserting_before(call):
            if residual in fused:
                flag = graph.call_function(flat_private, (states, leaves, fused[residual], c,
                                                          *(fused[u] for u in readers)))
            else:
                flag = graph.call_function(flat_private_pooled, (states, leaves, pooled[residual], c,
                                                                 *(fused[u] for u in readers)))
        kwargs = dict(call.kwargs)
        kwargs["residual_private"] = flag
        call.kwargs = kwargs


def flat_private(states: tuple, leaves: tuple, producer: int, fused: int, *readers: int) -> bool:
    """The per-call half of a residual written in place by the flat graph (see `_mark_private_residuals`). A
    module with a state from this forward's check (flat_fused.FusedLeaves) had no hook when the forward began, and
    in a pure forward none can be added until it ends."""
    if states[producer] is not None and states[fused] is not None and all(states[r] is not None for r in readers):
        return True
    return not (global_observers() or hooked(leaves[producer]) or hooked(leaves[fused])
                or any(hooked(leaves[r]) for r in readers))


# Pooling layers whose forward returns a new tensor (F.max_pool2d / F.avg_pool2d allocate their output): as long as
# the module is one of these classes, with no instance-level forward, not compiled in place and without indices.
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def flat_private_pooled(states: tuple, leaves: tuple, producer: int, fused: int, *readers: int) -> bool:
    """`flat_private` for a residual produced by a pooling leaf: that leaf must still return a fresh tensor."""
    pool = leaves[producer]
    d = pool.__dict__
    if type(pool) not in _POOLS or "forward" in d or d.get("_compiled_call_impl") is not None or \
            getattr(pool, "return_indices", False):
        return False
    return flat_private(states, leaves, producer, fused, *readers)  # (a pool has no state: every hook is checked)


def flatten(model: nn.Module, notes: list[str] | None = None) -> bool:
    """Give a converted `model`'s root one guarded straight-line forward (module doc). Returns whether it did;
    `notes` gets a line saying why not where it did not."""
    notes = notes if notes is not None else []
    own = model.__dict__.get(_GUARDS)
    if isinstance(model, fx.GraphModule) or isinstance(own, FlatTable) or (
            own is not None and (own.kind != "convert" or own.base is not None)):
        notes.append("flat forward: the root is a graph module, flattened already or re-parameterized; left as is")
        return False
    try:
        params = own.params if own is not None else forward_params(model)
    except UnsupportedSignature as e:
        notes.append(f"flat forward: {e}; left as is")
        return False
    pattern = call_patterns(params)[0]
    probe = [_NOT_NONE if kind == PROXY else value for kind, value in pattern.slots]
    inner = None
    if own is not None:
        k = own.select(model, *probe)
        if k < 0:
            notes.append("flat forward: the root's own rewrite has no specialization for its first call pattern; "
                         "left as is")
            return False
        inner = (own, k)
    try:
        built = _flat_entry(model, params, pattern, notes, inner)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "no flat forward"
        msg = str(e).strip().splitlines()
        notes.append(f"flat forward: the model does not trace as one graph ({type(e).__name__}: "
                     f"{msg[0][:120] if msg else ''}); left as is")
        return False
    if built is None:
        return False
    entry, expect = built
    if own is None:
        table = GuardTable(type(model), params, [entry], expect, [], kind="convert", scope="")
        install(model, table)
    else:
        table = FlatTable(own, params, [entry], expect)
        model.__dict__[_GUARDS] = table
    # The guard must hold for the model as it is now (but for the call's own arguments): else flattening
    # would only add a failing check to every call.
    try:
        ok = table.select(model, *probe) == 0
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        if own is None:
            del model.__dict__[_GUARDS]
            model.__class__ = table.original
        else:
            model.__dict__[_GUARDS] = own
        notes.append("flat forward: its guard does not hold on the converted model; left as is")
        return False
    return True
