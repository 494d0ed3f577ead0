"""The re-parameterization graph pass at one module scope: find sums of linear branches over one input in the
module's own forward (torch.fx), merge them into one nn.Conv2d, and return the rewritten scope.

How a scope is read:
- it is traced with torch.fx; convs (any subclass), batch norms (any subclass), FusedConv2d and DBB's
  BN-and-pad layer stay leaves, other user modules are traced through, so a branch like `self.conv_kxk(x)` (a
  ConvNormAct) shows as its conv and BN nodes. Leaves are trusted only when their forward is known: plain
  nn.Conv2d, DBB's IdentityBasedConv1x1, BatchNorm2d / SyncBatchNorm / FrozenBatchNorm2d, timm's
  BatchNormAct2d without activation, nn.AvgPool2d, nn.Identity, eval nn.Dropout;
- only sums created by this module's own forward are examined (sums inside children were examined at the
  child's own, smaller, scope);
- a sum is flattened through single-use additions / subtractions (and identity modules or numeric factors
  between them); each term is walked back through linear pieces (conv, eval BN, avg pool, identity, numeric or
  learned scalar factor) to the latest node that two or more terms share: that is the common input;
- the terms over that input become `ConvMap`s (reparam_math), are merged in float64, checked against the
  original branches on a random float64 input, and replaced by one `call_module` of a new nn.Conv2d with bias.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedconv import fold
from fusedconv.graph.reparam_math import (
    ConvMap, NotMergeable, apply_map, as_pair, avg_pool_map, compose, conv_map, identity_map, merge_sum,
    scale_shift, to_conv2d,
)
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.modules import FusedConv2d
from fusedconv.graph.tracing import ScopeGraphModule
from fusedconv.report import ConversionReport

KIND = "reparam"
MERGED_NAME = "reparam_conv"  # timm's name for the same thing, so state_dict keys look familiar

_ADDS = {operator.add, operator.iadd, torch.add}
_SUBS = {operator.sub, operator.isub, torch.sub}
_INPLACE = {operator.iadd, operator.isub, "add_", "sub_"}
_MULS = {operator.mul, operator.imul, torch.mul}

# A merge is accepted when the merged conv reproduces the branches on a random float64 input to this relative
# error; float64 rounding of these sums is ~1e-15, a wrong merge is ~1e-1.
SELF_CHECK_TOL = 1e-9


def is_bn_and_pad(module: nn.Module) -> bool:
    """DBB's BNAndPadLayer: BN, then pads `pad_pixels` on every side with the value BN gives a zero input."""
    return (type(module).__name__ == "BNAndPadLayer" and fold.is_batchnorm(getattr(module, "bn", None))
            and isinstance(getattr(module, "pad_pixels", None), int))


def is_identity_based_conv(module: nn.Module) -> bool:
    """DBB's IdentityBasedConv1x1: a bias-free 1x1 conv whose forward adds a fixed identity to its weight."""
    return (type(module).__name__ == "IdentityBasedConv1x1" and isinstance(module, nn.Conv2d)
            and isinstance(getattr(module, "id_tensor", None), torch.Tensor) and module.bias is None
            and module.kernel_size == (1, 1) and module.id_tensor.shape == module.weight.shape)


def plain_bn_reason(bn: nn.Module) -> str | None:
    """None when `bn`'s forward is exactly the BatchNorm formula (in eval mode), else why it is not."""
    cls = type(bn)
    if cls in (nn.BatchNorm2d, nn.SyncBatchNorm) or fold.is_frozen_batchnorm(bn):
        return None
    if cls.__name__ == "BatchNormAct2d" and isinstance(bn, nn.BatchNorm2d) and \
            isinstance(getattr(bn, "act", None), nn.Identity) and isinstance(getattr(bn, "drop", None), nn.Identity):
        # timm's norm layer with apply_act=False: BatchNorm2d's formula, then two nn.Identity.
        return None
    if cls.__name__ == "BatchNormAct2d":
        return f"{cls.__name__} applies {type(getattr(bn, 'act', None)).__name__} after the normalisation"
    return f"{cls.__name__} overrides BatchNorm's forward"


def is_plain_conv(module: nn.Module) -> bool:
    """nn.Conv2d or a subclass that keeps its forward (so its weight/geometry say everything)."""
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward


