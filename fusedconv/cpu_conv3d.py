"""FusedConv3d on CPU: the 3-D convs PyTorch would run on its reference kernel, on oneDNN where that pays; inside a
call switched to channels_last_3d, every conv as one oneDNN op with its epilogue.

PyTorch's CPU convolution picks oneDNN (`aten::mkldnn_convolution`) for float32 only at batch > 1, groups > 1,
kernels wider than 3x3 in both spatial dims, or inputs with N * C * D * H above 20480; every other 3-D conv runs
`aten::slow_conv3d` (im2col and a matrix product). For batch-1 video models that is most layers: torchvision's
r2plus1d_18 at 1x3x4x32x32 runs 36 of its 37 convs there, and so does the model the conversion replaces, whose
folded twin (`torch.fx` fuse) then runs them the same way.

The fused layer's folded conv (weight * scale, shift as the bias) goes to `torch.mkldnn_convolution` instead when
the conv is big enough to pay for oneDNN's fixed cost of ~55-65 us per call (`pays`). Measured, 2-core Intel Xeon,
float32, batch 1, F.conv3d against `torch.mkldnn_convolution` on the same folded weight (2026-12-05, 2 threads, 1
thread in brackets):

* taken: 64->144 (1,3,3) at 4x32x32 0.57x [0.46x], 144->64 (3,1,1) at 4x32x32 0.73x [0.59x], 24->24 3x3x3 at
  4x28x28 0.37x [0.40x], 16->16 3x3x3 at 4x16x16 0.37x [0.25x], 256->256 3x3x3 at 1x8x8 0.63x [0.70x], 64->128
  (1,3,3) stride (1,2,2) at 4x32x32 0.72x [0.69x]; long reductions from 36 output positions on: 512->512 3x3x3 at
  1x7x7 0.57x [0.65x] and at 1x6x6 0.62x [0.80x], 128->128 at 1x6x6 0.72x [0.76x];
* left on F.conv3d: every 1x1x1 kernel (the reference kernel is one matrix product: 64->64 at 8x28x28 took 1.37x
  as long on oneDNN), small outputs (512->512 3x3x3 at 2x4x4, 32 positions: 1.13x [1.63x]; 256->512 3x3x3 stride
  2 at 2x8x8, a 1x4x4 output: 1.87x; 512->512 3x3x3 at 1x2x2: 1.26x) and small reductions (45->64 (3,1,1) at
  4x16x16: 1.36x; 32->32 (3,1,1) at 4x16x16: 1.16x).

Channels_last_3d input (what PyTorch's CPU performance guide suggests for 3-D CNNs) on a conv PyTorch would run on
its reference kernel: that kernel converts the input and answers NCDHW, measured 1.9-3.8x slower than oneDNN from
4M multiply-adds on (32->32 3x3x3 at 4x16x16: 880 us vs 231; 64->64 1x1x1 at 8x28x28: 806 vs 289; 45->64 (3,1,1)
at 4x16x16: 213 vs 112; below: 8->8 3x3x3 at 2x8x8 55 vs 79, 16->16 1x1x1 at 4x16x16 40 vs 53): from 4M on it takes
oneDNN and its output is made contiguous, the layout the original conv returns there (`pays_channels_last`).

Inside a converted model whose NCDHW clip the layout boundary switched to channels_last_3d (fusedconv/cpu_boundary.py
checks per input signature that the model gives the same outputs and, turned back, the same layout that way), a
FusedConv3d instead runs the whole layer as one `mkldnn::_convolution_pointwise` on its packed folded weight, the
activation (and a residual add) as oneDNN post-ops, answered channels_last_3d for the next layer (`fused_call`): what
the 2-D layers do with channels_last, and what torch.compile's CPU backend emits after freezing. r3d_18 at
1x3x8x112x112, 2 threads, one run: that route 112 ms against 141 ms for the rules above on NCDHW input and 210 ms
for the original (2026-12-05).

Only plain float32 CPU input (contiguous or channels_last_3d), no gradient, outside tracing (the caller's
cached-fold branch) and torch.func transforms, with the fast path and PyTorch's oneDNN switch on (`cpu.enabled`,
`torch.backends.mkldnn.enabled`); the output has F.conv3d's layout. The two kernels round differently
(relative differences ~1e-6 in float32, within the convert self-check tolerance); float64 never comes here. If
oneDNN raises, the call takes F.conv3d.
"""

