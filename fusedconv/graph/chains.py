"""What the data-flow pass finds in a traced scope: the chain records (`Chain`, `Absorb`), the fx calls that
count as an add, a BatchNorm, an in-place write or a reshape, and small helpers over nodes and Sequentials."""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fusedconv.activations import ActivationSpec
from fusedconv.graph.legality import LAYER_KINDS, LONE_DETAIL, is_plain_sequential
from fusedconv.graph.sequential import KIND
from fusedconv.graph.sequential_layers import FUSED_CLASS
from fusedconv.modules import FusedConv2d

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


# Calls whose result may share storage with their first argument (a write into one is a write into the other).
_ALIAS_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "narrow", "expand", "expand_as",
    "squeeze", "unsqueeze", "flatten", "unflatten", "split", "chunk", "unbind", "contiguous", "detach", "select",
    "as_strided", "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims", "unfold", "__getitem__", "to", "type_as",
    "float", "double", "half", "requires_grad_"})
_ALIAS_FUNCTIONS = (operator.getitem, torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.squeeze,
                    torch.unsqueeze, torch.narrow, torch.split, torch.chunk, torch.unbind, torch.select, torch.detach,
                    torch.movedim, torch.swapaxes, torch.t, torch.as_strided)
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten,
                  nn.Unflatten)


def writes_in_place(node: fx.Node, module_of) -> bool:
    """Whether `node` writes into its first argument's storage: `y.clamp_()`, `F.relu(y, inplace=True)`,
    `y[i] = v`, `y += v` seen as operator.iadd, an activation module built with inplace=True (`module_of` maps a
    call_module node to its module)."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__") and name != "requires_grad_"
    if node.op == "call_function":
        name = str(getattr(node.target, "__name__", ""))
        return bool(node.kwargs.get("inplace")) or node.target in _INPLACE_FUNCTIONS or \
            (name.endswith("_") and not name.startswith("__"))
    if node.op == "call_module":
        return bool(getattr(module_of(node), "inplace", False))
    return False


def alias_root(node, module_of):
    """The node whose storage `node`'s value may share, followed back through views, in-place writes (which
    return their argument) and calls that may return their input unchanged (nn.Identity, dropout)."""
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node):
        if node.op == "call_method" and (str(node.target) in _ALIAS_METHODS or writes_in_place(node, module_of)):
            node = node.args[0]
        elif node.op == "call_function" and (node.target in _ALIAS_FUNCTIONS or node.target is F.dropout or
                                             writes_in_place(node, module_of)):
            node = node.args[0]
        elif node.op == "call_module" and (isinstance(module_of(node), _ALIAS_MODULES) or
                                           writes_in_place(node, module_of)):
            node = node.args[0]
        else:
            break
    return node


def written_between(values, start: fx.Node, end: fx.Node, module_of) -> fx.Node | None:
    """The first in-place write after `start` and before `end` into storage any of `values` may share (None when
    there is none): a fused call moved from `start` to `end`, or reading at `start` what the graph reads at `end`,
    would see another value."""
    roots = {alias_root(v, module_of) for v in values if isinstance(v, fx.Node)}
    node = start.next
    while node is not end and node.op != "output":
        if node.args and isinstance(node.args[0], fx.Node) and writes_in_place(node, module_of) and \
                alias_root(node.args[0], module_of) in roots:
            return node
        node = node.next
    return None


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__


@dataclass
class Chain:
    """One layer -> [BN] -> [act] / [add -> act] chain found in a scope's graph. The layer ("conv") is a Conv2d,
    or (`base`) a Conv1d / Conv3d / ConvTranspose1d-3d / Linear, which must be followed by a BatchNorm."""

    conv: fx.Node
    conv_module: nn.Module
    tail: tuple | None = None                   # (owner Sequential, name, containers) when conv ends a Sequential
    bn: fx.Node | None = None
    bn_module: nn.Module | None = None          # the BN module (module call or functional BN's owner)
    bn_tensors: tuple | None = None             # (mean, var, weight, bias, eps) of a functional F.batch_norm
    bn_sources: tuple | None = None             # their attribute paths (graph/folded_sources.py)
    act: fx.Node | None = None                  # activation call (module, function or method)
    act_spec: ActivationSpec = field(default_factory=ActivationSpec)
    add: fx.Node | None = None
    passthrough: list = field(default_factory=list)  # identity-in-eval calls between BN and the add / act
    reason: str | None = None                   # why it is skipped (None: fuse it)
    fused: nn.Module | None = None              # the replacement (FusedConv2d, FusedConv1d, ...), once built
    base: type = nn.Conv2d                      # the layer class the chain is fused as (legality.chain_base)

    @property
    def kind(self) -> str:
        """The report's chain kind: conv_bn_act for Conv2d, conv3d_bn_act, linear_bn_act, ... for the others."""
        return KIND if self.base is nn.Conv2d else LAYER_KINDS[self.base]

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

    @property
    def conv_bias(self):
        """The layer's own bias, which the roles add back (a MixedConv2d's groups have none: fused_mixed.py)."""
        return getattr(self.conv_module, "bias", None)

    def detail(self) -> str:
        parts = []
        if self.bn is not None:
            parts.append("bn" if self.bn_tensors is None else "F.batch_norm")
        if self.add is not None:
            parts.append("add")
        if not self.act_spec.is_identity:
            parts.append(str(self.act_spec))
        return "+".join(parts) or LONE_DETAIL  # nothing after the conv: a lone conv (legality.lone_conv_gains)


@dataclass
class Absorb:
    """A plain Sequential whose last op is an already fused module (FusedConv2d or one of the N-d / transposed /
    linear family; identity activation, no post-affine), followed in this scope by an add (not for FusedLinear)
    and / or an activation: they join that module's epilogue. With an add, the Sequential
    call is inlined into its children's calls so the last one can take the residual."""

    seq: fx.Node
    leaves: list                                # qualified names of the Sequential's non-Identity leaves
    fused: nn.Module
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

    @property
    def kind(self) -> str:
        if type(self.fused) is FusedConv2d:
            return KIND
        return next(LAYER_KINDS[b] for b, cls in FUSED_CLASS.items() if type(self.fused) is cls and b in LAYER_KINDS)

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
