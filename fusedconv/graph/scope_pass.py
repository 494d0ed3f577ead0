"""One traced scope of the data-flow pass: plan which chains of its graph to fuse (and which already fused
Sequentials absorb a following add / activation), build their fused modules (FusedConv2d for Conv2d chains;
for Conv1d / Conv3d / ConvTranspose / Linear chains the member of the N-d family `sequential_layers.FUSED_CLASS`
names), and rewrite the graph around them (`ScopePass.plan`, `ScopePass.rewrite_graph`; used by `scope_rewrite.py`)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fusedconv import fold
from fusedconv.activations import ActivationSpec
from fusedconv.graph.chain_match import ChainMatcher
from fusedconv.graph.chains import Absorb, Chain, _flatten_sequential, _node_name
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.fused_linear import FusedLinear
from fusedconv.fused_mixed import FusedMixedConv2d, MixedConv2dKind
from fusedconv.graph import private_residual
from fusedconv.graph.legality import (LAYER_KINDS, chain_base, conv_subclass_reason, fuse_lone_conv, has_hooks,
                                      is_plain_sequential, layer_base, tail_conv)
from fusedconv.graph.sequential import KIND
from fusedconv.graph.sequential_layers import FUSED_CLASS, tail_layer
from fusedconv.modules import FusedConv2d


def chain_start(module: nn.Module) -> tuple | None:
    """(owner, attribute name, layer, containers, base) for the layer whose output `module`'s call produces:
    `module` itself (owner None) or the layer ending a plain Sequential; None when no fusable layer does."""
    base = chain_base(module)
    if base is not None:
        return None, "", module, [], base
    found = tail_conv(module)
    if found is not None:
        return (*found, nn.Conv2d)
    found = tail_layer(module)
    return None if found is None else (*found, layer_base(found[2]))


def absorbable(module: nn.Module) -> bool:
    """An already fused module whose epilogue can still take an activation (and, but for FusedLinear, a residual):
    identity activation and no BatchNorm after it."""
    if type(module) is FusedConv2d:
        return module.act.is_identity
    return (isinstance(module, FusedAffineLayer) and type(module) in FUSED_CLASS.values()
            and module.act.is_identity and module.post_scale is None)


class ScopePass(ChainMatcher):
    """Finds the chains of one traced scope (`plan`) and rewrites its graph around them (`rewrite_graph`)."""

    # ------------------------------------------------------------------ planning and rewriting
    def _fused_module(self, ch: Chain) -> nn.Module:
        conv = ch.conv_module
        if ch.base is MixedConv2dKind:
            return FusedMixedConv2d.from_modules(conv, ch.bn_module, ch.act_spec)
        if ch.base is not nn.Conv2d:
            return self._fused_layer(ch)
        if ch.bn is None and ch.act is None and ch.add is None:
            return fuse_lone_conv(conv)
        if ch.bn_tensors is None:
            return FusedConv2d.from_modules(conv, ch.bn_module, ch.act_spec)
        mean, var, weight, bias, eps = ch.bn_tensors
        scale, shift = fold.bn_scale_shift(mean, var, weight, bias, eps, conv.bias, dtype=torch.float64)
        epi = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
        plain = FusedConv2d.from_modules(conv, None, ch.act_spec)  # resolves padding='same' etc.
        return FusedConv2d(conv.weight, scale.to(epi), shift.to(epi), stride=plain.stride, padding=plain.padding,
                           dilation=plain.dilation, groups=plain.groups, padding_mode=plain.padding_mode,
                           activation=ch.act_spec, pre_pad=plain.pre_pad)

    @staticmethod
    def _fused_layer(ch: Chain) -> FusedAffineLayer:
        """The N-d / transposed / linear fused module of a chain (a functional BN only after Conv1d / Conv3d)."""
        cls, conv = FUSED_CLASS[ch.base], ch.conv_module
        if ch.bn_tensors is None:
            return cls.from_modules(conv, ch.bn_module, ch.act_spec)
        mean, var, weight, bias, eps = ch.bn_tensors
        scale, shift = fold.bn_scale_shift(mean, var, weight, bias, eps, conv.bias, dtype=torch.float64)
        plain = cls.from_modules(conv, None, ch.act_spec)  # resolves padding='same' etc.
        return cls(conv.weight, scale, shift, stride=plain.stride, padding=plain.padding,
                   dilation=plain.dilation, groups=plain.groups, padding_mode=plain.padding_mode,
                   activation=ch.act_spec)

    def _swappable(self, ch: Chain) -> bool:
        if not ch.module_only():
            return False
        for n in ch.nodes:
            if self.calls[n.target] != 1 or self.uses[id(self._mod(n))] != 1:
                return False
            if any(str(t).startswith(f"{n.target}.") for t in self.attr_uses):
                return False
        return True

    def _tail_ok(self, ch: Chain) -> str | None:
        """Why the conv ending a Sequential cannot be replaced inside it (shared containers), or None."""
        owner, name, path = ch.tail
        if self.calls[ch.conv.target] != 1:
            return f"{ch.conv.target} is called {self.calls[ch.conv.target]} times in forward"
        if any(self.uses[id(m)] > 1 for m in path + [ch.conv_module]):
            return f"{ch.conv.target} or its last conv is shared with another part of the model"
        return None

    def plan(self) -> tuple[list[Chain], list[Absorb]]:
        """The chains (with their FusedConv2d built) and absorbs this graph proves fusable; skipped chains are
        reported. Nothing is changed yet (`scope_rewrite` applies them)."""
        chains, claimed = [], set()
        for node in list(self.graph.nodes):
            if node.op != "call_module":
                continue
            found = chain_start(self._mod(node))
            if found is None:
                why = conv_subclass_reason(self._mod(node))
                bn_users = [u for u in node.users if u.op == "call_module" and fold.is_batchnorm(self._mod(u))]
                if why is not None and bn_users:
                    self.report.add(self.scope, [str(node.target), str(bn_users[0].target)], KIND, "skipped", why)
                continue
            owner, name, conv_mod, path, base = found
            tail = None if owner is None else (owner, name, path)
            if tail is None and self.calls[node.target] > 1:
                if any(u.op == "call_module" and fold.is_batchnorm(self._mod(u)) for u in node.users):
                    kind = KIND if base is nn.Conv2d else LAYER_KINDS[base]
                    self.report.add(self.scope, [str(node.target)], kind, "skipped",
                                    f"{base.__name__} module is called {self.calls[node.target]} times in forward")
                continue
            ch = self.match(node, conv_mod, tail, base)
            if ch is None:
                continue
            if ch.reason is None and tail is not None:
                ch.reason = self._tail_ok(ch)
            if ch.add is not None and ch.add in claimed:
                # `bn_a(..) + bn_b(..)`: both chains reach the add; the first one takes it as its residual.
                ch.add, ch.act, ch.act_spec, ch.passthrough = None, None, ActivationSpec(), []
                if ch.bn is None:
                    continue
            claimed.update(ch.nodes)
            chains.append(ch)
        absorbs = [a for a in (self.match_absorb(n, claimed) for n in list(self.graph.nodes)) if a is not None]
        good = []
        for ch in chains:
            if ch.reason is None:
                try:
                    ch.fused = self._fused_module(ch).train(ch.conv_module.training)
                except (ValueError, TypeError, RuntimeError) as e:
                    ch.reason = str(e)
            if ch.reason is not None:
                self.report.add(self.scope, [_node_name(n) for n in ch.nodes], ch.kind, "skipped", ch.reason)
            else:
                good.append(ch)
        return good, absorbs

    def swappable(self, chains: list[Chain], absorbs: list[Absorb]) -> bool:
        """Every chain is module calls only: fusable by swapping children, the forward left as it is."""
        return all(self._swappable(ch) for ch in chains) and all(self._swappable_absorb(a) for a in absorbs)

    def match_absorb(self, node: fx.Node, claimed: set) -> Absorb | None:
        """An Absorb when `node` calls a plain Sequential ending in a fused module (`absorbable`) that an add / act
        follows."""
        if node.op != "call_module" or node in claimed or len(node.args) != 1 or node.kwargs:
            return None
        seq = self._mod(node)
        if not is_plain_sequential(seq) or self.calls[node.target] != 1 or self.uses[id(seq)] != 1:
            return None
        leaves, containers = [], []
        _flatten_sequential(seq, str(node.target), leaves, containers)
        if not leaves or not absorbable(leaves[-1][1]):
            return None
        fused = leaves[-1][1]
        if any(self.uses[id(m)] > 1 for m in containers) or self.uses[id(fused)] > 1:
            return None
        if any(has_hooks(m) for m in [seq, *containers, fused]):
            return None
        if any(isinstance(m, nn.Sequential) or not isinstance(m, nn.Module) for _, m in leaves):
            return None
        a = Absorb(node, [t for t, _ in leaves], fused)
        cur, nxt = node, self._sole_user(node)
        while nxt is not None and self._is_passthrough(nxt, cur):
            a.passthrough.append(nxt)
            cur, nxt = nxt, self._sole_user(nxt)
        if nxt is None or nxt in claimed:
            return None
        spec = self._activation(nxt, cur)
        if spec is not None:
            a.act, a.act_spec = nxt, spec
        elif isinstance(fused, FusedLinear):
            return None  # its epilogue has no residual add
        else:
            other, _ = self._residual_of(nxt, cur)
            if other is None or self._depends_on(other, {node, *a.passthrough}) or \
                    self._mutated_between((node.args[0], other), node, nxt):
                return None
            a.add = nxt
            after = self._sole_user(nxt)
            spec = self._activation(after, nxt) if after is not None and after not in claimed else None
            if spec is not None:
                a.act, a.act_spec = after, spec
        claimed.update(a.nodes)
        return a

    def _swappable_absorb(self, a: Absorb) -> bool:
        """An activation module right after the Sequential: set it on the FusedConv2d, swap it for Identity."""
        return (a.add is None and not a.passthrough and a.act.op == "call_module"
                and self.calls[a.act.target] == 1 and self.uses[id(self._mod(a.act))] == 1)

    @staticmethod
    def _set(root: nn.Module, target: str, value: nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        owner._modules[name] = value

    def fused_name(self, ch: Chain, taken: set) -> str | None:
        """The child name the rewritten graph calls `ch`'s FusedConv2d by (None: it ends a Sequential)."""
        if ch.tail is not None:
            return None
        name = str(ch.conv.target)
        if "." in name or any(str(t).startswith(f"{name}.") for t in self.attr_uses):
            # A grandchild (self.block[0]), or a conv whose parameters forward also reads: register the
            # fused module under a new flat name and leave the conv where it is.
            base = name.replace(".", "_") + ("" if "." in name else "_fused")
            name, k = base, 1
            while name in self.module._modules or hasattr(self.module, name) or name in taken:
                name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def rewrite_graph(self, chains: list[Chain], absorbs: list[Absorb], names: dict[str, str]) -> set:
        """Edit the graph in place so each chain runs as one call of its FusedConv2d (`names`: conv target ->
        the child name to call). Returns the call nodes kept on purpose (Sequentials ending in a fused conv)."""
        graph = self.graph
        kept = set()
        residual_calls = []  # fused calls with a residual not proved private yet (it may be the block's input)
        for ch in chains:
            if ch.tail is not None:  # the Sequential's last conv will compute the chain: drop the rest
                ch.last.replace_all_uses_with(ch.conv)
                for n in reversed(ch.nodes[1:]):
                    graph.erase_node(n)
                kept.add(ch.conv)
                continue
            name = names[str(ch.conv.target)]
            last = ch.last
            residual = None
            if ch.add is not None:  # read it now: an earlier rewrite may have replaced that node
                a, b = ch.add.args
                residual = b if a is ch.value else a
            # Run the fused module where its inputs were read: at the conv (input only) or at the add (input
            # and residual), so no later operation of the scope can have changed them in between.
            kwargs = {}
            if residual is not None:  # the residual conv may write into a residual the block proves private
                kwargs, readers = private_residual.mark(graph, residual, ch.fused, ch.add, name)
                kept.update(readers)
            with graph.inserting_before(ch.conv if residual is None else ch.add):
                args = (ch.conv.args[0],) if residual is None else (ch.conv.args[0], residual)
                new = graph.call_module(name, args, kwargs)
            kept.add(new)
            if residual is not None and not kwargs and type(ch.fused) is FusedConv2d:
                residual_calls.append(new)
            last.replace_all_uses_with(new)
            for n in reversed(ch.nodes):
                graph.erase_node(n)
        for a in absorbs:
            if a.add is None:  # the activation moves into the FusedConv2d: the Sequential's output is final
                a.act.replace_all_uses_with(a.act.args[0])
                graph.erase_node(a.act)
                kept.add(a.seq)
                continue
            a_, b_ = a.add.args
            residual = b_ if a_ is a.value else a_
            prev = a.seq.args[0]
            with graph.inserting_before(a.seq):
                for target in a.leaves[:-1]:
                    prev = graph.call_module(target, (prev,))
            with graph.inserting_before(a.add):
                new = graph.call_module(a.leaves[-1], (prev, residual))
            kept.add(new)
            if type(a.fused) is FusedConv2d:  # (only FusedConv2d takes residual_private)
                residual_calls.append(new)
            a.nodes[-1].replace_all_uses_with(new)
            for n in reversed(a.nodes):
                graph.erase_node(n)
        for n in list(graph.nodes):  # buffers only F.batch_norm read
            if n.op == "get_attr" and not n.users:
                graph.erase_node(n)
        # An identity residual (the block's input) read last by its fused call: written in place when the caller
        # owns the input (private_residual.mark_owned_input, owned_input.OwnedInputSequential).
        # (Not in an fx.GraphModule scope: its graph is its forward, whose signature must not change.)
        if not isinstance(self.module, fx.GraphModule):
            kept.update(private_residual.mark_owned_input(graph, residual_calls))
        graph.lint()
        return kept
