"""Reading branches in a re-parameterization graph: sums, their operands, and the linear pieces behind them.

A sum is flattened through single-use additions / subtractions (and identity modules or numeric factors
between them); each term is walked back through linear pieces (conv, eval BN, avg pool, identity, numeric or
learned scalar factor) to the first node that is not one. `BranchReader` holds these walks; the pass
(`reparam_graph.ScopePass`) decides where the terms meet and merges them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from fusedconv import fold
from fusedconv.graph.reparam_leaves import is_bn_and_pad, is_identity_based_conv, is_plain_conv

_ADDS = {operator.add, operator.iadd, torch.add}
_SUBS = {operator.sub, operator.isub, torch.sub}
_INPLACE = {operator.iadd, operator.isub, "add_", "sub_"}
_MULS = {operator.mul, operator.imul, torch.mul}


@dataclass
class Piece:
    """One linear step of a branch: `kind` in conv / idconv / bn / bnpad / pool / identity / scale."""

    kind: str
    node: fx.Node
    module: nn.Module | None = None
    factor: object = None  # scale: a python number or a tensor (a learned scalar / per-channel factor)

    def name(self) -> str:
        return str(self.node.target) if self.node.op == "call_module" else self.node.name


@dataclass
class Term:
    """One operand of a sum, `coef * post(node)`, with the linear pieces that lead back from `node`."""

    node: fx.Node
    coef: float
    nodes: list[fx.Node] = field(default_factory=list)  # node, its linear input, ..., the first non-linear one
    pieces: list[Piece] = field(default_factory=list)  # pieces[i] maps nodes[i + 1] to nodes[i]
    post: list[Piece] = field(default_factory=list)  # bias-free pieces applied after `node` (see flatten)


def _owned(node: fx.Node) -> bool:
    """Created by the traced module's own forward, not inside a child's (a leaf call records itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
    if node.op == "call_module":
        paths = [p for p in paths if p != node.target]
    return not paths


def _sum_operands(node: fx.Node):
    """[(operand, sign)] of an addition / subtraction node, else None (alpha= and other kwargs refused)."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function":
        if node.target in _ADDS:
            return [(a, 1.0), (b, 1.0)]
        if node.target in _SUBS:
            return [(a, 1.0), (b, -1.0)]
    if node.op == "call_method":
        if node.target in ("add", "add_"):
            return [(a, 1.0), (b, 1.0)]
        if node.target in ("sub", "sub_"):
            return [(a, 1.0), (b, -1.0)]
    return None


def _flat(args) -> list:
    """Nested tuples / lists of arguments as one flat list."""
    out = []
    for a in args:
        out.extend(_flat(a) if isinstance(a, (tuple, list)) else [a])
    return out


def _is_inplace(node: fx.Node) -> bool:
    return node.target in _INPLACE


class BranchReader:
    """The graph-reading half of the pass: needs `self.gm`, `self.graph` and `self.scope`."""

    # ------------------------------------------------------------------ reading the graph
    def _module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def _qual(self, node: fx.Node) -> str:
        t = str(node.target) if node.op == "call_module" else node.name
        return f"{self.scope}.{t}" if self.scope else t

    def _factor(self, value):
        """A numeric factor: python number, or a tensor attribute of the module (learned scalar)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        t = self._constant(value) if isinstance(value, fx.Node) else None
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach()
        return None

    def _constant(self, node: fx.Node, depth: int = 0):
        """The value of a node computed from module attributes only (e.g. `self.alpha[0]`), else None."""
        if depth > 4:
            return None
        if node.op == "get_attr":
            t = self.gm
            for part in str(node.target).split("."):
                t = getattr(t, part, None)
            return t
        if node.kwargs or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        base = self._constant(node.args[0], depth + 1)
        if not isinstance(base, torch.Tensor):
            return None
        rest = node.args[1:]
        if any(isinstance(a, fx.Node) for a in _flat(rest)):
            return None
        if node.op == "call_function" and node.target is operator.getitem:
            return base[rest[0]]
        if node.op == "call_method" and node.target in ("view", "reshape", "squeeze", "unsqueeze", "flatten"):
            return getattr(base, node.target)(*rest)
        return None

    def linear_step(self, node: fx.Node):
        """(input node, Piece) when `node` is one linear piece of a branch, else None."""
        if node.op == "call_module":
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                return None
            m = self._module(node)
            src = node.args[0]
            if is_plain_conv(m) and m.weight.dim() == 4:
                return src, Piece("conv", node, m)
            if is_identity_based_conv(m):
                return src, Piece("idconv", node, m)
            if is_bn_and_pad(m):
                return src, Piece("bnpad", node, m)
            if fold.is_batchnorm(m) and isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) or \
                    fold.is_frozen_batchnorm(m):
                return src, Piece("bn", node, m)
            if type(m) is nn.AvgPool2d:
                return src, Piece("pool", node, m)
            if type(m) is nn.Identity or (type(m) in (nn.Dropout, nn.Dropout2d) and not m.training):
                return src, Piece("identity", node, m)
            return None
        ops = _sum_operands(node)
        if ops is not None:  # `0 + y` (an empty accumulator, as in MobileOne's forward) is y
            nodes = [(x, sign) for x, sign in ops if isinstance(x, fx.Node)]
            zeros = [x for x, _ in ops if isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0]
            if len(nodes) == 1 and len(zeros) == 1 and nodes[0][1] == 1.0 and not _is_inplace(node):
                return nodes[0][0], Piece("identity", node)
            return None
        is_mul = (node.op == "call_function" and node.target in _MULS) or \
            (node.op == "call_method" and node.target in ("mul", "mul_"))
        if is_mul and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            for x, f in ((a, b), (b, a)):
                factor = self._factor(f)
                if isinstance(x, fx.Node) and factor is not None and x.op != "get_attr":
                    if node.target in ("mul_", operator.imul) and (x is not a or len(x.users) > 1):
                        continue  # an in-place scale another user of x would see: not a private branch step
                    return x, Piece("scale", node, factor=factor)
        if node.op == "call_function" and node.target is operator.truediv and len(node.args) == 2:
            a, b = node.args
            factor = self._factor(b)
            if isinstance(a, fx.Node) and isinstance(factor, float) and factor != 0.0:
                return a, Piece("scale", node, factor=1.0 / factor)
        if node.op == "call_function" and node.target is operator.neg and len(node.args) == 1:
            return node.args[0], Piece("scale", node, factor=-1.0)
        return None

    def flatten(self, root: fx.Node):
        """The terms [(node, coef, post)] and numeric constant of the sum rooted at `root`, plus the nodes used.

        `post` lists bias-free linear pieces (identity modules, tensor factors such as a layer scale) that sat
        between an inner sum and the outer one: they distribute over the inner terms.
        """
        terms, const, inner = [], 0.0, []

        def visit(n, coef, post, top):
            nonlocal const
            if isinstance(n, (int, float)) and not isinstance(n, bool):
                if post:
                    return False  # a constant under a tensor factor: not a plain number any more
                const += coef * float(n)
                return True
            if not isinstance(n, fx.Node):
                return False
            expandable = top or len(n.users) == 1
            ops = _sum_operands(n) if expandable else None
            if ops is not None:
                if _is_inplace(n) and isinstance(n.args[0], fx.Node) and len(n.args[0].users) > 1:
                    return False  # the in-place add is seen through another name too: leave it alone
                inner.append(n)
                return all(visit(x, coef * s, post, False) for x, s in ops)
            # An identity module or a factor around an inner sum distributes over it.
            step = self.linear_step(n) if expandable and not top else None
            if step is not None and step[1].kind in ("identity", "scale") and isinstance(step[0], fx.Node) \
                    and _sum_operands(step[0]) is not None and len(step[0].users) == 1:
                inner.append(n)
                piece = step[1]
                if piece.kind == "identity":
                    return visit(step[0], coef, post, False)
                if isinstance(piece.factor, float):
                    return visit(step[0], coef * piece.factor, post, False)
                return visit(step[0], coef, [piece] + post, False)
            terms.append((n, coef, post))
            return True

        ok = visit(root, 1.0, [], True)
        return (terms, const, inner) if ok else None

    def chain(self, node: fx.Node, coef: float, post: list[Piece]) -> Term:
        t = Term(node, coef, [node], post=list(post))
        cur = node
        while True:
            step = self.linear_step(cur)
            if step is None:
                return t
            cur, piece = step
            t.pieces.append(piece)
            t.nodes.append(cur)