from __future__ import annotations

import threading

import torch

from fusedconv import cpu
from fusedconv.activations import apply_activation

_Tensor = torch.Tensor
_float32 = torch.float32
_CHANNELS_LAST_3D = torch.channels_last_3d
# N * C * D * H above which PyTorch's CPU conv takes oneDNN itself at batch 1 (its `use_mkldnn` heuristic).
_ATEN_ONEDNN_INPUT = 20480
_mkldnn_convolution = getattr(torch, "mkldnn_convolution", None)
# The innermost torch.func transform running (vmap, grad, ...), None outside them: inside one the tensors are
# functorch's wrappers, and vmap has no batching rule for `mkldnn_convolution` (it would warn and loop).
_functorch_transform = torch._C._functorch.peek_interpreter_stack
# `pays` per (input shape, weight shape, stride, padding, dilation), decided once.
_pays: dict = {}
_MAX_SIGNATURES = 1024

# `pays`: oneDNN where the output has at least _LARGE_OUTPUT positions and the conv at least _LARGE_MACS
# multiply-adds with a reduction (Cin / groups * kd * kh * kw) of at least _MIN_REDUCTION, or, at a smaller output
# of at least _SMALL_OUTPUT positions, a reduction of at least _LONG_REDUCTION and _LONG_MACS multiply-adds.
_LARGE_OUTPUT, _LARGE_MACS, _MIN_REDUCTION = 1024, 4_000_000, 192
_SMALL_OUTPUT, _LONG_REDUCTION, _LONG_MACS = 36, 1024, 10_000_000


