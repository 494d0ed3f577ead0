"""The data-flow pass: find Conv2d -> BN (-> act) (-> + residual -> act) chains in what each module computes.

Every module scope is traced on its own with torch.fx, all of its submodules kept as leaves, so a chain is
always found at the smallest scope that holds it. Scopes fx cannot trace (data-dependent control flow, list
inputs, ...) are not a dead end: their children are visited and tried in turn, and plain nn.Sequential chains
are fused without tracing (`sequential.py`).

A chain is fused only when the graph proves it is exactly equivalent:
  * the conv's output feeds the BN and nothing else, and the BN's output feeds only the activation / add
    (through calls that are the identity in eval mode: nn.Identity, dropout, drop-path);
  * the add's other operand is a computed tensor that does not depend on the chain and is not one that
    usually broadcasts (a parameter, a constant, a reduction / reshape / indexing result), and an in-place add
    updates the chain's value, not the other operand;
  * the BN's forward is understood (`legality.batchnorm_verdict`), with eval-mode running statistics;
  * the conv is exactly nn.Conv2d, called at one call site (subclasses may compute differently: reported).
"Conv" may also be a plain nn.Sequential that ends in a conv (a BN after it folds into that last conv), and a
plain nn.Sequential ending in an already fused FusedConv2d passes a following add / activation into that
module's epilogue (the Sequential call is then inlined into its children's calls: `Absorb`).

How a scope is rewritten (`scope_rewrite.py`): each call pattern of its forward is traced (`patterns.py`),
the chains found here become FusedConv2d modules, and the block stays the same object:
  * if every chain is made of module calls (conv, BN, activation module) each called once and held in one
    place only, the conv child becomes the FusedConv2d and the others nn.Identity;
  * otherwise (a residual add joins the epilogue, a functional activation or F.batch_norm, an activation
    module used at two call sites as in torchvision's BasicBlock) each pattern's graph is rewritten to call
    the FusedConv2d, registered under the conv's attribute name, and runs as that pattern's specialization.
Unless the forward is proven to depend on nothing but its tensor inputs, the block dispatches through guards
(`specialize.py`) with its own forward over role children (`roles.py`) as the exact fallback.
"""

from __future__ import annotations

import inspect
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fusedconv import fold
from fusedconv.activations import ActivationSpec, spec_from_call, spec_from_module
from fusedconv.graph.legality import (batchnorm_verdict, conv_skip_reason, conv_subclass_reason, is_fusable_conv,
                                      has_hooks, hook_reason, is_leaf_type, module_use_counts, tail_conv)
from fusedconv.graph.sequential import KIND, fuse_sequential, is_plain_sequential
from fusedconv.graph.patterns import UnsupportedSignature, call_patterns, forward_params
from fusedconv.graph.specialize import guard_table
from fusedconv.graph.tracing import trace_scope, visit_children
from fusedconv.modules import FusedConv2d
from fusedconv.report import ConversionReport

_ADD_FUNCTIONS = (operator.add, torch.add, operator.iadd)
_ADD_METHODS = ("add", "add_")
_BN_FUNCTIONS = (F.batch_norm,)
_INPLACE_FUNCTIONS = (operator.iadd, operator.setitem)
_BN_PARAMS = list(inspect.signature(F.batch_norm).parameters)
# Nodes that produce Python numbers / shapes rather than tensors (cannot be a residual).
_NON_TENSOR_METHODS = ("size", "dim", "numel", "item", "tolist")
# Nodes whose output usually has another shape than a conv output (per-channel or per-sample vectors,
# pooled maps): added to one they broadcast, which the fused epilogue does not do, so they are not residuals.
_RESHAPING_METHODS = ("view", "reshape", "unsqueeze", "expand", "flatten", "mean", "sum", "amax", "amin",
                      "max", "min", "squeeze", "permute", "transpose", "__getitem__")