class ReparamTracer(fx.Tracer):
    """Keeps the modules the pass reasons about (and FusedConv2d, which checks its inputs eagerly) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.modules.conv._ConvNd, _BatchNorm, FusedConv2d, FusedAffineLayer)) or fold.is_batchnorm(m) \
                or is_bn_and_pad(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


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


class ScopePass:
    """Runs the merge on one traced module scope; `merged` counts the sums replaced."""

    def __init__(self, module: nn.Module, scope: str, report: ConversionReport):
        self.module = module
        self.scope = scope
        self.report = report
        graph = ReparamTracer().trace(module)
        self.gm = ScopeGraphModule(module, graph, type(module).__name__)
        self.graph = self.gm.graph
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.merged = 0

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

    # ------------------------------------------------------------------ building maps
    def _input_channels(self, terms: list[Term], source: fx.Node) -> int:
        for t in terms:
            j = t.nodes.index(source)
            for piece in reversed(t.pieces[:j]):
                m = piece.module
                if piece.kind in ("conv", "idconv"):
                    return m.in_channels
                if piece.kind == "bn":
                    return m.running_mean.numel() if m.running_mean is not None else m.num_features
                if piece.kind == "bnpad":
                    return m.bn.num_features
        raise NotMergeable("no branch fixes the number of input channels")

    def apply_piece(self, m: ConvMap, piece: Piece) -> ConvMap:
        mod = piece.module
        if piece.kind == "conv":
            return compose(m, conv_map(mod))
        if piece.kind == "idconv":  # its forward: conv2d(x, weight + id_tensor, stride 1, padding 0)
            w = mod.weight.detach().to(torch.float64) + mod.id_tensor.detach().to(mod.weight.device, torch.float64)
            return compose(m, ConvMap(w, torch.zeros(w.shape[0], dtype=torch.float64, device=w.device),
                                      dilation=as_pair(mod.dilation), groups=mod.groups))
        if piece.kind in ("bn", "bnpad"):
            bn = mod.bn if piece.kind == "bnpad" else mod
            reason = plain_bn_reason(bn)
            if reason is not None:
                raise NotMergeable(f"{piece.name()}: {reason}")
            try:
                scale, shift = fold.fold_bn(bn, None, dtype=torch.float64)
            except (RuntimeError, ValueError, TypeError) as e:
                raise NotMergeable(f"{piece.name()}: {e}") from None
            if scale.numel() != m.out_channels:
                raise NotMergeable(f"{piece.name()}: BatchNorm has {scale.numel()} features, the branch has "
                                   f"{m.out_channels} channels")
            out = scale_shift(m, scale, shift)
            if piece.kind == "bn" or mod.pad_pixels == 0:
                return out
            # BN then a border filled with BN(0): exact as extra zero padding of the input only when the map so
            # far is pointwise (every output depends on one input pixel) and gives BN(0) on a zero input.
            if not (m.is_pointwise and m.stride == (1, 1)) or bool((m.bias != 0).any()):
                raise NotMergeable(f"{piece.name()}: pads with BN(0), which matches the branch's border only after "
                                   "a bias-free, stride-1 pointwise conv")
            p = mod.pad_pixels
            return ConvMap(out.weight, out.bias, out.stride, (out.padding[0] + p, out.padding[1] + p),
                           out.dilation, out.groups)
        if piece.kind == "pool":
            return compose(m, avg_pool_map(mod, m.out_channels, m.weight.device))
        if piece.kind == "identity":
            return m
        if piece.kind == "scale":
            f = piece.factor
            if isinstance(f, float):
                return scale_shift(m, torch.tensor([f], dtype=torch.float64))
            c = m.out_channels
            if f.numel() == 1 or tuple(f.shape) in ((c, 1, 1), (1, c, 1, 1)):
                return scale_shift(m, f)
            raise NotMergeable(f"{piece.name()}: factor of shape {tuple(f.shape)} is not a scalar or per-channel")
        raise AssertionError(piece.kind)

    def term_map(self, t: Term, source: fx.Node, channels: int, device) -> ConvMap:
        j = t.nodes.index(source)
        m = identity_map(channels, device)
        for piece in reversed(t.pieces[:j]):
            m = self.apply_piece(m, piece)
        for piece in t.post:
            m = self.apply_piece(m, piece)
        if t.coef != 1.0:
            m = scale_shift(m, torch.tensor([t.coef], dtype=torch.float64))
        return m

    # ------------------------------------------------------------------ the check
    def self_check(self, group: list[Term], source: fx.Node, const: float, merged: ConvMap) -> float:
        """Max relative error of the merged conv against the original branch modules, both in float64."""
        def run(piece: Piece, y: torch.Tensor) -> torch.Tensor:
            if piece.kind == "scale":
                f = piece.factor
                return y * (f if isinstance(f, float) else f.detach().to(torch.float64))
            if piece.kind == "identity":
                return y
            if piece.kind == "conv":  # a plain nn.Conv2d (checked): its formula, computed fast in float64
                return apply_map(conv_map(piece.module), y)
            # The module's own forward, with its floating-point state swapped for float64 copies.
            state = {k: (v.detach().to(torch.float64) if v.is_floating_point() else v)
                     for k, v in list(piece.module.named_parameters()) + list(piece.module.named_buffers())}
            return torch.func.functional_call(piece.module, state, (y,))

        # Small but with both borders and an interior in each dimension, odd and even sizes (stride parity).
        h, w = (2 * d * (k - 1) + 2 * s + 1 for k, s, d in zip(merged.kernel_size, merged.stride, merged.dilation))
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, merged.in_channels, h, w + 1, generator=g, dtype=torch.float64).to(merged.weight.device)
        ref = None
        for t in group:
            y = x
            for piece in reversed(t.pieces[:t.nodes.index(source)]):
                y = run(piece, y)
            for piece in t.post:
                y = run(piece, y)
            y = y * t.coef
            ref = y if ref is None else ref + y
        ref = ref + const
        out = apply_map(merged, x)
        if out.shape != ref.shape:
            raise NotMergeable(f"merged conv gives shape {tuple(out.shape)}, the branches {tuple(ref.shape)}")
        return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))

    # ------------------------------------------------------------------ the pass
    def run(self) -> int:
        consumed: set[fx.Node] = set()
        for node in reversed(list(self.graph.nodes)):
            if node in consumed or node.graph is not self.graph or not _owned(node):
                continue
            if _sum_operands(node) is None:
                continue
            flat = self.flatten(node)
            if flat is None:
                continue
            terms, const, inner = flat
            consumed.update(inner)
            self.try_merge(node, terms, const)
        if self.merged:
            # nn.Identity calls (timm's `attn`, `drop_path` at inference) between the merged conv and its
            # activation would hide the conv -> act chain from convert(): drop them in the rewritten scope.
            for node in list(self.graph.nodes):
                if node.op == "call_module" and type(self._module(node)) is nn.Identity and \
                        len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
                    node.replace_all_uses_with(node.args[0])
                    self.graph.erase_node(node)
            self.graph.eliminate_dead_code()
            self.gm.delete_all_unused_submodules()
            self.graph.lint()
            self.gm.recompile()
        return self.merged

    def _sources(self, terms: list[Term]) -> list[fx.Node]:
        """Candidate common inputs, best first: nodes two or more terms reach through linear pieces only,
        the most terms first, then the latest (the closest to the sum)."""
        if len(terms) == 1:
            # A "sum" of one branch and numeric zeros / constants (MobileOne's `0 + conv_bn(x) + 0` when the
            # block has a single branch): the branch itself, from its farthest linear input inwards.
            return list(reversed(terms[0].nodes[1:]))
        counts = {}
        for t in terms:
            for n in set(t.nodes):
                counts[n] = counts.get(n, 0) + 1
        shared = [n for n, c in counts.items() if c >= 2]
        return sorted(shared, key=lambda n: (counts[n], self.order[n]), reverse=True)

    def _merge_over(self, terms: list[Term], source: fx.Node, const: float):
        """(merged ConvMap, group, rest, names, dtype) for the terms reading `source`, None when there is
        nothing to merge there; raises NotMergeable with the reason when it cannot be done exactly."""
        group = [t for t in terms if source in t.nodes]
        rest = [t for t in terms if source not in t.nodes]
        if any(t.post for t in rest):
            return None  # rebuilding a factor around the leftover operands is not worth the risk
        group_pieces = [p for t in group for p in t.pieces[:t.nodes.index(source)] + t.post]
        if not any(p.kind in ("conv", "idconv", "pool") for p in group_pieces):
            return None  # nothing spatial to merge into (e.g. x + bn(x)): shapes unknown, leave it to other passes
        names = tuple(self._qual(p.node) for t in group for p in reversed(t.pieces[:t.nodes.index(source)])
                      if p.node.op == "call_module" and p.kind != "identity")
        shared = [n for t in group for n in t.nodes[:t.nodes.index(source)] if len(n.users) > 1]
        if shared:
            # The branch would have to run anyway for its other user: merging would add a conv, not remove one.
            if len(group) == 1:
                return None
            raise NotMergeable(f"branch value {shared[0].name} is also used outside the sum", names)
        state = [t for p in group_pieces if p.module is not None
                 for t in list(p.module.parameters()) + list(p.module.buffers()) if t.is_floating_point()]
        dev = state[0].device if state else None
        conv_weights = [p.module.weight for p in group_pieces if p.kind in ("conv", "idconv")]
        dtype = conv_weights[0].dtype if conv_weights else (state[0].dtype if state else torch.get_default_dtype())
        try:
            channels = self._input_channels(group, source)
            maps = [self.term_map(t, source, channels, dev) for t in group]
            merged = merge_sum(maps)
            if const:
                merged = ConvMap(merged.weight, merged.bias + const, merged.stride, merged.padding,
                                 merged.dilation, merged.groups)
            err = self.self_check(group, source, const, merged)
            if not err <= SELF_CHECK_TOL:
                raise NotMergeable(f"self-check failed: merged conv differs from the branches by {err:.2e} "
                                   "relative (a branch does something this pass does not model)")
        except NotMergeable as e:
            raise NotMergeable(str(e), names) from None
        except Exception as e:  # noqa: BLE001 - a model this pass misreads must not break the conversion
            raise NotMergeable(f"internal error while merging ({type(e).__name__}: {e}); please report it",
                               names) from None
        return merged, group, rest, names, dtype

    def try_merge(self, root: fx.Node, term_nodes, const: float) -> None:
        terms = [self.chain(n, c, post) for n, c, post in term_nodes]
        first_failure = None
        for source in self._sources(terms):
            try:
                found = self._merge_over(terms, source, const)
            except NotMergeable as e:
                first_failure = first_failure or e
                continue
            if found is not None:
                break
        else:
            if first_failure is not None:
                reason, names = first_failure.args
                self.report.add(self.scope, names, KIND, "skipped", reason)
            else:
                self._report_nonlinear(terms)
            return
        merged, group, rest, names, dtype = found
        conv = to_conv2d(merged, dtype, merged.weight.device)
        conv.train(False)
        name = MERGED_NAME
        i = 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{MERGED_NAME}_{i}"
        self.gm.add_submodule(name, conv)
        with self.graph.inserting_before(root):
            new = self.graph.call_module(name, (source,))
            for t in rest:
                op = operator.add if t.coef > 0 else operator.sub
                operand = t.node if abs(t.coef) == 1.0 else self.graph.call_function(operator.mul,
                                                                                    (t.node, abs(t.coef)))
                new = self.graph.call_function(op, (new, operand))
        root.replace_all_uses_with(new)
        self.merged += 1
        kinds = "; ".join(self._describe(t, source) for t in group)
        self.report.add(self.scope, names, KIND, "fused",
                        f"{len(group)} branch{'es' if len(group) > 1 else ''} ({kinds}) -> {name} "
                        f"{merged.describe()}")

    def _report_nonlinear(self, terms: list[Term]) -> None:
        """Report a term that is directly a non-linear op (e.g. relu(bn(conv1x1(x)))) over a conv branch of an
        input another term also reads: a RepVGG-like block that is not linear before its sum. Terms that end
        in linear pieces after the non-linearity (a ResNet block's main path) are ordinary residuals: not
        reported."""
        for t in terms:
            if t.pieces or len(terms) < 2:
                continue
            args = [a for a in t.node.args if isinstance(a, fx.Node)]
            if t.node.op not in ("call_module", "call_function", "call_method") or not args:
                continue
            inner = self.chain(args[0], 1.0, [])
            if not any(p.kind in ("conv", "idconv") for p in inner.pieces):
                continue
            others = {n for o in terms if o is not t for n in o.nodes}
            if others.intersection(inner.nodes[1:]):
                what = str(t.node.target) if t.node.op == "call_module" else getattr(t.node.target, "__name__",
                                                                                      str(t.node.target))
                names = tuple(self._qual(p.node) for p in reversed(inner.pieces) if p.node.op == "call_module")
                self.report.add(self.scope, names + (self._qual(t.node),), KIND, "skipped",
                                f"a branch is not linear before the sum ({what} after its conv): left as is")
                return

    def _describe(self, t: Term, source: fx.Node) -> str:
        parts = []
        for p in reversed(t.pieces[:t.nodes.index(source)]):
            if p.kind in ("conv", "idconv"):
                parts.append(f"conv{p.module.kernel_size[0]}x{p.module.kernel_size[1]}")
            elif p.kind in ("bn", "bnpad", "pool"):
                parts.append({"bn": "bn", "bnpad": "bn+pad", "pool": "avgpool"}[p.kind])
            elif p.kind == "scale":
                parts.append("scale")
        return "+".join(parts) or "identity"


def reparameterize_scope(module: nn.Module, scope: str, report: ConversionReport,
                         traced: ScopePass | None = None) -> nn.Module:
    """`module` with the mergeable sums of its own forward merged (a GraphModule then), or `module` itself.

    Raises whatever torch.fx raises when the module cannot be traced (pass `traced` to trace separately).
    """
    sp = traced if traced is not None else ScopePass(module, scope, report)
    if not sp.run():
        return module
    gm = sp.gm
    gm.training = module.training  # the GraphModule starts in training mode; its children keep their own
    # Keep the block's simple configuration attributes (e.g. `groups`) readable on the replacement.
    for k, v in vars(module).items():
        if not k.startswith("_") and k != "training" and not hasattr(gm, k) and \
                isinstance(v, (bool, int, float, str, tuple)):
            setattr(gm, k, v)
    return gm
