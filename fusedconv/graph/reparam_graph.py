"""The re-parameterization graph pass at one module scope: find sums of linear branches over one input in the
module's own forward (one traced call pattern), merge them into one nn.Conv2d, and rewrite that graph.

How a scope is read:
- its forward is traced with torch.fx (`reparam_leaves.ReparamTracer`: convs and BNs are leaves, other user
  modules are traced through);
- only sums created by this module's own forward are examined (sums inside children were examined at the
  child's own, smaller, scope);
- each sum is flattened and its terms walked back through linear pieces (`reparam_branches.BranchReader`) to
  the latest node that two or more terms share: that is the common input;
- the terms over that input become `ConvMap`s (reparam_math), are merged in float64, checked against the
  original branches on a random float64 input, and replaced by one `call_module` of a new nn.Conv2d with bias.
How the rewritten graphs of a block's call patterns are installed on the block: `reparam_scope.py`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from fusedconv import fold
from fusedconv.graph.chains import writes_in_place
from fusedconv.graph.legality import has_hooks
from fusedconv.graph.reparam_branches import BranchReader, Piece, Term, _owned, _sum_operands
from fusedconv.graph.reparam_leaves import ReparamTracer, plain_bn_reason
from fusedconv.graph.reparam_math import (
    ConvMap, NotMergeable, apply_map, as_pair, avg_pool_map, compose, conv_map, identity_map, merge_sum,
    scale_shift, to_conv2d,
)
from fusedconv.graph.tracing import ScopeGraphModule
from fusedconv.report import ConversionReport

KIND = "reparam"
MERGED_NAME = "reparam_conv"  # timm's name for the same thing, so state_dict keys look familiar

# A merge is accepted when the merged conv reproduces the branches on a random float64 input to this relative
# error; float64 rounding of these sums is ~1e-15, a wrong merge is ~1e-1.
SELF_CHECK_TOL = 1e-9


class ScopePass(BranchReader):
    """Runs the merge on one traced graph of a module scope; `merged` counts the sums replaced, `added` names
    the merged convs (submodules of `gm`)."""

    def __init__(self, module: nn.Module, scope: str, report: ConversionReport, graph: fx.Graph | None = None):
        self.module = module
        self.scope = scope
        self.report = report
        if graph is None:
            graph = ReparamTracer().trace(module)
        self.gm = ScopeGraphModule(module, graph, type(module).__name__)
        self.graph = self.gm.graph
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.merged = 0
        self.added: list[str] = []
        self.taken: set[str] = set()  # names the merged conv may not take (the block's own attributes)
        self.sources: dict[str, tuple] = {}  # merged conv name -> the branch modules merged into it

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
        hooked = self._hooked(group_pieces)
        if hooked is not None:  # merged away, the module would never run again: its hooks would go silent
            raise NotMergeable(f"{hooked} has forward / backward hooks, which must keep seeing its own output",
                               names)
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

    def _hooked(self, pieces: list[Piece]) -> str | None:
        """The first module of `pieces` (or container the trace went through to reach it) carrying hooks."""
        for p in pieces:
            if p.node.op != "call_module":
                continue
            parts = str(p.node.target).split(".")
            for i in range(1, len(parts) + 1):
                path = ".".join(parts[:i])
                if has_hooks(self.module.get_submodule(path)):
                    return f"{self.scope}.{path}" if self.scope else path
        return None

    def _written_between(self, terms: list[Term], root: fx.Node) -> fx.Node | None:
        """An in-place op that runs after the first node of a branch and before the sum: the branches computed
        before it saw their input as it was then, a merged conv running at the sum would see it written."""
        nodes = {n for t in terms for n in t.nodes}
        started = False
        for node in self.graph.nodes:
            if node is root:
                return None
            started = started or node in nodes
            if started and node not in nodes and writes_in_place(node, self._module):
                return node
        return None

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
        written = self._written_between(terms, root)
        if written is not None:
            self.report.add(self.scope, names or (self._qual(root),), KIND, "skipped",
                            f"{written.name} writes a tensor in place between the branches and their sum")
            return
        conv = to_conv2d(merged, dtype, merged.weight.device)
        conv.train(False)
        name = MERGED_NAME
        i = 0
        while hasattr(self.gm, name) or name in self.taken:
            i += 1
            name = f"{MERGED_NAME}_{i}"
        self.gm.add_submodule(name, conv)
        self.added.append(name)
        self.sources[name] = names
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


