"""The Sequential pass for a BatchNorm directly *before* a conv or linear layer: `layer(bn(x))` becomes one layer.

Exact only where BN's shift reaches every output tap (`fold.bn_before_reason`: no zero padding after it, not a
transposed conv) and, for BatchNorm1d, only on the input rank where its channel axis is the layer's input channel
(`bn_folded_layers`). Only BNs that no other pass can take are considered: one whose previous sibling is a
layer or an activation is left to the BN-after-layer and BN-after-activation chains (also exact, and they fuse
further). The BN child becomes nn.Identity and the layer keeps its name, so other names and indices stay.
"""

from __future__ import annotations

from collections import Counter

import torch.nn as nn
from torch.nn.modules.conv import _ConvNd

from fusedconv import fold
from fusedconv.activations import spec_from_module
from fusedconv.bn_folded_layers import FOLDED_CLASS, folded_copy
from fusedconv.graph.legality import PLAIN_BATCHNORMS_ND, hook_reason
from fusedconv.report import ConversionReport

KIND = "bn_before_layer"


def _takes_following_bn(prev: nn.Module | None) -> bool:
    """Whether `prev` (the BN's previous sibling) can absorb the BN itself: a layer or an activation."""
    if prev is None:
        return False
    return (isinstance(prev, (_ConvNd, nn.Linear)) or spec_from_module(prev) is not None
            or fold.is_batchnorm(prev))


def fold_bn_before_layers(seq: nn.Sequential, scope: str, uses: Counter, report: ConversionReport) -> int:
    """Fold each BN -> Conv1d/2d/3d / Linear pair among the direct children of one plain nn.Sequential, in place."""
    names = list(seq._modules.keys())
    folded = 0
    for k in range(len(names) - 1):
        bn, layer = seq._modules[names[k]], seq._modules[names[k + 1]]
        if type(bn) not in PLAIN_BATCHNORMS_ND or type(layer) not in FOLDED_CLASS:
            continue
        if _takes_following_bn(seq._modules[names[k - 1]] if k > 0 else None):
            continue
        pair = names[k:k + 2]
        reason = fold.bn_before_reason(bn, layer)
        if reason is None and uses[id(bn)] > 1:
            reason = f"{names[k]} is shared with another part of the model"
        if reason is None:
            reason = hook_reason([(names[k], bn), (names[k + 1], layer)])
        if reason is None and not layer.weight.is_floating_point():
            reason = f"layer weight has dtype {layer.weight.dtype}"
        new = None
        if reason is None:
            try:
                new = folded_copy(layer, *fold.fold_bn_into_next(bn, layer))
            except (TypeError, ValueError, RuntimeError) as e:
                reason = str(e)
        if reason is not None:
            report.add(scope, pair, KIND, "skipped", reason)
            continue
        # A new layer object: a layer shared elsewhere keeps computing its own function there.
        seq._modules[names[k + 1]] = new
        seq._modules[names[k]] = nn.Identity().train(bn.training)
        report.add(scope, pair, KIND, "fused", f"bn folded into the following {type(layer).__name__}")
        folded += 1
    return folded