_RESHAPING_FUNCTIONS = (operator.getitem, torch.reshape, torch.unsqueeze, torch.flatten, torch.mean, torch.sum,
                        torch.amax, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.linear)
_RESHAPING_MODULES = (nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__


@dataclass
class Chain:
    """One Conv -> [BN] -> [act] / [add -> act] chain found in a scope's graph."""

    conv: fx.Node
    conv_module: nn.Conv2d
    tail: tuple | None = None                   # (owner Sequential, name, containers) when conv ends a Sequential
    bn: fx.Node | None = None
    bn_module: nn.Module | None = None          # the BN module (module call or functional BN's owner)
    bn_tensors: tuple | None = None             # (mean, var, weight, bias, eps) of a functional F.batch_norm
    act: fx.Node | None = None                  # activation call (module, function or method)
    act_spec: ActivationSpec = field(default_factory=ActivationSpec)
    add: fx.Node | None = None
    passthrough: list = field(default_factory=list)  # identity-in-eval calls between BN and the add / act
    reason: str | None = None                   # why it is skipped (None: fuse it)
    fused: FusedConv2d | None = None            # the replacement, once built

    @property
    def nodes(self) -> list[fx.Node]:
        """The chain's call sites in data-flow order (the first is the conv, or the Sequential ending in it)."""
        return [n for n in (self.conv, self.bn, *self.passthrough, self.add, self.act) if n is not None]

    @property
    def value(self) -> fx.Node:
        """The node whose output the add / activation reads (the chain's value before them)."""
        return ([n for n in (self.conv, self.bn) if n is not None] + self.passthrough)[-1]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]

    def module_only(self) -> bool:
        """Conv, BN and activation are module calls, no add: fusable by swapping children."""
        return (self.add is None and self.bn_tensors is None and not self.passthrough
                and all(n.op == "call_module" for n in self.nodes))

    def detail(self) -> str:
        parts = []
        if self.bn is not None:
            parts.append("bn" if self.bn_tensors is None else "F.batch_norm")
        if self.add is not None:
            parts.append("add")
        if not self.act_spec.is_identity:
            parts.append(str(self.act_spec))
        return "+".join(parts)


@dataclass
class Absorb:
    """A plain Sequential whose last op is an already fused FusedConv2d (identity activation), followed in this
    scope by an add and / or an activation: they join that FusedConv2d's epilogue. With an add, the Sequential
    call is inlined into its children's calls so the last one can take the residual."""

    seq: fx.Node
    leaves: list                                # qualified names of the Sequential's non-Identity leaves
    fused: FusedConv2d
    passthrough: list = field(default_factory=list)
    add: fx.Node | None = None
    act: fx.Node | None = None
    act_spec: ActivationSpec = field(default_factory=ActivationSpec)

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.seq, *self.passthrough, self.add, self.act) if n is not None]

    @property
    def value(self) -> fx.Node:
        return ([self.seq] + self.passthrough)[-1]

    def detail(self) -> str:
        parts = (["add"] if self.add is not None else []) + ([str(self.act_spec)] if self.act is not None else [])
        return "+".join(parts) + f" into {self.leaves[-1]}"


def _flatten_sequential(seq: nn.Module, prefix: str, out: list, containers: list) -> None:
    """Qualified names and modules of a plain Sequential's leaves, nested plain Sequentials expanded."""
    for name, child in seq._modules.items():
        if child is None:
            continue
        if is_plain_sequential(child):
            containers.append(child)
            _flatten_sequential(child, f"{prefix}.{name}", out, containers)
        elif type(child) is not nn.Identity:
            out.append((f"{prefix}.{name}", child))


