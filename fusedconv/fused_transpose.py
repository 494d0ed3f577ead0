"""FusedConvTranspose1d/2d/3d: act(conv_transpose(x) * scale + shift [+ residual]) [* post_scale + post_shift].

The weight keeps nn.ConvTransposeNd's layout (Cin, Cout/groups, k...): output channel o = g * Cout_g + j sits on
weight dim 1 within group g, so the BN scale folds along that axis, group by group (scaling dim 0 as for a conv
is the classic bug). Every device runs the standard transposed conv (cuDNN on GPU) with the folded weight plus
the epilogue; conventions (fp32 scale/shift, state_dict, errors) and autograd (a call that needs a gradient for
x, residual, weight, scale, shift or the post-affine folds in the graph, so each gets its exact gradient) are
those of `fused_layers.FusedAffineLayer`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from fusedconv.fx_leaf import leaf_call
from fusedconv import fold, layout
from fusedconv.fused_layers import FusedAffineLayer, int_tuple


class FusedConvTransposeNd(FusedAffineLayer):
    """act(conv_transposeNd(x) * scale + shift [+ residual]) [* post_scale + post_shift].

    weight (Cin, Cout/groups, k...) as nn.ConvTransposeNd stores it. Every device runs the standard transposed
    conv with the scale folded into the weight (fp32 / fp64) plus the epilogue: no Triton kernel (yet).
    """

    _ND = 0
    _CONV = None

    def __init__(self, weight: torch.Tensor, scale=None, shift=None, *, stride=1, padding=0, output_padding=0,
                 dilation=1, groups: int = 1, activation=None, post_scale=None, post_shift=None):
        super().__init__()
        nd = self._ND
        if not isinstance(weight, torch.Tensor) or weight.dim() != nd + 2:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight: expected a {nd + 2}-d tensor (Cin, Cout/groups, {', '.join('k' * nd)}), got {got}")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or weight.shape[0] % groups:
            raise ValueError(f"groups: expected a positive int dividing in_channels={weight.shape[0]}, got {groups!r}")
        self.stride = int_tuple("stride", stride, nd, 1)
        self.padding = int_tuple("padding", padding, nd, 0)
        self.output_padding = int_tuple("output_padding", output_padding, nd, 0)
        self.dilation = int_tuple("dilation", dilation, nd, 1)
        if any(op >= max(s, d) for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(f"output_padding: expected each value < max(stride, dilation), got "
                             f"{self.output_padding} with stride {self.stride} and dilation {self.dilation}")
        self.groups = groups
        self.in_channels, self.out_channels = weight.shape[0], weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self._init_affine(weight, scale, shift, activation, post_scale, post_shift, self.out_channels)

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.Module | None = None, act=None, post_bn: nn.Module | None = None):
        """Fuse `post_bn(act(bn(conv_transpose(x))))`; `bn`, `act` and `post_bn` may each be None."""
        if type(conv) is not cls._CONV:
            raise TypeError(f"conv: expected nn.{cls._CONV.__name__}, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv padding_mode: transposed convs support only 'zeros', got {conv.padding_mode!r}")
        scale, shift = fold.layer_bn_scale_shift(conv, bn, dtype=torch.float64)
        post = (None, None) if post_bn is None else fold.post_affine(post_bn, torch.float64)
        if post_bn is not None and post[0].numel() != conv.out_channels:
            raise ValueError(f"post_bn: expected {conv.out_channels} features, got {post[0].numel()}")
        return cls(conv.weight.detach(), scale, shift, stride=conv.stride, padding=conv.padding,
                   output_padding=conv.output_padding, dilation=conv.dilation, groups=conv.groups, activation=act,
                   post_scale=post[0], post_shift=post[1])

    def _scale_weight(self, weight, scale):
        g = self.groups
        cin, cout_g = weight.shape[0], weight.shape[1]
        view = (g, 1, cout_g) + (1,) * self._ND
        folded = (weight.reshape(g, cin // g, cout_g, *weight.shape[2:]) * scale.view(view)).reshape(weight.shape)
        # A channels_last 2-d weight keeps its layout: the transposed conv's output is then channels_last, as the
        # original's is (fusedconv/layout.py).
        return layout.dense_copy(folded, weight, cout_g * g) if self._ND == 2 else folded

    def _layer(self, x, weight, bias):
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self._ND - 1]
        return fn(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(conv_transpose(x) * scale + shift [+ residual]) [* post_scale + post_shift]."""
        if isinstance(x, fx.Proxy):  # torch.fx symbolic tracing: record one leaf call (fusedconv/fx_leaf.py)
            return leaf_call(self, (x, residual), {})
        cast = self._check_x(x, residual, self._ND, self.in_channels)
        if x.dim() == self._ND + 1:
            y = self.forward(x.unsqueeze(0), None if residual is None else residual.unsqueeze(0))
            return y.squeeze(0)
        if cast is not None:
            return self._autocast_layer(x, residual, cast)
        return self._fallback(x, residual)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, output_padding={self.output_padding}")
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", act={self.act}" + (", post_bn" if self.post_scale is not None else "")


class FusedConvTranspose1d(FusedConvTransposeNd):
    _ND, _CONV, _LAYER = 1, nn.ConvTranspose1d, "ConvTranspose1d"


class FusedConvTranspose2d(FusedConvTransposeNd):
    _ND, _CONV, _LAYER = 2, nn.ConvTranspose2d, "ConvTranspose2d"


class FusedConvTranspose3d(FusedConvTransposeNd):
    _ND, _CONV, _LAYER = 3, nn.ConvTranspose3d, "ConvTranspose3d"
