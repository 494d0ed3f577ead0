"""What the graph passes may fold: which BatchNorm modules have a forward we understand, and which convs.

A BatchNorm is folded only when its forward is known to be exactly `(x - mean) / sqrt(var + eps) * w + b`
with its running statistics: the exact classes nn.BatchNorm2d, nn.SyncBatchNorm and FrozenBatchNorm2d
(torchvision's or timm's). timm's BatchNormAct2d / FrozenBatchNormAct2d apply `act(drop(bn(x)))`; they are
folded together with their activation when `drop` is an nn.Identity and `act` is an activation the epilogue
computes. Any other BatchNorm subclass may override forward, so it is left alone with a reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.nn as nn

from fusedconv import cpu_taps, fold
from fusedconv.activations import ActivationSpec, spec_from_module
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.fused_mixed import MixedConv2dKind, is_mixed_conv2d
from fusedconv.graph.inspected import inspected
from fusedconv.modules import FusedConv2d
from fusedconv.same_padding import conv_pre_pad

# BatchNorm classes whose forward is the plain formula.
PLAIN_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
# Norm-act classes (by name, to avoid importing timm) whose forward is act(drop(batch_norm(x))).
NORM_ACT_BATCHNORMS = ("BatchNormAct2d", "FrozenBatchNormAct2d", "SyncBatchNormAct")


@dataclass(frozen=True)
class BatchNormVerdict:
    """Whether a BN module can be folded; `act` is the activation inside a norm-act module (None if plain)."""

    reason: str | None
    act: ActivationSpec | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def _is_timm_class(module: nn.Module) -> bool:
    return (type(module).__module__ or "").startswith("timm.")


def batchnorm_verdict(bn: nn.Module) -> BatchNormVerdict:
    """Decide whether `bn` (anything `fold.is_batchnorm` accepts) may be folded into the conv before it."""
    t = type(bn)
    name = t.__name__
    if t in PLAIN_BATCHNORMS or (name == "FrozenBatchNorm2d" and fold.is_frozen_batchnorm(bn)):
        act = None
    elif name in NORM_ACT_BATCHNORMS and _is_timm_class(bn):
        drop = getattr(bn, "drop", None)
        if drop is not None and type(drop) is not nn.Identity:
            return BatchNormVerdict(f"{name} applies {type(drop).__name__} between BN and activation")
        inner = getattr(bn, "act", None)
        act = ActivationSpec("identity") if inner is None else spec_from_module(inner)
        if act is None:
            return BatchNormVerdict(f"{name}'s activation {type(inner).__name__} is not one the epilogue computes")
        if name == "FrozenBatchNormAct2d":
            return BatchNormVerdict(None, act)
    elif type(bn).forward is not nn.BatchNorm2d.forward and isinstance(bn, nn.BatchNorm2d):
        return BatchNormVerdict(f"{name} subclasses BatchNorm2d and overrides its forward; its meaning is unknown")
    else:
        return BatchNormVerdict(f"{name} is not a BatchNorm whose forward fusedconv knows (BatchNorm2d, "
                                "SyncBatchNorm, FrozenBatchNorm2d, timm's BatchNormAct2d)")
    try:
        fold.check_foldable(bn)
    except (RuntimeError, ValueError, TypeError) as e:
        return BatchNormVerdict(str(e))
    return BatchNormVerdict(None, act)


def is_fusable_conv(module: nn.Module) -> bool:
    """Exactly nn.Conv2d, or a padding conv recognised and probed by `same_padding.conv_pre_pad` (timm's
    Conv2dSame, efficientnet's Conv2dStatic/DynamicSamePadding); any other subclass may compute differently in
    forward, so it is not assumed to be a conv."""
    t = type(module)
    return t is nn.Conv2d or (isinstance(module, nn.Conv2d) and conv_pre_pad(module).ok)


def lone_conv_gains(conv: nn.Module) -> bool:
    """A Conv2d with nothing after it to fuse is still made a FusedConv2d (`fuse_lone_conv`) when its geometry takes
    the CPU tap route (fusedconv/cpu_taps.py: one output channel of a stride-1 conv up to 5x5, a binary segmentation
    head), 1.7-4.3x faster there than the conv as written."""
    return isinstance(conv, nn.Conv2d) and cpu_taps.eligible(conv.out_channels, conv.kernel_size, conv.stride,
                                                             conv.groups, conv.padding_mode)


# The report's detail for a lone conv made a FusedConv2d (lone_conv_gains).
LONE_DETAIL = "lone conv (CPU tap route)"


def fuse_lone_conv(conv: nn.Conv2d) -> FusedConv2d:
    """The FusedConv2d of a lone conv (`lone_conv_gains`): identity scale, its bias as shift, and the library conv
    on CUDA (`cuda_kernel = False`), as the model ran it, not the Triton kernel."""
    fused = FusedConv2d.from_modules(conv)
    fused.cuda_kernel = False
    return fused


def conv_subclass_reason(module: nn.Module) -> str | None:
    """For a Conv2d subclass that is not fused (not a recognised padding conv, or one that failed a check or
    its probe): why."""
    if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d:
        return conv_pre_pad(module).reason
    return None


def conv_skip_reason(conv: nn.Conv2d, bn: nn.Module | None) -> str | None:
    """Why a Conv2d (followed by `bn`) cannot become a FusedConv2d, or None."""
    if isinstance(conv.padding, str) and conv.padding == "same":
        pads_odd = any((d * (k - 1)) % 2 for k, d in zip(conv.kernel_size, conv.dilation))
        if pads_odd:
            return "conv padding='same' needs asymmetric padding"
    if not conv.weight.is_floating_point():
        return f"conv weight has dtype {conv.weight.dtype}"
    if bn is not None:
        nf = getattr(bn, "num_features", None)
        if nf is None and getattr(bn, "running_mean", None) is not None:
            nf = bn.running_mean.numel()
        if nf != conv.out_channels:
            return f"BatchNorm has {nf} features, conv has {conv.out_channels} outputs"
    return None


def is_leaf_type(module: nn.Module) -> bool:
    """Modules the passes never look inside: convs, linears, norms, activations and our own fused modules."""
    return (isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, FusedConv2d, FusedAffineLayer))
            or fold.is_batchnorm(module)
            or spec_from_module(module) is not None)


def is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def module_use_counts(model: nn.Module) -> Counter:
    """How many places in the module tree hold each module object (more than one = shared)."""
    return Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def tail_conv(module: nn.Module) -> tuple[nn.Module, str, nn.Conv2d, list[nn.Module]] | None:
    """The Conv2d that produces `module`'s output, as (owner, attribute name, conv, containers on the way).

    `module` itself when it is a Conv2d (owner None); else, for a plain nn.Sequential, the conv at the end of
    it (through nested plain Sequentials): its output is the Sequential's output, so a BN that follows the
    Sequential folds into that conv. None when no conv ends it.
    """
    if is_fusable_conv(module):
        return None, "", module, []
    path = []
    while is_plain_sequential(module) and len(module) > 0:
        path.append(module)
        name = list(module._modules)[-1]
        last = module._modules[name]
        if is_fusable_conv(last):
            return module, name, last, path
        module = last
    return None


# ------------------------------------------------------------------------------------------------ other layer kinds
# Conv1d / Conv3d / ConvTranspose1d-3d / Linear chains (and Conv2d chains with a BatchNorm after the activation)
# are fused by `graph/sequential_layers.py`. Base layer class -> report kind.
LAYER_KINDS = {
    nn.Conv1d: "conv1d_bn_act",
    nn.Conv3d: "conv3d_bn_act",
    nn.ConvTranspose1d: "conv_transpose1d_bn_act",
    nn.ConvTranspose2d: "conv_transpose2d_bn_act",
    nn.ConvTranspose3d: "conv_transpose3d_bn_act",
    nn.Linear: "linear_bn_act",
    # timm's MixedConv2d (fusedconv/fused_mixed.py): a BN (+ act) after it folds into its groups' convs; the
    # data-flow pass only (`chain_base`), never a Sequential's layer (`layer_base` does not return it).
    MixedConv2dKind: "mixed_conv2d_bn_act",
}
# Batch norms whose forward is the plain formula over dim 1 (any rank).
PLAIN_BATCHNORMS_ND = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def layer_base(module: nn.Module) -> type | None:
    """The LAYER_KINDS class `module` computes exactly as: its own exact class, or — for Conv1d / Conv3d only —
    a subclass that overrides neither forward nor _conv_forward (torchvision's Conv3DSimple /
    Conv3DNoTemporal only set up the geometry). None for anything else (Conv2d is handled elsewhere)."""
    t = type(module)
    if t in LAYER_KINDS:
        return t
    if getattr(t, "computes_as", None) is nn.Conv1d:  # bn_folded_layers.BNFoldedConv1d: see its docstring
        return nn.Conv1d
    for base in (nn.Conv1d, nn.Conv3d):
        if isinstance(module, base) and t.forward is base.forward and t._conv_forward is base._conv_forward:
            return base
    return None


def plain_bn_reason(bn: nn.Module, channels: int | None) -> str | None:
    """Why `bn` (after a layer, or after an activation) cannot be folded as a per-channel affine on dim 1 of a
    tensor with `channels` channels (None: not known statically, e.g. a Linear's 3-D output); None when it can."""
    if type(bn) not in PLAIN_BATCHNORMS_ND:
        return f"{type(bn).__name__} is not a BatchNorm whose forward fusedconv knows (BatchNorm1d/2d/3d, SyncBatchNorm)"
    try:
        fold.check_foldable(bn)
    except (RuntimeError, ValueError, TypeError) as e:
        return str(e)
    if channels is not None and bn.running_mean.numel() != channels:
        return f"BatchNorm has {bn.running_mean.numel()} features, the layer has {channels} output channels"
    return None


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def has_hooks(module: nn.Module | None) -> bool:
    """Whether user code registered forward / backward hooks or pre-hooks on `module` itself."""
    return module is not None and any(getattr(module, d, None) for d in _HOOK_DICTS)


def hook_reason(named: list) -> str | None:
    """Why a chain made of the (name, module) pairs `named` is left alone: a module carrying hooks would no
    longer be called (or would see other tensors) once fused; one the model's code reads into (`inspected.py`)
    would be read as its stand-in."""
    for name, m in named:
        if has_hooks(m):
            return f"{name} has forward / backward hooks, which must keep seeing its own output"
        where = inspected(m)
        if where is not None:
            return f"{name} is looked into by the model's code, not only called ({where}), which must keep seeing it"
    return None


# ------------------------------------------------------------------------------------------------ chains in a forward
# The data-flow pass (chain_match.py) matches the same chains over every layer kind; what differs per kind is
# which BatchNorm class may follow (one whose forward accepts the layer's output rank, so fusing never turns the
# original's error into a result) and whether a residual add can join the epilogue.
BATCHNORMS_AFTER = {
    nn.Conv1d: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
    nn.ConvTranspose1d: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.ConvTranspose2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.ConvTranspose3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
    nn.Linear: (nn.BatchNorm1d,),
}
# Layer kinds whose fused module takes `forward(x, residual)` (FusedLinear has no residual epilogue).
RESIDUAL_BASES = (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def chain_base(module: nn.Module) -> type | None:
    """The layer class a chain starting at `module` is fused as: nn.Conv2d for an exact Conv2d, else
    `layer_base` (Conv1d / Conv3d and their geometry-only subclasses, ConvTranspose1d-3d, Linear), else
    MixedConv2dKind for timm's MixedConv2d, else None."""
    if is_fusable_conv(module):
        return nn.Conv2d
    base = layer_base(module)
    if base is None and is_mixed_conv2d(module):
        return MixedConv2dKind
    return base


def layer_bn_verdict(bn: nn.Module, base: type, layer: nn.Module) -> BatchNormVerdict:
    """Whether `bn` may be folded into the `base` layer `layer` before it (Conv2d: `batchnorm_verdict`)."""
    if base is nn.Conv2d or base is MixedConv2dKind:
        return batchnorm_verdict(bn)  # (a MixedConv2d's output is 4-d: any BN a Conv2d chain folds)
    allowed = BATCHNORMS_AFTER[base]
    if type(bn) not in allowed:
        names = "/".join(t.__name__ for t in allowed)
        return BatchNormVerdict(f"{type(bn).__name__} after {base.__name__}: fusedconv folds only {names} there")
    channels = None if base is nn.Linear else layer.out_channels
    return BatchNormVerdict(plain_bn_reason(bn, channels))


def layer_skip_reason(layer: nn.Module, base: type, bn: nn.Module | None) -> str | None:
    """Why a `base` layer (followed by `bn`) cannot become a fused module, or None."""
    if base is nn.Conv2d or base in (nn.Conv1d, nn.Conv3d):
        return conv_skip_reason(layer, bn)
    if base is MixedConv2dKind:
        return _mixed_skip_reason(layer, bn)
    if not layer.weight.is_floating_point():
        return f"layer weight has dtype {layer.weight.dtype}"
    return None


def _mixed_skip_reason(mixed: nn.Module, bn: nn.Module | None) -> str | None:
    """Why a BN after timm's MixedConv2d `mixed` cannot be folded into its groups, as far as the graph passes'
    rules go: each group a conv a Conv2d chain fuses, without hooks. The module itself (its splits, bias-free
    groups, its forward probed) and the BN's size are checked where the fused module is built
    (`FusedMixedConv2d.from_modules`, whose error the pass reports as the reason)."""
    for i, conv in enumerate(mixed._modules.values()):
        if conv is None:
            continue  # (from_modules names it)
        if not is_fusable_conv(conv):
            return f"MixedConv2d group {i}: " + (conv_subclass_reason(conv) or f"{type(conv).__name__} is not a Conv2d")
        if has_hooks(conv):
            return f"MixedConv2d group {i} has forward / backward hooks, which must keep seeing its own output"
        reason = conv_skip_reason(conv, None)
        if reason is not None:
            return f"MixedConv2d group {i}: {reason}"
    return None
