"""The Sequential pass for every other layer kind: Conv1d / Conv3d / ConvTranspose1d-3d / Linear -> BatchNorm
(-> activation) (-> BatchNorm after the activation), and Conv2d chains that end in a BatchNorm after the activation.

Consecutive children of a plain nn.Sequential form a proven chain (see sequential.py). Patterns, in order:
    layer, [bn], [act], [post_bn]
with a bn or a post_bn (a layer + activation alone is left as it is: nothing to fold), where `post_bn` (a BatchNorm right after the activation — ConvMixer's
Conv -> GELU -> BN) needs an activation before it. A Conv2d chain is taken here only when it has a post_bn (the
Conv2d pass in sequential.py handles the rest and makes FusedConv2d). The fused module takes the layer's name;
the other children become nn.Identity, so names and indices stay as they were.
"""

from __future__ import annotations

from collections import Counter

import torch.nn as nn

from fusedconv import fold
from fusedconv.activations import spec_from_module
from fusedconv.fused_layers import FusedConv1d, FusedConv2dPostBN, FusedConv3d
from fusedconv.fused_transpose import FusedConvTranspose1d, FusedConvTranspose2d, FusedConvTranspose3d
from fusedconv.fused_linear import FusedLinear
from fusedconv.graph.legality import (LAYER_KINDS, hook_reason, is_plain_sequential, layer_base,
                                      plain_bn_reason)
from fusedconv.report import ConversionReport

FUSED_CLASS = {
    nn.Conv1d: FusedConv1d,
    nn.Conv2d: FusedConv2dPostBN,
    nn.Conv3d: FusedConv3d,
    nn.ConvTranspose1d: FusedConvTranspose1d,
    nn.ConvTranspose2d: FusedConvTranspose2d,
    nn.ConvTranspose3d: FusedConvTranspose3d,
    nn.Linear: FusedLinear,
}
KIND_CONV2D_POST_BN = "conv_bn_act_bn"


def _channels(layer: nn.Module, base: type) -> int | None:
    # A Linear's BatchNorm1d channel is dim 1 of its output: out_features only for 2-D inputs, so not checked here
    # (FusedLinear checks it against the input, where BatchNorm1d itself would).
    return None if base is nn.Linear else layer.out_channels


def tail_layer(module: nn.Module):
    """(owner, attribute name, layer, containers on the way) for the LAYER_KINDS layer that ends a plain
    nn.Sequential (through nested plain Sequentials, e.g. torchvision's Conv2Plus1D), or None."""
    path = []
    while is_plain_sequential(module) and len(module) > 0:
        path.append(module)
        name = list(module._modules)[-1]
        last = module._modules[name]
        if last is not None and layer_base(last) is not None:
            return module, name, last, path
        module = last
    return None


def _match(seq: nn.Sequential, names: list[str], i: int):
    """(base class, chain names, bn, act spec, post_bn, reason, tail) for a chain starting at names[i], or None;
    `tail` is tail_layer's answer when the chain starts with a Sequential that ends in the layer."""
    mods = seq._modules
    layer = mods[names[i]]
    # Exactly nn.Conv2d: FusedConv2dPostBN has no pre-pad, so a padding conv (same_padding.py) is left to the
    # Conv2d pass, which fuses its conv -> BN -> act and leaves the BN after the activation.
    base = nn.Conv2d if type(layer) is nn.Conv2d else layer_base(layer)
    tail = None
    if base is None:
        tail = tail_layer(layer)
        nxt = mods[names[i + 1]] if i + 1 < len(names) else None
        if tail is None or nxt is None or not fold.is_batchnorm(nxt):
            return None  # a Sequential ending in a layer is worth fusing into only when a BatchNorm follows
        layer = tail[2]
        base = layer_base(layer)
    channels = _channels(layer, base)
    chain, bn, act, post, reason = [names[i]], None, None, None, None
    j = i + 1
    if j < len(names) and fold.is_batchnorm(mods[names[j]]):
        bn = mods[names[j]]
        reason = plain_bn_reason(bn, channels)
        chain.append(names[j])
        j += 1
    if reason is None and j < len(names):
        spec = spec_from_module(mods[names[j]])
        if spec is not None:
            act = spec
            chain.append(names[j])
            j += 1
            if j < len(names) and fold.is_batchnorm(mods[names[j]]):
                post_reason = plain_bn_reason(mods[names[j]], channels)
                if post_reason is None:
                    post = mods[names[j]]
                    chain.append(names[j])
    if base is nn.Conv2d and post is None:
        return None  # the Conv2d pass fuses it into a FusedConv2d
    if bn is None and post is None:
        return None  # no BatchNorm to fold: a layer + activation gains nothing from a fused module here
    return base, chain, bn, act, post, reason, tail


def fuse_layer_chains(seq: nn.Sequential, scope: str, uses: Counter, report: ConversionReport) -> int:
    """Fuse the chains described above among the direct children of one plain nn.Sequential, in place."""
    names = list(seq._modules.keys())
    fused = 0
    i = 0
    while i < len(names):
        found = _match(seq, names, i) if seq._modules[names[i]] is not None else None
        if found is None:
            i += 1
            continue
        base, chain, bn, act, post, reason, tail = found
        kind = KIND_CONV2D_POST_BN if base is nn.Conv2d else LAYER_KINDS[base]
        layer = seq._modules[chain[0]] if tail is None else tail[2]
        if reason is None:
            shared = [n for n in chain if uses[id(seq._modules[n])] > 1]
            if tail is not None and any(uses[id(m)] > 1 for m in tail[3] + [layer]):
                shared.append(f"{chain[0]}.<tail layer>")
            if shared:
                reason = f"module(s) {shared} are shared with another part of the model"
        if reason is None:
            named = [(n, seq._modules[n]) for n in chain]
            named += [(f"{chain[0]}.<tail layer>", m) for m in (tail[3][1:] + [layer] if tail is not None else [])]
            reason = hook_reason(named)
        if reason is None and not layer.weight.is_floating_point():
            reason = f"layer weight has dtype {layer.weight.dtype}"
        new = None
        if reason is None:
            try:
                new = FUSED_CLASS[base].from_modules(layer, bn, act, post).train(layer.training)
            except (TypeError, ValueError, RuntimeError) as e:
                reason = str(e)
        if reason is not None:
            report.add(scope, chain, kind, "skipped", reason)
            i += len(chain)
            continue
        if tail is None:
            seq._modules[chain[0]] = new
        else:
            tail[0]._modules[tail[1]] = new  # the container stays; its tail layer is fused
            chain[0] = f"{chain[0]}.{tail[1]}" if len(tail[3]) == 1 else f"{chain[0]}.(...).{tail[1]}"
        for n in chain[1:]:
            seq._modules[n] = nn.Identity().train(seq._modules[n].training)
        parts = (["bn"] if bn is not None else []) + ([str(act)] if act is not None else []) + \
            (["post_bn"] if post is not None else [])
        report.add(scope, chain, kind, "fused", "+".join(parts))
        fused += 1
        i += len(chain)
    return fused