def _node_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _get_attr(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class ScopePass:
    """Finds the chains of one traced scope (`plan`) and rewrites its graph around them (`rewrite_graph`)."""

    def __init__(self, module: nn.Module, graph: fx.Graph, scope: str, uses: Counter, report: ConversionReport):
        self.module = module
        self.graph = graph
        self.scope = scope
        self.uses = uses
        self.report = report
        self.calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        self.attr_uses = [n.target for n in graph.nodes if n.op == "get_attr"]

    def _mod(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return self.module.get_submodule(node.target)

    # ------------------------------------------------------------------ matching
    def _sole_user(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def _activation(self, node: fx.Node, value: fx.Node) -> ActivationSpec | None:
        """The spec when `node` applies an activation to `value` only, else None."""
        if not node.args or node.args[0] is not value:
            return None
        if node.op == "call_module":
            spec = spec_from_module(self._mod(node))
            # An activation module carrying hooks stays a call of its own (the chain stops before it).
            ok = spec is not None and len(node.args) == 1 and not node.kwargs and not has_hooks(self._mod(node))
            return spec if ok and not spec.is_identity else None
        if node.op in ("call_function", "call_method"):
            if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
                return None
            spec = spec_from_call(node.target, node.args, node.kwargs)
            return spec if spec is not None and not spec.is_identity else None
        return None

    def _residual_of(self, add: fx.Node, value: fx.Node) -> tuple[fx.Node | None, str | None]:
        """(other operand, None) when `add` is `value + other` fusable into the epilogue, else (None, reason)."""
        if add.op == "call_function" and add.target in _ADD_FUNCTIONS:
            if add.kwargs or len(add.args) != 2:
                return None, "add with extra arguments (alpha / out)"
        elif add.op == "call_method" and add.target in _ADD_METHODS:
            if add.kwargs or len(add.args) != 2:
                return None, "add with extra arguments (alpha)"
        else:
            return None, None
        a, b = add.args
        inplace = add.target in ("add_", operator.iadd)
        if a is value and b is value:
            return None, "adds the chain's output to itself"
        if inplace and a is not value:
            return None, "in-place add updates the other operand"
        other = b if a is value else a
        if not isinstance(other, fx.Node):
            return None, "adds a constant (may broadcast)"
        if other.op == "get_attr":
            return None, "adds a parameter or buffer (may broadcast)"
        if other.op == "call_method" and other.target in _NON_TENSOR_METHODS:
            return None, "adds a non-tensor value"
        if other.op == "call_function" and other.target is getattr:
            return None, "adds a non-tensor value"
        if ((other.op == "call_method" and other.target in _RESHAPING_METHODS)
                or (other.op == "call_function" and other.target in _RESHAPING_FUNCTIONS)
                or (other.op == "call_module" and isinstance(self._mod(other), _RESHAPING_MODULES))):
            return None, f"adds the output of {_node_name(other)} (may broadcast)"
        return other, None

    def _mutated_between(self, value, start: fx.Node, end: fx.Node) -> bool:
        """Whether a visible in-place operation on `value` runs after `start` and before `end` (the fused module
        then runs at `end` and must read `value` as `start` did)."""
        if not isinstance(value, fx.Node):
            return False
        node = start.next
        while node is not end and node.op != "output":
            if node.args and node.args[0] is value:
                if node.op == "call_method" and str(node.target).endswith("_"):
                    return True
                if node.op == "call_function" and (node.kwargs.get("inplace") or node.target in _INPLACE_FUNCTIONS
                                                   or str(getattr(node.target, "__name__", "")).endswith("_")):
                    return True
                if node.op == "call_module" and getattr(self._mod(node), "inplace", False):
                    return True
            node = node.next
        return False

    def _is_passthrough(self, node: fx.Node, value: fx.Node) -> bool:
        """`node` returns `value` unchanged in eval mode: nn.Identity, dropout, drop-path / stochastic depth."""
        if node.op != "call_module" or node.args != (value,) or node.kwargs:
            return False
        m = self._mod(node)
        if has_hooks(m):
            return False
        if type(m) is nn.Identity:
            return True
        if m.training:
            return False
        if type(m) in (nn.Dropout, nn.Dropout2d, nn.AlphaDropout):
            return True
        # Drop-path layers are the identity in eval mode (timm's DropPath, torchvision's StochasticDepth).
        return ((type(m).__name__ == "DropPath" and (type(m).__module__ or "").startswith("timm."))
                or (type(m).__name__ == "StochasticDepth" and (type(m).__module__ or "").startswith("torchvision.")))

    def _functional_bn(self, node: fx.Node, conv: fx.Node):
        """(owner module or None, (mean, var, weight, bias, eps), reason) for an F.batch_norm call on `conv`."""
        bound = dict(zip(_BN_PARAMS, node.args))
        bound.update(node.kwargs)
        if bound.get("input") is not conv:
            return None, None, "F.batch_norm's input is not the conv output"
        if bound.get("training", False) is not False:
            return None, None, "F.batch_norm is called with training=True (batch statistics)"
        tensors = []
        for key in ("running_mean", "running_var", "weight", "bias"):
            arg = bound.get(key)
            if arg is None and key in ("weight", "bias"):
                tensors.append(None)
                continue
            if not isinstance(arg, fx.Node) or arg.op != "get_attr":
                return None, None, f"F.batch_norm's {key} is not a module parameter or buffer"
            t = _get_attr(self.module, arg.target)
            if not isinstance(t, torch.Tensor):
                return None, None, f"F.batch_norm's {key} is not a tensor"
            tensors.append(t)
        eps = bound.get("eps", 1e-5)
        if not isinstance(eps, (int, float)):
            return None, None, "F.batch_norm's eps is not a constant"
        return None, (*tensors, float(eps)), None

    def _depends_on(self, node: fx.Node, targets: set) -> bool:
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in targets:
                return True
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return False

    def match(self, conv: fx.Node, conv_mod: nn.Conv2d, tail: tuple | None) -> Chain | None:
        ch = Chain(conv, conv_mod, tail)
        users = list(conv.users)
        bn_users = [u for u in users if (u.op == "call_module" and fold.is_batchnorm(self._mod(u)))
                    or (u.op == "call_function" and u.target in _BN_FUNCTIONS)]
        if len(conv.args) != 1 or conv.kwargs:
            return None
        if bn_users and len(users) > 1:
            ch.bn = bn_users[0]
            ch.reason = f"conv output is used {len(users)} times (not only by the BatchNorm)"
            return ch
        if tail is not None and not bn_users:
            return None  # a Sequential ending in a conv, without a BN after it: nothing gained
        cur = conv
        if bn_users:
            bn = bn_users[0]
            ch.bn = bn
            if bn.op == "call_module":
                if len(bn.args) != 1 or bn.kwargs:
                    ch.reason = "BatchNorm called with extra arguments"
                    return ch
                ch.bn_module = self._mod(bn)
                verdict = batchnorm_verdict(ch.bn_module)
                if not verdict.ok:
                    ch.reason = verdict.reason
                    return ch
                if verdict.act is not None and not verdict.act.is_identity:
                    ch.act_spec = verdict.act  # the norm-act module applies it; nothing may follow in the epilogue
            else:
                _, tensors, reason = self._functional_bn(bn, conv)
                if reason is not None:
                    ch.reason = reason
                    return ch
                ch.bn_tensors = tensors
            cur = bn
        ch.reason = conv_skip_reason(conv_mod, ch.bn_module)
        if ch.reason is None:
            named = [(str(conv.target), self._mod(conv))] + [(f"{conv.target}.<tail conv>", m)
                                                             for m in (tail[2] if tail else []) + [conv_mod]]
            if ch.bn is not None and ch.bn.op == "call_module":
                named.append((str(ch.bn.target), ch.bn_module))
            ch.reason = hook_reason(named)
        if ch.reason is not None:
            return ch
        if not ch.act_spec.is_identity:
            return ch
        nxt = self._sole_user(cur)
        passthrough = []
        while nxt is not None and self._is_passthrough(nxt, cur):
            passthrough.append(nxt)
            cur, nxt = nxt, self._sole_user(nxt)
        if nxt is not None:
            spec = self._activation(nxt, cur)
            if spec is not None:
                ch.act, ch.act_spec, ch.passthrough = nxt, spec, passthrough
                return ch
            other, why = self._residual_of(nxt, cur) if tail is None else (None, None)
            if (other is not None and not self._depends_on(other, {conv, ch.bn, *passthrough} - {None})
                    and not self._mutated_between(conv.args[0], conv, nxt)):
                ch.add, ch.passthrough = nxt, passthrough
                after = self._sole_user(nxt)
                spec = self._activation(after, nxt) if after is not None else None
                if spec is not None:
                    ch.act, ch.act_spec = after, spec
        if ch.bn is None and ch.act is None and ch.add is None:
            return None  # a lone conv: nothing to fuse
        if ch.bn is None and ch.act is None:
            return None  # conv + add only: leave it (no BN, nothing gained)
        return ch

    # ------------------------------------------------------------------ rewriting
    def _fused_module(self, ch: Chain) -> FusedConv2d:
        conv = ch.conv_module
        if ch.bn_tensors is None:
            return FusedConv2d.from_modules(conv, ch.bn_module, ch.act_spec)
        mean, var, weight, bias, eps = ch.bn_tensors
        scale, shift = fold.bn_scale_shift(mean, var, weight, bias, eps, conv.bias, dtype=torch.float64)
        epi = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
        plain = FusedConv2d.from_modules(conv, None, ch.act_spec)  # resolves padding='same' etc.
        return FusedConv2d(conv.weight, scale.to(epi), shift.to(epi), stride=plain.stride, padding=plain.padding,
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
            found = tail_conv(self._mod(node))
            if found is None:
                why = conv_subclass_reason(self._mod(node))
                bn_users = [u for u in node.users if u.op == "call_module" and fold.is_batchnorm(self._mod(u))]
                if why is not None and bn_users:
                    self.report.add(self.scope, [str(node.target), str(bn_users[0].target)], KIND, "skipped", why)
                continue
            owner, name, conv_mod, path = found
            tail = None if owner is None else (owner, name, path)
            if tail is None and self.calls[node.target] > 1:
                if any(u.op == "call_module" and fold.is_batchnorm(self._mod(u)) for u in node.users):
                    self.report.add(self.scope, [str(node.target)], KIND, "skipped",
                                    f"conv module is called {self.calls[node.target]} times in forward")
                continue
            ch = self.match(node, conv_mod, tail)
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
                self.report.add(self.scope, [_node_name(n) for n in ch.nodes], KIND, "skipped", ch.reason)
            else:
                good.append(ch)
        return good, absorbs

    def swappable(self, chains: list[Chain], absorbs: list[Absorb]) -> bool:
        """Every chain is module calls only: fusable by swapping children, the forward left as it is."""
        return all(self._swappable(ch) for ch in chains) and all(self._swappable_absorb(a) for a in absorbs)

    def match_absorb(self, node: fx.Node, claimed: set) -> Absorb | None:
        """An Absorb when `node` calls a plain Sequential ending in a FusedConv2d that an add / act follows."""
        if node.op != "call_module" or node in claimed or len(node.args) != 1 or node.kwargs:
            return None
        seq = self._mod(node)
        if not is_plain_sequential(seq) or self.calls[node.target] != 1 or self.uses[id(seq)] != 1:
            return None
        leaves, containers = [], []
        _flatten_sequential(seq, str(node.target), leaves, containers)
        if not leaves or type(leaves[-1][1]) is not FusedConv2d or not leaves[-1][1].act.is_identity:
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
        else:
            other, _ = self._residual_of(nxt, cur)
            if other is None or self._depends_on(other, {node, *a.passthrough}):
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
            with graph.inserting_before(ch.conv if residual is None else ch.add):
                args = (ch.conv.args[0],) if residual is None else (ch.conv.args[0], residual)
                new = graph.call_module(name, args)
            kept.add(new)
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
            a.nodes[-1].replace_all_uses_with(new)
            for n in reversed(a.nodes):
                graph.erase_node(n)
        for n in list(graph.nodes):  # buffers only F.batch_norm read
            if n.op == "get_attr" and not n.users:
                graph.erase_node(n)
        graph.lint()
        return kept


def _traceable_candidates(module: nn.Module) -> bool:
    """Worth tracing: a Conv2d (or an already fused FusedConv2d) among its children, or inside containers
    (Sequential, ModuleList, ModuleDict) among its children."""
    for child in module.children():
        if isinstance(child, (nn.Conv2d, FusedConv2d)):
            return True
        # (plain nn.Module: the containers fx's GraphModule creates for nested call targets)
        if type(child) in (nn.ModuleList, nn.ModuleDict, nn.Module) or is_plain_sequential(child):
            if _traceable_candidates(child):
                return True
    return False


class DataflowWalk:
    """Visits every module scope, children first; returns each scope's replacement (often itself)."""

    def __init__(self, model: nn.Module, report: ConversionReport):
        self.report = report
        self.uses = module_use_counts(model)
        self.done: dict[int, nn.Module] = {}

    def visit(self, module: nn.Module, scope: str = "") -> nn.Module:
        key = id(module)
        if key not in self.done:  # a shared module is rewritten once and stays shared
            self.done[key] = self._visit(module, scope)
        return self.done[key]

    def _visit(self, module: nn.Module, scope: str) -> nn.Module:
        if is_leaf_type(module):
            return module
        visit_children(module, scope, self.visit)
        if is_plain_sequential(module):
            fuse_sequential(module, scope, self.uses, self.report)
            return module
        if type(module).forward is nn.Module.forward or not _traceable_candidates(module):  # no forward of its own
            return module
        if guard_table(module) is not None:  # converted before: its chains are fused already
            return module
        # (imported here: scope_rewrite builds on ScopePass from this module)
        from fusedconv.graph.scope_rewrite import ScopeRewrite

        try:
            params = forward_params(module)
        except UnsupportedSignature as e:
            self._unguardable(module, scope, str(e))
            return module
        traced, first_error = [], None
        for pattern in call_patterns(params):
            try:
                traced.append((pattern, trace_scope(module, pattern.concrete_args(params) or None)))
            except Exception as e:  # noqa: BLE001 - any failure means fx cannot see this call pattern
                first_error = first_error or e
        if not traced:
            self._untraceable(module, scope, first_error)
            return module
        result, guards = ScopeRewrite(module, scope, params, traced, self.uses, self.report).run()
        if guards is not None:
            self.report.add_guards(scope, type(module).__name__, guards)
        return result

    def _unguardable(self, module: nn.Module, scope: str, why: str) -> None:
        """A forward whose call pattern cannot be guarded: its own chains stay as they are."""
        convs = [n for n, c in module.named_children() if is_fusable_conv(c)]
        has_bn = any(fold.is_batchnorm(c) for c in module.children())
        if convs and has_bn:
            self.report.add(scope, convs, KIND, "skipped", f"{why}: its call pattern cannot be guarded; only its "
                                                         "children were converted")

    def _untraceable(self, module: nn.Module, scope: str, err: BaseException) -> None:
        convs = [n for n, c in module.named_children() if is_fusable_conv(c)]
        has_bn = any(fold.is_batchnorm(c) for c in module.children())
        if convs and has_bn:
            self.report.add(scope, convs, KIND, "skipped",
                            f"forward not traceable by torch.fx ({_short(err)}); only its children were converted")
        else:
            self.report.notes.append(f"{scope or '<root>'}: forward not traceable by torch.fx ({_short(err)}); "
                                     "its children were converted separately")


def fuse_dataflow(model: nn.Module, report: ConversionReport) -> nn.Module:
    """Fuse every provable chain of `model` in place; returns the model (always the same object)."""
    return DataflowWalk(model, report).visit(model, "")
