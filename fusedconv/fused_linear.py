"""FusedLinear: act(BatchNorm1d(linear(x))) [-> BatchNorm1d] as one inference module.

BatchNorm1d normalises dim 1 of its input. On a 2-D (N, out_features) linear output that is the output feature,
a weight axis, so the BN folds into the weight: one `F.linear` with the folded weight and bias, then the
activation. On a 3-D (N, C, L) output (a linear over the last dim of (N, C, in_features)) dim 1 is not a weight
axis: the module applies scale/shift along dim 1 of the output, exactly as the BN would. Both follow from one
rule — scale/shift act on dim 1 of the linear's output — so one module reproduces Sequential(Linear,
BatchNorm1d, act) for both input ranks, as PyTorch does.

State: `weight` (out, in) and `bias` (out,) or None as nn.Linear keeps them, `scale` / `shift` (C,) of the BN
(None when built without one), optional `post_scale` / `post_shift` of a BN after the activation; all of these
but weight/bias in float32 (float64 for float64 modules). Every device runs the standard op plus the epilogue.

Autograd: as the other fused layers (fused_layers.py), a call in grad mode where x, weight, bias, scale, shift
or the post-affine requires grad folds in the graph (never from the detached cache), so each gets its exact
gradient; the 3-D and no-BatchNorm paths apply the affine to the output and are differentiable as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from fusedconv.fx_leaf import leaf_call
from fusedconv import autocast, fold
from fusedconv.fused_layers import FusedAffineLayer, check_channel_vector, epilogue_dtype


class FusedLinear(FusedAffineLayer):
    """Linear + BatchNorm1d (as scale/shift on dim 1 of the output) + activation (+ BatchNorm1d after it)."""

    _LAYER = "Linear"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale=None, shift=None, *,
                 activation=None, post_scale=None, post_shift=None):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight: expected a 2-d tensor (out_features, in_features), got {got}")
        if (scale is None) != (shift is None):
            raise ValueError("scale/shift: expected both (a BatchNorm1d after the linear) or neither, got only one")
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            check_channel_vector("bias", bias, self.out_features)
        self.has_bn = scale is not None
        channels = scale.numel() if isinstance(scale, torch.Tensor) and scale.dim() == 1 else self.out_features
        post_c = post_scale.numel() if isinstance(post_scale, torch.Tensor) and post_scale.dim() == 1 else channels
        # Channels on dim 1 need not be out_features (3-D input), so scale/shift/post are checked for consistency
        # among themselves here and against the input in forward.
        self._init_affine(weight, scale, shift, activation, None, None, channels)
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype).clone())
        if not self.has_bn:
            self.scale, self.shift = None, None
        if (post_scale is None) != (post_shift is None):
            raise ValueError("post_scale/post_shift: expected both or neither, got only one")
        if post_scale is not None:
            check_channel_vector("post_scale", post_scale, post_c)
            check_channel_vector("post_shift", post_shift, post_c)
            epi = epilogue_dtype(weight.dtype)
            self.post_scale = post_scale.detach().to(weight.device, epi).clone()
            self.post_shift = post_shift.detach().to(weight.device, epi).clone()

    @classmethod
    def from_modules(cls, linear: nn.Linear, bn: nn.Module | None = None, act=None,
                     post_bn: nn.Module | None = None) -> "FusedLinear":
        """Fuse `post_bn(act(bn(linear(x))))`; `bn`, `act` and `post_bn` may each be None."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        scale = shift = None
        if bn is not None:
            scale, shift = fold.fold_bn(bn, None, torch.float64)
        post = (None, None) if post_bn is None else fold.post_affine(post_bn, torch.float64)
        return cls(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), scale, shift,
                   activation=act, post_scale=post[0], post_shift=post[1])

    # FusedAffineLayer hooks: the fold (2-D outputs only) scales weight rows; the bias folds with the shift.
    def _scale_weight(self, weight, scale):
        return weight * scale.view(-1, 1)

    def _layer(self, x, weight, bias, *args):
        return F.linear(x, weight, bias)

    def _fold_tensors(self) -> tuple:
        return self.weight, self.bias, self.scale, self.shift

    def _folded(self):
        wf, shift = super()._folded()
        # Detached like the cached weight: calls that need a gradient for these fold in the graph instead.
        bias = shift if self.bias is None else self.bias.detach() * self.scale.detach().to(self.bias.dtype) + shift
        return wf, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """post_bn(act(bn(linear(x)))): x is (N, in_features) or (N, C, in_features) with a BatchNorm, any
        (..., in_features) without one."""
        if isinstance(x, fx.Proxy):  # torch.fx symbolic tracing: record one leaf call (fusedconv/fx_leaf.py)
            return leaf_call(self, (x,), {})
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"input: expected last dim {self.in_features} (in_features), got shape {tuple(x.shape)}")
        # Inside torch.autocast the original Linear runs in the region's dtype, and so does this one.
        cast = autocast.cast_dtype(x, self.weight)
        if x.dtype != self.weight.dtype and cast is None:
            raise TypeError(f"input: expected dtype {self.weight.dtype} to match the module's weight, got {x.dtype}")
        channels = (self.scale.numel() if self.has_bn else
                    self.post_scale.numel() if self.post_scale is not None else None)
        if channels is not None:
            if x.dim() not in (2, 3):
                raise ValueError(f"input: expected a 2-d (N, in_features) or 3-d (N, C, in_features) tensor (what "
                                 f"BatchNorm1d takes), got shape {tuple(x.shape)}")
            c = self.out_features if x.dim() == 2 else x.shape[1]
            if c != channels:
                raise ValueError(f"input: BatchNorm1d normalises dim 1 of the linear's output, which has {c} "
                                 f"channels for input shape {tuple(x.shape)}; expected {channels}")
        if cast is not None:
            # The linear in the region's dtype, the rest in fp32 on its output (fusedconv/autocast.py).
            bias = None if self.bias is None else self.bias.to(cast)
            y = F.linear(x.to(cast), self.weight.to(cast), bias).to(torch.float32)
            if self.has_bn:
                view = self._channel_view(y)
                y = y * self.scale.to(y.dtype).view(view) + self.shift.to(y.dtype).view(view)
            return self._epilogue_rest(y, None).to(cast)
        if not self.has_bn:
            y = F.linear(x, self.weight, self.bias)
            return self._epilogue_rest(y, None)
        acc = epilogue_dtype(self.weight.dtype)
        if x.dim() == 2 and self.weight.dtype == acc:
            if self._fold_in_graph():  # tracing, or a gradient for weight / bias / scale / shift
                wf = self.weight * self.scale.view(-1, 1)
                bf = self.shift if self.bias is None else self.bias * self.scale + self.shift
            else:
                wf, bf = self._folded()
            return self._epilogue_rest(F.linear(x, wf, bf), None)
        y = F.linear(x, self.weight, self.bias).to(acc)
        view = self._channel_view(y)
        y = y * self.scale.view(view) + self.shift.view(view)
        return self._epilogue_rest(y, None).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bn={self.has_bn}, act={self.act}" + (", post_bn" if self.post_scale is not None else ""))
