"""The Sequential pass: Conv2d -> BatchNorm (-> activation) as consecutive children of an nn.Sequential.

An nn.Sequential (whose forward is not overridden) feeds each child only into the next one, so its data flow
is its order. That makes consecutive children a proven chain without tracing — as long as none of the modules
is also reachable from elsewhere in the model (a shared module may be called on another path too).
A Conv2d followed directly by an activation (no BatchNorm, e.g. after re-parameterization) is fused as well, so
is a lone Conv2d whose few output channels take the CPU tap route (legality.lone_conv_gains), and a child that is
itself a plain Sequential ending in a Conv2d (smp's SeparableConv2d, timm's deep stems) counts as that conv: a
BatchNorm after it folds into its last conv.
"""

from __future__ import annotations

from collections import Counter

import torch.nn as nn

from fusedconv.activations import spec_from_module
from fusedconv import fold
# is_plain_sequential is re-exported: it lives in legality (which needs it) and callers know it from here.
from fusedconv.graph.legality import (batchnorm_verdict, conv_skip_reason, conv_subclass_reason, has_hooks, hook_reason,
                                      is_plain_sequential, LONE_DETAIL, fuse_lone_conv, lone_conv_gains,
                                      module_use_counts, tail_conv)
from fusedconv.graph.bn_before import fold_bn_before_layers
from fusedconv.graph.sequential_layers import fuse_layer_chains  # other layer kinds
from fusedconv.modules import FusedConv2d
from fusedconv.report import ConversionReport

KIND = "conv_bn_act"


def fuse_sequential(seq: nn.Sequential, scope: str, uses: Counter, report: ConversionReport) -> int:
    """Replace Conv2d -> BN (-> act) runs among the direct children of one plain nn.Sequential, in place.

    The fused module takes the conv's name; the BN and activation become nn.Identity, so the names and the
    indices of every other child stay as they were.
    """
    fused = fold_bn_before_layers(seq, scope, uses, report)  # a BN no layer before it can take
    fused += fuse_layer_chains(seq, scope, uses, report)
    names = list(seq._modules.keys())
    i = 0
    while i < len(names):
        found = tail_conv(seq._modules[names[i]]) if seq._modules[names[i]] is not None else None
        if found is None:
            why = conv_subclass_reason(seq._modules[names[i]])
            if why is not None and i + 1 < len(names) and fold.is_batchnorm(seq._modules[names[i + 1]]):
                report.add(scope, names[i:i + 2], KIND, "skipped", why)
            i += 1
            continue
        owner, conv_name, conv, path = found  # owner: a nested Sequential that ends with the conv, or None
        nxt = seq._modules[names[i + 1]] if i + 1 < len(names) else None
        bn = nxt if nxt is not None and fold.is_batchnorm(nxt) else None
        chain = [names[i]]
        reason = None
        act_spec = None
        act_from_bn = False
        if bn is not None:
            chain.append(names[i + 1])
            verdict = batchnorm_verdict(bn)
            reason = verdict.reason
            if verdict.act is not None and not verdict.act.is_identity:
                act_spec, act_from_bn = verdict.act, True
        j = i + len(chain)
        if reason is None and not act_from_bn and j < len(names):
            spec = spec_from_module(seq._modules[names[j]])
            if spec is not None and not spec.is_identity and not has_hooks(seq._modules[names[j]]):
                act_spec = spec
                chain.append(names[j])
        lone = bn is None and act_spec is None
        if lone and (owner is not None or not lone_conv_gains(conv)):
            i += 1  # a lone conv: nothing to fuse
            continue
        if owner is not None and bn is None:
            i += 1  # a nested Sequential ending in a conv, then an activation: nothing gained
            continue
        if reason is None:
            reason = conv_skip_reason(conv, bn)
        if reason is None:
            named = [(n, seq._modules[n]) for n in chain] + [(f"{names[i]}.<tail conv>", m) for m in path[1:] + [conv]]
            reason = hook_reason(named)
        if reason is None:
            shared = [n for n in chain if uses[id(seq._modules[n])] > 1]
            shared += [f"{names[i]}.<tail conv>" for m in path + [conv] if uses[id(m)] > 1][:1]
            if shared:
                reason = f"module(s) {shared} are shared with another part of the model"
        if reason is not None:
            report.add(scope, chain, KIND, "skipped", reason)
            i += len(chain)
            continue
        fused_mod = fuse_lone_conv(conv) if lone else FusedConv2d.from_modules(conv, bn, act_spec)
        fused_mod.train(conv.training)
        if owner is None:
            seq._modules[chain[0]] = fused_mod
        else:
            owner._modules[conv_name] = fused_mod  # the container stays; its tail conv is fused
            chain[0] = f"{chain[0]}.{conv_name}" if len(path) == 1 else f"{chain[0]}.(...).{conv_name}"
        for n in chain[1:]:
            seq._modules[n] = nn.Identity().train(seq._modules[n].training)
        detail = "+".join((["bn"] if bn is not None else []) + ([str(act_spec)] if act_spec is not None else []))
        detail = detail or LONE_DETAIL
        report.add(scope, chain, KIND, "fused", detail)
        fused += 1
        i += len(chain)
    return fused


def fuse_sequential_chains(model: nn.Module, report: ConversionReport) -> int:
    """Run `fuse_sequential` on every plain nn.Sequential of `model` (the whole first-version pass)."""
    uses = module_use_counts(model)
    return sum(fuse_sequential(m, scope, uses, report) for scope, m in list(model.named_modules())
               if is_plain_sequential(m))
