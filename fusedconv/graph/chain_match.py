"""Matching one chain in a traced scope's graph: from a layer call (Conv2d, or Conv1d / Conv3d / ConvTranspose /
Linear: the same rules over every kind, see `legality.chain_base`), follow its single users through the BN, the
identity-in-eval calls, the residual add and the activation, proving at each step that fusing is exact
(`ChainMatcher.match`). `scope_pass.ScopePass` builds on it to plan a whole scope and rewrite its graph."""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

from fusedconv import fold
from fusedconv.activations import ActivationSpec, spec_from_call, spec_from_module
from fusedconv.graph.chains import (_ADD_FUNCTIONS, _ADD_METHODS, _BN_FUNCTIONS, _BN_PARAMS,
                                    _NON_TENSOR_METHODS, _RESHAPING_FUNCTIONS, _RESHAPING_METHODS,
                                    _RESHAPING_MODULES, Chain, _get_attr, _node_name, written_between)
from fusedconv.graph.legality import (RESIDUAL_BASES, has_hooks, hook_reason, layer_bn_verdict, layer_skip_reason,
                                      lone_conv_gains)
from fusedconv.report import ConversionReport


class ChainMatcher:
    """Finds single chains in one traced scope's graph (`match`); the matching half of `ScopePass`."""


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
            # An activation module carrying hooks, or one the model's code reads into (`inspected.py`), stays a
            # call of its own (the chain stops before it).
            ok = spec is not None and len(node.args) == 1 and not node.kwargs and \
                hook_reason([("", self._mod(node))]) is None
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

    def _mutated_between(self, values, start: fx.Node, end: fx.Node) -> bool:
        """Whether a visible in-place write into storage any of `values` may share runs after `start` and before
        `end`: the fused module runs at one of them and must read its input and its residual as the graph does."""
        return written_between(values, start, end, self._mod) is not None

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
        """((attribute paths of mean, var, weight, bias), (mean, var, weight, bias, eps), reason) for an
        F.batch_norm call on `conv` (None for an absent weight / bias)."""
        bound = dict(zip(_BN_PARAMS, node.args))
        bound.update(node.kwargs)
        if bound.get("input") is not conv:
            return None, None, "F.batch_norm's input is not the conv output"
        if bound.get("training", False) is not False:
            return None, None, "F.batch_norm is called with training=True (batch statistics)"
        tensors, targets = [], []
        for key in ("running_mean", "running_var", "weight", "bias"):
            arg = bound.get(key)
            if arg is None and key in ("weight", "bias"):
                tensors.append(None)
                targets.append(None)
                continue
            if not isinstance(arg, fx.Node) or arg.op != "get_attr":
                return None, None, f"F.batch_norm's {key} is not a module parameter or buffer"
            t = _get_attr(self.module, arg.target)
            if not isinstance(t, torch.Tensor):
                return None, None, f"F.batch_norm's {key} is not a tensor"
            tensors.append(t)
            targets.append(str(arg.target))
        eps = bound.get("eps", 1e-5)
        if not isinstance(eps, (int, float)):
            return None, None, "F.batch_norm's eps is not a constant"
        return tuple(targets), (*tensors, float(eps)), None

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

    def match(self, conv: fx.Node, conv_mod: nn.Module, tail: tuple | None, base: type = nn.Conv2d) -> Chain | None:
        """The chain starting at the call `conv` of the `base` layer `conv_mod` (`tail`: the Sequential that ends
        in it), with `reason` set when it is found but may not be fused; None when there is nothing to fuse."""
        ch = Chain(conv, conv_mod, tail, base=base)
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
                verdict = layer_bn_verdict(ch.bn_module, base, conv_mod)
                if not verdict.ok:
                    ch.reason = verdict.reason
                    return ch
                if verdict.act is not None and not verdict.act.is_identity:
                    ch.act_spec = verdict.act  # the norm-act module applies it; nothing may follow in the epilogue
            elif base not in (nn.Conv2d, nn.Conv1d, nn.Conv3d):
                ch.reason = f"F.batch_norm after a {base.__name__} is not fused (only its BatchNorm module is)"
                return ch
            else:
                targets, tensors, reason = self._functional_bn(bn, conv)
                if reason is not None:
                    ch.reason = reason
                    return ch
                ch.bn_tensors, ch.bn_sources = tensors, targets
            cur = bn
        if base is not nn.Conv2d and ch.bn is None:
            return None  # another layer kind + activation alone: no BatchNorm to fold, nothing gained
        ch.reason = layer_skip_reason(conv_mod, base, ch.bn_module)
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
            # (FusedLinear has no residual epilogue: a Linear chain stops before an add)
            fusable_add = tail is None and base in RESIDUAL_BASES
            other, why = self._residual_of(nxt, cur) if fusable_add else (None, None)
            if (other is not None and not self._depends_on(other, {conv, ch.bn, *passthrough} - {None})
                    and not self._mutated_between((conv.args[0], other), conv, nxt)):
                ch.add, ch.passthrough = nxt, passthrough
                after = self._sole_user(nxt)
                spec = self._activation(after, nxt) if after is not None else None
                if spec is not None:
                    ch.act, ch.act_spec = after, spec
        if ch.bn is None and ch.act is None and ch.add is None:
            # A lone conv: nothing to fuse, unless its own CPU route gains (legality.lone_conv_gains).
            return ch if tail is None and lone_conv_gains(conv_mod) else None
        if ch.bn is None and ch.act is None:
            return None  # conv + add only: leave it (no BN, nothing gained)
        return ch
