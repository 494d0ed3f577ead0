"""Which modules the re-parameterization pass reads as leaves, and which of them it understands.

Convs (any subclass), batch norms (any subclass), FusedConv2d / fused layers and DBB's BN-and-pad layer stay
leaves of the pass's trace; other user modules are traced through, so a branch like `self.conv_kxk(x)` (a
ConvNormAct) shows as its conv and BN nodes. A leaf is trusted as a linear piece only when its forward is known:
plain nn.Conv2d, DBB's IdentityBasedConv1x1, BatchNorm2d / SyncBatchNorm / FrozenBatchNorm2d, timm's
BatchNormAct2d without activation. A module carrying hooks is a leaf too, and a leaf that is no linear piece
(so the branch through it stays as it is, and its hooks fire on real tensors).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedconv import fold
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.graph.legality import has_hooks
from fusedconv.graph.tracing import ScopeTracer
from fusedconv.modules import FusedConv2d



def is_bn_and_pad(module: nn.Module) -> bool:
    """DBB's BNAndPadLayer: BN, then pads `pad_pixels` on every side with the value BN gives a zero input."""
    return (type(module).__name__ == "BNAndPadLayer" and fold.is_batchnorm(getattr(module, "bn", None))
            and isinstance(getattr(module, "pad_pixels", None), int))


def is_identity_based_conv(module: nn.Module) -> bool:
    """DBB's IdentityBasedConv1x1: a bias-free 1x1 conv whose forward adds a fixed identity to its weight."""
    return (type(module).__name__ == "IdentityBasedConv1x1" and isinstance(module, nn.Conv2d)
            and isinstance(getattr(module, "id_tensor", None), torch.Tensor) and module.bias is None
            and module.kernel_size == (1, 1) and module.id_tensor.shape == module.weight.shape)


def plain_bn_reason(bn: nn.Module) -> str | None:
    """None when `bn`'s forward is exactly the BatchNorm formula (in eval mode), else why it is not."""
    cls = type(bn)
    if cls in (nn.BatchNorm2d, nn.SyncBatchNorm) or fold.is_frozen_batchnorm(bn):
        return None
    if cls.__name__ == "BatchNormAct2d" and isinstance(bn, nn.BatchNorm2d) and \
            isinstance(getattr(bn, "act", None), nn.Identity) and isinstance(getattr(bn, "drop", None), nn.Identity):
        # timm's norm layer with apply_act=False: BatchNorm2d's formula, then two nn.Identity.
        return None
    if cls.__name__ == "BatchNormAct2d":
        return f"{cls.__name__} applies {type(getattr(bn, 'act', None)).__name__} after the normalisation"
    return f"{cls.__name__} overrides BatchNorm's forward"


def is_plain_conv(module: nn.Module) -> bool:
    """nn.Conv2d or a subclass that keeps its forward (so its weight/geometry say everything)."""
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward


class ReparamTracer(ScopeTracer):
    """Keeps the modules the pass reasons about (and FusedConv2d, which checks its inputs eagerly) as leaves."""

    records_leaf_reads = False  # is_leaf_module tells BatchNorm classes apart while tracing

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.modules.conv._ConvNd, _BatchNorm, FusedConv2d, FusedAffineLayer)) or fold.is_batchnorm(m) \
                or is_bn_and_pad(m):
            return True
        if has_hooks(m):  # traced through, its hooks would run on Proxies and its call would vanish when merged
            return True
        if isinstance(m, torch.jit.ScriptModule):  # compiled code: no Python forward to trace through
            return True
        return fx.Tracer.is_leaf_module(self, m, module_qualified_name)

