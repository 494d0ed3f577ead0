"""Tests of the root's input shapes in the whole-model flat trace (flat.py): taken as False while tracing, and
checked by the flat forward's guard on every call.

A model may test its input's shape before it computes anything: smp's segmentation models raise unless the height
and width divide the encoder's output stride (`if h % 32 != 0 or w % 32 != 0: raise ...`), other forwards add a
batch dimension to a 3-D input (`if x.dim() == 3: ...`). torch.fx cannot branch on a traced value, so such a
model had no flat forward at all. The flat tracer now answers a branch on a value computed from the root's call
arguments through shapes alone (`.shape`, `.size()`, `.dim()`, indexing, arithmetic, comparisons: `shape_only`)
with False, and records it; for each recorded test the guard calls a `ShapeTest`, a function of the call's
arguments generated from the test's own nodes, which says whether the test is False for this call. Where it is not
(or cannot be computed: another type of argument), the guard rejects the call before anything runs, and the
model's own forward runs exactly as before flattening (raising its own error, or taking the other branch). A
forward whose trace then fails (the branch taken as False raises, or more than MAX_SHAPE_TESTS tests) is not
flattened.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from fusedconv.graph.specialize import Specialization

# More shape tests than this in one forward and it is not flattened (each one costs a call of its ShapeTest).
MAX_SHAPE_TESTS = 8
_SHAPE_FUNCTIONS = frozenset({
    operator.getitem, operator.mod, operator.floordiv, operator.truediv, operator.add, operator.sub, operator.mul,
    operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
    operator.or_, operator.not_, len})
_SHAPE_METHODS = frozenset({"size", "dim"})


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """`node` and every node it is computed from."""
    found, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in found:
            found.add(n)
            stack.extend(n.all_input_nodes)
    return found


def _shape_op(n: fx.Node) -> bool:
    if n.op == "placeholder":
        return True
    if n.op == "call_function":
        return n.target in _SHAPE_FUNCTIONS or (n.target is getattr and n.args[1:] == ("shape",))
    return n.op == "call_method" and n.target in _SHAPE_METHODS


def shape_only(node: fx.Node) -> bool:
    """`node` computes from the call's arguments (placeholders) through shapes alone: `.shape`, `.size()`,
    `.dim()`, indexing, arithmetic and comparisons, with constants."""
    return all(_shape_op(n) for n in _ancestors(node))


_INFIX = {operator.mod: "%", operator.floordiv: "//", operator.truediv: "/", operator.add: "+", operator.sub: "-",
          operator.mul: "*", operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=",
          operator.gt: ">", operator.ge: ">=", operator.and_: "&", operator.or_: "|"}


def _render(a) -> str:
    """The test as an expression over the call's arguments, for the guard's label (`x.shape[-2:][0] % 8 != 0`)."""
    if not isinstance(a, fx.Node):
        if type(a) is slice:
            return ":".join("" if v is None else repr(v) for v in (a.start, a.stop)) + (
                f":{a.step!r}" if a.step is not None else "")
        return repr(a)
    if a.op == "placeholder":
        return str(a.target)
    if a.op == "call_method":
        return f"{_render(a.args[0])}.{a.target}({', '.join(_render(v) for v in a.args[1:])})"
    if a.target is getattr:
        return f"{_render(a.args[0])}.shape"
    if a.target is operator.getitem:
        return f"{_render(a.args[0])}[{_render(a.args[1])}]"
    if a.target in _INFIX:
        return f"({_render(a.args[0])} {_INFIX[a.target]} {_render(a.args[1])})"
    return f"{getattr(a.target, '__name__', a.target)}({', '.join(_render(v) for v in a.args)})"


class ShapeTest:
    """One shape test the flat trace took as False, as a function of all the root's call arguments (in the
    order of its parameters): True where the test is False for them, False where it is True or cannot be
    computed. An argument standing for "some tensor" (the probe flatten checks its guard with right after
    building it: `probe`'s type) has no shape to test: True."""

    def __init__(self, graph: fx.Graph, node: fx.Node, probe: type):
        sub = fx.Graph()
        env: dict = {}
        for p in graph.nodes:
            if p.op == "placeholder":
                env[p] = sub.placeholder(p.target)
        needed = _ancestors(node)
        for n in graph.nodes:
            if n in needed and n.op != "placeholder":
                env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(env[node])
        code = sub.python_code(root_module="self")
        self.text = _render(node)
        self.code = Specialization("True", [], code.src, code.globals)
        self.probe = probe

    def __call__(self, *args) -> bool:
        probe = self.probe
        if any(type(a) is probe for a in args):
            return True
        try:
            return not self.code.fn(None, *args)
        except Exception:  # noqa: BLE001 - an argument the test cannot take: the model's own forward answers
            return False


def drop_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the test nodes, and the shape nodes only they used, from the traced graph (a branch taken leaves no
    node behind; what else the forward computed from the shapes stays)."""
    stack, erased = list(nodes), set()
    while stack:
        n = stack.pop()
        if n in erased or n.op == "placeholder" or n.users:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