def _conv_output_shape(size, weight_shape, stride, padding, dilation) -> tuple:
    """(N, Cout, D, H, W) of a 3-D conv of an input of `size` with a weight of `weight_shape`."""
    return (size[0], weight_shape[0], *((size[2 + i] + 2 * padding[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1)
                                        // stride[i] + 1 for i in range(3)))


def pays(weight_shape, out_shape) -> bool:
    """Whether oneDNN is expected to beat PyTorch's reference 3-D conv for this weight (Cout, Cin/groups, kd, kh,
    kw) and output (N, Cout, D, H, W) shape (module doc)."""
    taps = weight_shape[2] * weight_shape[3] * weight_shape[4]
    if taps == 1:
        return False
    positions = out_shape[0] * out_shape[2] * out_shape[3] * out_shape[4]
    reduction = weight_shape[1] * taps
    macs = positions * reduction * weight_shape[0]
    return ((positions >= _LARGE_OUTPUT and reduction >= _MIN_REDUCTION and macs >= _LARGE_MACS)
            or (positions >= _SMALL_OUTPUT and reduction >= _LONG_REDUCTION and macs >= _LONG_MACS))


def pays_channels_last(input_shape, weight_shape, out_shape, groups: int) -> bool:
    """For channels_last_3d input: whether to take oneDNN. PyTorch's reference kernel then also converts the input
    and answers NCDHW; where PyTorch's own heuristic already picks oneDNN (batch > 1, groups > 1, kernels wider
    than 3x3, N * C * D * H above 20480) nothing changes, else any conv of at least _LARGE_MACS multiply-adds
    (module doc)."""
    n, c, d, h = input_shape[0], input_shape[1], input_shape[2], input_shape[3]
    if groups > 1 or (weight_shape[3] > 3 and weight_shape[4] > 3) or n > 1 or n * c * d * h > _ATEN_ONEDNN_INPUT:
        return False
    positions = out_shape[0] * out_shape[2] * out_shape[3] * out_shape[4]
    reduction = weight_shape[1] * weight_shape[2] * weight_shape[3] * weight_shape[4]
    return positions * reduction * weight_shape[0] >= _LARGE_MACS


def conv3d(x, weight, bias, stride, padding, dilation, groups):
    """The folded 3-D conv on oneDNN where it pays, else None (the caller runs F.conv3d). `weight` / `bias` are
    the module's cached fold (float32, contiguous, no gradient); padding is already numeric (zeros mode). The output
    has the layout F.conv3d gives: contiguous for contiguous input, and for channels_last_3d input on a conv it
    would run on its reference kernel."""
    if (type(x) is not _Tensor or x.dtype is not _float32 or _mkldnn_convolution is None or not cpu.enabled
            or not x.is_cpu or x.dim() != 5 or x.requires_grad or weight.dtype is not _float32
            or not cpu.mkldnn_enabled() or not cpu.available() or _functorch_transform() is not None):
        return None
    if x.is_contiguous():
        channels_last = False
    elif x.is_contiguous(memory_format=_CHANNELS_LAST_3D):
        channels_last = True
    else:
        return None
    key = (x.shape, weight.shape, stride, padding, dilation, channels_last)
    ok = _pays.get(key)
    if ok is None:
        shape, size = weight.shape, x.shape
        out_shape = _conv_output_shape(size, shape, stride, padding, dilation)
        ok = min(out_shape[2:]) > 0 and (pays_channels_last(size, shape, out_shape, groups) if channels_last
                                         else pays(shape, out_shape))
        if len(_pays) >= _MAX_SIGNATURES:
            _pays.clear()  # a process fed ever-changing shapes starts over rather than growing forever
        _pays[key] = ok
    if not ok:
        return None
    try:
        y = _mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    except RuntimeError:
        return None  # oneDNN refused this call: F.conv3d, as the original layer
    # oneDNN answers channels_last_3d input in channels_last_3d; PyTorch's reference kernel, which the original
    # conv runs for these calls, answers NCDHW.
    return y.contiguous() if channels_last else y


# ------------------------------------------------------------------ channels_last_3d inside a switched call
# The layout boundary's per-thread stack of entered calls, innermost last: True where the call's NCDHW inputs were
# made channels_last_3d (fusedconv/cpu_boundary.py keeps it here, where the layers can read it).
layout_calls = threading.local()


def switched() -> bool:
    """The innermost converted-model call on this thread runs with its inputs switched to channels_last
    (fusedconv/cpu_boundary.py): inside it the layers' layouts are the fast path's business, since the boundary
    checked that the model returns the same values and, once turned back, the same layout."""
    stack = getattr(layout_calls, "stack", None)
    return bool(stack) and bool(stack[-1])


class OneDNNState:
    """A FusedConv3d's oneDNN conv with post-ops: the folded weight it packed (`weight`, the fold cache's tensor:
    a refold is a new one), the packed weight, and the call tails built once."""

    __slots__ = ("weight", "key", "packed", "unary_tail", "binary_tail", "inplace_tail", "after_add", "ok")

    def __init__(self, weight, key):
        padding, stride, dilation, groups, act = key
        geometry = (list(padding), list(stride), list(dilation), groups)
        self.weight, self.key, self.packed, self.ok = weight, key, None, None
        # The 2-D layers' call tails (every epilogue activation is a oneDNN one; after the binary add only identity
        # or relu, any other runs in place after the call: `after_add`).
        self.unary_tail, self.binary_tail, self.after_add = cpu.onednn_call_args(geometry, act.name, act.param)
        # The binary tail into the residual itself (`mkldnn::_convolution_pointwise_.binary`, where this PyTorch has
        # it), for every activation: one oneDNN does not fuse runs in place after it, on the residual's storage.
        self.inplace_tail = (*geometry, "add", 1.0, *self.binary_tail[6:])


def _output_shape(size, module, padding) -> tuple:
    return _conv_output_shape(size, (module.out_channels, 0, *module.kernel_size), module.stride, padding,
                              module.dilation)


def routed(module) -> bool:
    """Whether a FusedConv3d ran the oneDNN conv with post-ops (`fused_call`) since it last folded."""
    state = module.__dict__.get("_onednn_3d")
    return state is not None and bool(state.ok)


def fused_call(module, x, residual, padding, residual_private: bool = False):
    """act(conv(x) * scale + shift [+ residual]) [* post_scale + post_shift] of a FusedConv3d as one oneDNN conv
    with the activation (and the residual add) as post-ops, on the packed folded weight, answered channels_last_3d;
    or None, and the caller runs its usual path.

    Taken only inside a call the layout boundary switched (`switched()`: the model was checked to give the same
    outputs in channels_last_3d, so the layers keep that layout between them as the 2-D layers keep channels_last),
    for float32 channels_last_3d CPU input needing no gradient, a residual of the output's shape, outside tracing
    and torch.func transforms, with the fast path and PyTorch's oneDNN switch on. Measured, r3d_18 at
    1x3x8x112x112 (2 threads, 2-core Xeon): every conv this way 110 ms, the same convs on unpacked weights 121 ms,
    the module path on NCDHW input 141 ms, torch.compile with freezing 109 ms.

    `residual_private` (convert's flat forward proved that no one else reads the residual afterwards,
    graph/flat.py `flat_private_3d`): the output is written into the residual itself, as Inductor does, which
    saves a fresh output buffer per residual block (a hand-written r3d_18 of these ops: 1.012 of torch.compile's
    time out of place, 1.003 in place)."""
    if (type(x) is not _Tensor or x.dtype is not _float32 or not switched() or not cpu.enabled or not x.is_cpu
            or x.dim() != 5 or not x.is_contiguous(memory_format=_CHANNELS_LAST_3D)
            or not cpu.mkldnn_enabled() or not cpu.available() or _functorch_transform() is not None):
        return None
    if residual is not None and (type(residual) is not _Tensor or residual.dtype is not _float32
                                 or residual.shape != _output_shape(x.shape, module, padding)):
        return None  # the usual path (which broadcasts a residual of another shape, as the original add)
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)
                                    or (module.post_scale is not None and module.post_scale.requires_grad)):
        return None
    if module._fold_in_graph() or module._affine_tensors()[0].dtype is not _float32:
        return None
    state = module.__dict__.get("_onednn_3d")
    weight, bias = module._folded()
    # What the packed weight and the call tails were built from: the fold (a new tensor after any edit) and the
    # geometry and activation as the module holds them now (plain attributes a user may reassign).
    key = (padding, module.stride, module.dilation, module.groups, module.act)
    if state is None or state.weight is not weight or state.key != key:
        state = module.__dict__["_onednn_3d"] = OneDNNState(weight, key)
    if state.ok is False:
        return None
    if state.ok is None and min(_output_shape(x.shape, module, padding)) <= 0:
        return None  # the usual path answers (or refuses) these as the original does; oneDNN is tried on a real one
    try:
        if state.packed is None:
            state.packed = cpu.pack_weight(weight, *key[:4], x.shape)
        if residual is None:
            y = cpu._pointwise(x, state.packed, bias, *state.unary_tail)
            after = None
        else:
            if (residual_private and cpu._pointwise_binary_inplace is not None
                    and cpu._writable(x, residual, _CHANNELS_LAST_3D)):
                y = cpu._pointwise_binary_inplace(residual, x, state.packed, bias, *state.inplace_tail)
            else:
                y = cpu._pointwise_binary(x, residual.contiguous(memory_format=_CHANNELS_LAST_3D), state.packed,
                                          bias, *state.binary_tail)
            after = state.after_add
    except RuntimeError:
        # oneDNN refused this module on its first call: the usual path from now on. After a first success, only
        # this call (an empty or too small input) takes it.
        if not state.ok:
            state.ok, state.packed = False, None
        return None
    state.ok = True
    if after is not None:
        y = apply_activation(y, after[0], after[1], inplace=True)
    if module.post_scale is not None:
        view = (1, -1, 1, 1, 1)
        y = y.mul_(module.post_scale.view(view)).add_(module.post_shift.view(view))
    return y
