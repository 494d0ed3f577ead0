"""FusedConv2d: one inference module for act(conv(x) * scale + shift [+ residual]).

On CUDA (fp16 / bf16 / fp32 and a geometry the kernels cover) forward calls the `fusedconv::conv_bn_act` op,
which runs one Triton kernel with BN scale/shift, the residual add and the activation in its epilogue.
Everywhere else it runs the standard-conv fallback: BN's scale is folded into a cached copy of the weight
(computed in float32 from the stored weight, checked to be exactly representable enough in the weight's dtype),
so a single `F.conv2d` with bias does conv + BN and the activation runs in place — no separate BN pass.

State (the state_dict, stable names): `weight` (Cout, Cin/groups, KH, KW) in the conv's dtype, `scale` and
`shift` (Cout,) in float32 (float64 when the module is float64). The scale/shift stay float32 when the module is
cast with `.half()` / `.to(torch.bfloat16)`: they are applied to the fp32 accumulator, and casting them would
lose exactly the precision the epilogue exists to keep.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from fusedconv import fold, ops
from fusedconv.validation import check_inputs
from fusedconv.activations import ActivationSpec, apply_activation, as_spec

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair_arg(name: str, value, minimum: int) -> tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return pair


class FusedConv2d(nn.Module):
    """Conv2d + inference BatchNorm (as per-channel scale/shift) + optional residual add + activation.

    Build it from modules with `FusedConv2d.from_modules(conv, bn, act)`, or directly from tensors.
    `forward(x, residual=None)` computes `act(conv(x, weight) * scale + shift + residual)`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        activation=None,
    ):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight: expected a 4-d tensor (Cout, Cin/groups, KH, KW), got {got}")
        if not weight.is_floating_point():
            raise TypeError(f"weight: expected a floating-point tensor, got dtype {weight.dtype}")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups: expected a positive int, got {groups!r}")
        cout = weight.shape[0]
        if cout % groups:
            raise ValueError(f"groups: expected to divide out_channels={cout}, got groups={groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {_PADDING_MODES}, got {padding_mode!r}")
        if isinstance(padding, str):
            raise ValueError(f"padding: expected an int or a pair of ints (resolve 'same'/'valid' first), got {padding!r}")
        self.stride = _pair_arg("stride", stride, 1)
        self.padding = _pair_arg("padding", padding, 0)
        self.dilation = _pair_arg("dilation", dilation, 1)
        self.groups = groups
        self.padding_mode = padding_mode
        self.in_channels = weight.shape[1] * groups
        self.out_channels = cout
        self.kernel_size = (weight.shape[2], weight.shape[3])
        self.act = as_spec(activation)

        epi_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        scale = torch.ones(cout, dtype=epi_dtype, device=weight.device) if scale is None else scale
        shift = torch.zeros(cout, dtype=epi_dtype, device=weight.device) if shift is None else shift
        for name, t in (("scale", scale), ("shift", shift)):
            if not isinstance(t, torch.Tensor) or t.shape != (cout,):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape ({cout},) (one value per output channel), got {got}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: expected finite values, got non-finite entries")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("scale", scale.detach().to(device=weight.device, dtype=epi_dtype).clone())
        self.register_buffer("shift", shift.detach().to(device=weight.device, dtype=epi_dtype).clone())
        # Derived, never saved: the weight with scale folded in (fallback path), and its provenance.
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)
        self._folded_key = None
        self._repack()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module | None = None, act=None) -> "FusedConv2d":
        """Fuse `act(bn(conv(x)))`. `bn` may be None (the conv's bias becomes the shift); `act` may be None,
        an activation module, a name or an ActivationSpec. The source modules are not modified."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected nn.Conv2d, got {type(conv).__name__}")
        if bn is not None:
            fold.check_foldable(bn)
        scale, shift = fold.conv_bn_scale_shift(conv, bn, dtype=torch.float64)
        epi_dtype = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
        padding = conv.padding
        if isinstance(padding, str):
            padding = _resolve_string_padding(conv)
        return cls(conv.weight, scale.to(epi_dtype), shift.to(epi_dtype), stride=conv.stride, padding=padding,
                   dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode, activation=act)

    # ------------------------------------------------------------------ state handling
    def _repack(self) -> None:
        """Lay the weight out the way the CUDA kernel reads it fastest (a layout, not a copy of the values)."""
        if self.weight.is_cuda and ops.kernel_available():
            packed = ops.pack_weight(self.weight.data, self.groups)
            if packed.stride() != self.weight.stride():
                self.weight.data = packed

    def _apply(self, fn, recurse=True):
        scale, shift = self.scale, self.shift
        super()._apply(fn, recurse)
        # Keep the epilogue's precision: scale/shift follow the device, not a downcast of the dtype.
        epi_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.scale = scale.to(device=self.weight.device, dtype=epi_dtype)
        self.shift = shift.to(device=self.weight.device, dtype=epi_dtype)
        self._folded_key = None
        self.folded_weight = None
        self.folded_bias = None
        self._repack()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("scale", "shift"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                # Keep our own fp32/fp64 dtype even if the saved copy was cast.
                state_dict[prefix + name] = t.to(getattr(self, name).dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._folded_key = None

    def refresh(self) -> None:
        """Recompute derived state (folded weight, packing) after editing weight/scale/shift in place."""
        self._folded_key = None
        self._repack()

    # ------------------------------------------------------------------ forward
    def _fold_cache_key(self):
        w = self.weight
        return (w.data_ptr(), w._version, w.dtype, w.device, self.scale._version, self.shift._version,
                self.scale.data_ptr(), self.shift.data_ptr())

    def _compute_folded(self):
        """The weight with scale folded in, or (None, None) when the weight's dtype cannot hold it faithfully."""
        w = self.weight
        view = (-1, 1, 1, 1)
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        wf = w.detach().to(acc) * self.scale.to(acc).view(view)
        folded = wf.to(w.dtype)
        # "Exact enough": finite, and no weight flushed to zero or into the subnormal range where it
        # loses its precision. Otherwise the fallback applies scale to the conv output in fp32 instead.
        tiny = torch.finfo(w.dtype).tiny
        if w.dtype != acc:
            lost = (folded.abs() < tiny) & (wf != 0)
            if not torch.isfinite(folded).all() or bool(lost.any()):
                return None, None
        return folded.contiguous(memory_format=torch.channels_last if w.is_cuda else torch.contiguous_format), \
            self.shift.to(w.dtype)

    def _folded(self):
        if torch.compiler.is_compiling():
            # Traced graphs compute it from the parameters; a frozen / constant-folded graph does it once.
            if self.folded_weight is not None:
                return self.folded_weight, self.folded_bias
            return self._compute_folded()
        key = self._fold_cache_key()
        if key != self._folded_key:
            self.folded_weight, self.folded_bias = self._compute_folded()
            self._folded_key = key
        return self.folded_weight, self.folded_bias

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.padding_mode == "zeros" or self.padding == (0, 0):
            return x, self.padding
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode), (0, 0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, self.weight, self.groups, residual)
        x, padding = self._pad_input(x)
        if ops.use_kernel(x, self.weight):
            return ops.conv_bn_act(x, self.weight, self.scale, self.shift, residual, self.stride, padding,
                                   self.dilation, self.groups, self.act.name, self.act.param)
        return self._fallback(x, padding, residual)

    def _fallback(self, x: torch.Tensor, padding, residual: torch.Tensor | None) -> torch.Tensor:
        wf, bf = self._folded()
        if wf is not None:
            y = F.conv2d(x, wf, bf, self.stride, padding, self.dilation, self.groups)
            if residual is not None:
                y = y + residual
            return apply_activation(y, self.act.name, self.act.param, inplace=True)
        # Scale does not fit the weight's dtype: apply it to the conv output in fp32.
        y = F.conv2d(x, self.weight, None, self.stride, padding, self.dilation, self.groups)
        y = y.to(self.scale.dtype) * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        if residual is not None:
            y = y + residual.to(y.dtype)
        return apply_activation(y, self.act.name, self.act.param, inplace=True).to(x.dtype)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", act={self.act}"

    # The activation is configuration, not state: keep it across pickling / deepcopy as a plain spec.
    def __setstate__(self, state):
        super().__setstate__(state)
        if isinstance(self.__dict__.get("act"), str):
            self.act = ActivationSpec(self.__dict__["act"])


def _resolve_string_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Turn padding='valid'/'same' into explicit symmetric padding (refusing 'same' that needs asymmetry)."""
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(f"conv padding: 'same' with kernel {conv.kernel_size} and dilation {conv.dilation} "
                             "needs asymmetric padding, which FusedConv2d does not support")
        pads.append(total // 2)
    return tuple(pads)
