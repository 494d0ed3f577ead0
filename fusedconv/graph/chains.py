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
