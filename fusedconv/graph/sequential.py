"""The Sequential pass: Conv2d -> BatchNorm -> activation as consecutive children of an nn.Sequential.

An nn.Sequential (whose forward is not overridden) feeds each child only into the next one, so its data flow
is its order. That makes consecutive children a proven chain without tracing — as long as none of the modules
is also reachable from elsewhere in the model (a shared module may be called on another path too).
"""

from __future__ import annotations

from collections import Counter

import torch.nn as nn

from fusedconv import fold
from fusedconv.activations import spec_from_module
from fusedconv.modules import FusedConv2d
from fusedconv.report import ConversionReport

# BatchNorm classes whose forward is the plain formula (subclasses may override forward: not assumed).
PLAIN_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def is_plain_batchnorm(module: nn.Module) -> bool:
    return type(module) in PLAIN_BATCHNORMS or (fold.is_frozen_batchnorm(module)
                                                 and type(module).__name__ == "FrozenBatchNorm2d")


def module_use_counts(model: nn.Module) -> Counter:
    """How many places in the module tree hold each module object (more than one = shared)."""
    return Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def _bn_skip_reason(bn: nn.Module) -> str | None:
    if not is_plain_batchnorm(bn):
        return f"{type(bn).__name__} overrides BatchNorm's forward"
    try:
        fold.check_foldable(bn)
    except (RuntimeError, ValueError, TypeError) as e:
        return str(e)
    return None


def fuse_sequential_chains(model: nn.Module, report: ConversionReport) -> int:
    """Replace Conv2d -> BN (-> act) runs inside every plain nn.Sequential of `model` in place."""
    uses = module_use_counts(model)
    fused = 0
    for scope, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules.keys())
        i = 0
        while i < len(names):
            conv = seq._modules[names[i]]
            if type(conv) is not nn.Conv2d or i + 1 >= len(names):
                i += 1
                continue
            bn = seq._modules[names[i + 1]]
            if not fold.is_batchnorm(bn):
                i += 1
                continue
            chain = [names[i], names[i + 1]]
            act_mod = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            spec = spec_from_module(act_mod) if act_mod is not None else None
            if spec is not None and not spec.is_identity:
                chain.append(names[i + 2])
            shared = [n for n in chain if uses[id(seq._modules[n])] > 1]
            reason = _bn_skip_reason(bn)
            if reason is None and shared:
                reason = f"module(s) {shared} are shared with another part of the model"
            if reason is None and bn.num_features != conv.out_channels:
                reason = f"BatchNorm has {bn.num_features} features, conv has {conv.out_channels} outputs"
            if reason is not None:
                report.add(scope, chain, "conv_bn_act", "skipped", reason)
                i += 2
                continue
            act = seq._modules[chain[2]] if len(chain) == 3 else None
            fused_mod = FusedConv2d.from_modules(conv, bn, act)
            setattr(seq, chain[0], fused_mod)
            for n in chain[1:]:
                setattr(seq, n, nn.Identity())
            report.add(scope, chain, "conv_bn_act", "fused", "bn" + (f"+{fused_mod.act}" if act is not None else ""))
            fused += 1
            i += len(chain)
    return fused
