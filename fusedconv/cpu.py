"""Eager CPU path for FusedConv2d: routing decided once per input signature, the folded weight cached against
the tensors' version counters, and for channels_last float32 input one oneDNN (mkldnn) convolution with a
pre-packed weight and the activation (and the residual add) fused into the conv as oneDNN post-ops; a float32
channel slice (dense in neither layout) is copied to channels_last for that route, and answered in the layout
F.conv2d would answer it in.

These are the ops Inductor's CPU backend emits after freezing (`mkldnn::_reorder_convolution_weight`,
`mkldnn::_convolution_pointwise` and its `.binary` overload). They are private PyTorch ops, so everything here is
guarded: `available()` checks that they exist, callers fall back to F.conv2d when a call raises, and only float32
on CPU is ever routed here. Never used while tracing (torch.compile / torch.export / ONNX keep standard aten ops).
"""

from __future__ import annotations

import math

import torch

from fusedconv import cpu_taps, ops
from fusedconv.activations import apply_activation
from fusedconv.validation import check_inputs

# FusedConv2d activation name -> (oneDNN unary attr, scalars, algorithm); leaky_relu is built in unary_attr.
_UNARY = {
    "identity": ("none", [], ""),
    "relu": ("relu", [], ""),
    "relu6": ("hardtanh", [0.0, 6.0], ""),
    "silu": ("swish", [], ""),
    "hardswish": ("hardswish", [], ""),
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
}
# Activations oneDNN fuses after a binary "add" post-op (measured: others raise "Unary Fusion behavior undefined").
_BINARY_UNARY = ("identity", "relu")

# Switch for the whole fast path (A/B measurements, or to rule it out when debugging): False -> F.conv2d fallback.
enabled = True
# PyTorch's own oneDNN switch (`torch.backends.mkldnn.enabled = False`, `with torch.backends.mkldnn.flags(enabled=
# False)`), read on every call: a user who turns oneDNN off (a oneDNN problem on their CPU, matching a reference run)
# gets no oneDNN op from a fused layer either; its calls take F.conv2d, as the original model's do.
mkldnn_enabled = getattr(torch._C, "_get_mkldnn_enabled", lambda: True)

_available: bool | None = None
# The resolved `mkldnn::_convolution_pointwise` overloads (set by available()): calling through the packet
# `torch.ops.mkldnn._convolution_pointwise` resolves the overload again on every call, and an OpOverload's own
# __call__ is one more Python frame around the C++ callable it holds (`_op`), so the hot path calls that directly.
_pointwise = None
_pointwise_binary = None
# `mkldnn::_convolution_pointwise_.binary`: the residual conv written in place into the residual (None where this
# PyTorch lacks it). Used only for a residual convert proved private to the call (eager_forward, residual_private).
_pointwise_binary_inplace = None


def _direct(overload):
    # The C++ callable behind an OpOverload where this PyTorch exposes it and nothing is registered to intercept
    # the call in Python (OpOverload.__call__ then does nothing but call it), else the overload itself.
    op = getattr(overload, "_op", None)
    if callable(op) and getattr(overload, "_pyobj_dispatcher", None) is None:
        return op
    return overload


def available() -> bool:
    """True when this PyTorch build has oneDNN and the pointwise-conv ops (checked once)."""
    global _available, _pointwise, _pointwise_binary, _pointwise_binary_inplace
    if _available is None:
        try:
            ops = torch.ops.mkldnn
            _available = bool(
                torch.backends.mkldnn.is_available()
                and hasattr(ops, "_convolution_pointwise")
                and hasattr(ops._convolution_pointwise, "binary")
                and hasattr(ops, "_reorder_convolution_weight"))
            if _available:
                _pointwise = _direct(ops._convolution_pointwise.default)
                _pointwise_binary = _direct(ops._convolution_pointwise.binary)
                inplace = getattr(ops, "_convolution_pointwise_", None)
                if inplace is not None and hasattr(inplace, "binary"):
                    _pointwise_binary_inplace = _direct(inplace.binary)
        except (AttributeError, RuntimeError):
            _available = False
    return _available


def unary_attr(name: str, param: float) -> tuple[str, list, str]:
    """oneDNN post-op for an activation; leaky_relu carries its slope as the scalar."""
    if name == "leaky_relu":
        return "leaky_relu", [float(param)], ""
    return _UNARY[name]


def pack_weight(weight: torch.Tensor, padding, stride, dilation, groups: int, input_size) -> torch.Tensor:
    """The weight reordered once into oneDNN's blocked layout for this conv (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, list(input_size))


def onednn_call_args(geometry, act_name: str, act_param: float):
    """The trailing arguments of the two oneDNN calls for one module, built once (never per call):
    (unary-call tail, binary-call tail, activation left to apply after the binary call or None)."""
    padding, stride, dilation, groups = geometry
    attr, scalars, algorithm = unary_attr(act_name, act_param)
    unary_tail = (padding, stride, dilation, groups, attr, scalars, algorithm)
    # oneDNN fuses only these activations after a binary add; any other runs in place after the call.
    fused_after_add = act_name in _BINARY_UNARY
    binary_unary = "relu" if act_name == "relu" else None
    binary_tail = (padding, stride, dilation, groups, "add", None, binary_unary, [], "")
    return unary_tail, binary_tail, None if fused_after_add else (act_name, act_param)


def inplace_tail(geometry, act_name: str):
    """Trailing arguments of the in-place binary call (residual, x, weight, bias, *tail), or None when the
    activation is not one oneDNN fuses after the add (the in-place route is then not taken)."""
    if act_name not in _BINARY_UNARY:
        return None
    padding, stride, dilation, groups = geometry
    return (padding, stride, dilation, groups, "add", 1.0, "relu" if act_name == "relu" else None, [], "")


def _writable(x, residual, memory_format=torch.channels_last) -> bool:
    """The residual itself can take the output: float32, dense in `memory_format` (channels_last, or
    channels_last_3d for a clip: the layout oneDNN writes), not a view, needing no gradient, and not the conv's own
    input; an inference tensor only inside inference mode (outside it PyTorch forbids in-place updates of inference
    tensors; inside it they are ordinary tensors)."""
    return (residual.dtype is torch.float32 and residual._base is None and not residual.requires_grad
            and (not residual.is_inference() or torch.is_inference_mode_enabled())
            and residual.is_contiguous(memory_format=memory_format) and residual.data_ptr() != x.data_ptr())


def conv_act(x, packed_weight, bias, call_args, residual):
    """act(conv(x) + bias [+ residual]) in one oneDNN call where oneDNN can fuse it, otherwise conv (+ add) fused
    and the activation in place. `call_args` comes from onednn_call_args. Returns a channels_last tensor
    (oneDNN's output layout)."""
    unary_tail, binary_tail, after_add = call_args
    if residual is None:
        return _pointwise(x, packed_weight, bias, *unary_tail)
    # The binary post-op reads the residual in the output's layout.
    y = _pointwise_binary(x, residual.contiguous(memory_format=torch.channels_last), packed_weight, bias,
                          *binary_tail)
    if after_add is None:
        return y
    return apply_activation(y, after_add[0], after_add[1], inplace=True)


# ---------------------------------------------------------------------------------------------- the eager CPU path
# How one FusedConv2d call is run, decided once per input signature (shape, strides, dtype, device, grad need):
# GENERIC hands the call back to FusedConv2d's general path (CUDA, half precision, unbatched, empty, non-zero
# padding modes, autograd: a gradient for x, residual, weight, scale or shift); FOLDED is F.conv2d with the
# folded weight and bias, then residual and activation in place (FOLDED_CL: the same for channels_last input,
# whose output is kept channels_last); ONEDNN is one oneDNN conv with the packed weight and the activation (and
# residual add) as post-ops. ONEDNN_COPY / ONEDNN_COPY_NCHW are for a strided view that is dense in neither layout
# (a channel slice: torch.split / chunk in split-input blocks such as SKNet's, Res2Net's, ShuffleNet's), which
# F.conv2d takes to its slow reference kernels (measured 1.1-6x slower than one copy + oneDNN, and with a bias
# up to 2x slower again): the view is copied to channels_last and runs the oneDNN route, and the output keeps the
# layout F.conv2d gives that signature (channels_last, or contiguous for ONEDNN_COPY_NCHW).
GENERIC, FOLDED, FOLDED_CL, ONEDNN = "generic", "folded", "folded_channels_last", "onednn"
ONEDNN_COPY, ONEDNN_COPY_NCHW = "onednn_after_copy", "onednn_after_copy_nchw_out"
# The same views when the conv is small (small_conv_macs): copied to channels_last, then FOLDED_CL's F.conv2d (a
# 14->14 3x3 conv on an 8x8 channel slice, 1 thread: copy + F.conv2d 29 us, copy + oneDNN 87, F.conv2d on the view
# 33; 56->56 at 2x2: 24 / 84 / 62 us).
FOLDED_COPY, FOLDED_COPY_NCHW = "folded_after_copy", "folded_after_copy_nchw_out"
# A conv to one output channel (a binary segmentation head) at a large output: one matrix product and shifted sums
# (fusedconv/cpu_taps.py), 1.7-4.3x faster than oneDNN or F.conv2d there; float32 and float64, dense input in
# either layout, the output in the input's layout.
TAPS = "taps"
# Signatures remembered per module; a model fed ever-changing shapes starts over rather than growing forever.
_MAX_ROUTES = 64
# Small convs on channels_last float32 input stay on F.conv2d (FOLDED_CL, with a channels_last copy of the folded
# weight): at batch 1, dense (groups 1), an input of at most 20480 elements (below
# which PyTorch's CPU conv takes its native im2col kernel rather than oneDNN), a weight of at most 2^20 elements
# (larger ones ran slower there than on oneDNN even on 1x1 and 2x2 maps) and at most `small_conv_macs` multiply-adds.
# `mkldnn::_convolution_pointwise` costs ~55-60 us per call however small the conv, more than such a conv computes:
# 2 threads, conv + ReLU, F.conv2d vs the fused op: 16->16 3x3 at 16x16 28 vs 56 us, 128->128 3x3 at 4x4 61 vs
# 72, 256->64 1x1 at 8x8 26 vs 58, 3->64 3x3 stride 2 at 32x32 52 vs 95, 8->16 1x1 at 16x16 18 vs 86; outside
# these bounds the fused op won (512->512 3x3 at 1x1 228 vs 61, 32->32 1x1 at 32x32 83 vs 59, depthwise convs).
# timm's test_resnet at 32x32 ran 1.3x slower converted than as written before this route. Where every conv of
# a model is this small, its layout boundary keeps NCHW (cpu_boundary.py: `routes_onednn`).
small_conv_macs = 4_000_000
_SMALL_INPUT, _SMALL_WEIGHT = 20480, 1 << 20


class EagerState:
    """Derived, never saved: the routes chosen per input signature, the folded weight and bias with the tensors
    (and a snapshot of their version counters and data pointers) they were computed from, the oneDNN-packed
    weight, whether oneDNN accepted this module (None: not tried yet; False: it raised once, stay on F.conv2d),
    and the call arguments built once."""

    __slots__ = ("routes", "last_call", "last_route", "weight_src", "scale_src", "shift_src", "snapshot", "weight",
                 "bias", "packed", "onednn_ok", "geometry", "conv_args", "act", "onednn_args", "unary_tail",
                 "inplace_tail", "bias_after", "weight_cl", "taps", "taps_ok", "upsampled")

    def __init__(self, module):
        self.routes = {}
        # The last call's signature + snapshot tuple (eager_forward) and its route; None: no call remembered.
        self.last_call = self.last_route = None
        self.weight_src = self.scale_src = self.shift_src = None
        # (versions..., data pointers...) of weight, scale, shift when folded; None: nothing cacheable (yet).
        self.snapshot = None
        self.weight = self.bias = self.packed = None
        self.weight_cl = None  # the folded weight in channels_last, for float32 FOLDED_CL calls (made on first use)
        self.taps = None  # cpu_taps.tap_weight of the folded weight, for TAPS calls (made on first use)
        self.taps_ok = False  # the geometry allows the TAPS route (set with every fold: the weight's shape counts)
        # Packed weights for calls on an upsampled input computed at the source resolution, per concatenation
        # layout (graph/flat_upsample_conv.py; made on first use, dropped with every fold).
        self.upsampled = None
        self.onednn_ok = None
        self.geometry = (list(module.padding), list(module.stride), list(module.dilation), module.groups)
        # F.conv2d's trailing arguments (stride, padding, dilation, groups); tuples parse a little faster than lists.
        self.conv_args = (tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)
        self.act = None  # (activation name, param); None for identity (nothing to apply)
        self.onednn_args = None
        self.unary_tail = None  # onednn_args[0], kept apart so the common call indexes nothing
        self.inplace_tail = None  # inplace_tail(); None: no in-place residual route for this activation
        # A dilated conv on F.conv2d adds its bias as a separate in-place op: PyTorch's reference dilated kernel
        # (small inputs at batch 1 go there) fills the bias in per channel, measured 1.5-3x slower than the conv
        # without it, which made converted SKNet slower than the original conv + BatchNorm.
        self.bias_after = any(d > 1 for d in module.dilation)


def _snapshot(weight, scale, shift) -> tuple:
    # The snapshot the fold was computed from, laid out as eager_forward's call tuple holds it (`call[4:10]`): an
    # in-place edit moves a version counter, `.data = t` (which keeps the counter) moves a data pointer.
    return (weight._version, scale._version, shift._version, weight.data_ptr(), scale.data_ptr(), shift.data_ptr())


def _refold(module, state: EagerState, weight, scale, shift) -> None:
    """Recompute the folded weight and bias from the module's current tensors (packing is redone lazily)."""
    state.weight_src, state.scale_src, state.shift_src = weight, scale, shift
    # Every signature is validated again: a new weight may have another shape, dtype or device.
    state.routes.clear()
    state.packed = state.weight_cl = state.taps = state.upsampled = None
    state.taps_ok = cpu_taps.eligible(weight.shape[0], weight.shape[2:], module.stride, module.groups,
                                      module.padding_mode)
    if state.onednn_ok:
        state.onednn_ok = None  # pack the new weight on the next oneDNN call (a refusal, False, is kept)
    act = module.act
    state.act = None if act.name == "identity" else (act.name, act.param)
    state.onednn_args = onednn_call_args(state.geometry, act.name, act.param) if available() else None
    state.unary_tail = state.onednn_args[0] if state.onednn_args is not None else None
    state.inplace_tail = (inplace_tail(state.geometry, act.name)
                          if state.onednn_args is not None and _pointwise_binary_inplace is not None else None)
    if weight.is_inference() or scale.is_inference() or shift.is_inference():
        # Inference tensors (a module built under torch.inference_mode) have no version counter, so an edit
        # could not be seen: never cache them; the general path refolds on every call.
        state.snapshot, state.weight, state.bias = None, None, None
        return
    state.weight, state.bias = module._compute_folded()
    state.snapshot = _snapshot(weight, scale, shift)


def _choose_route(module, x, residual, needs_grad: bool, taps_ok: bool = False) -> str:
    """Validate one input signature (raising the module's usual errors) and pick its route (`taps_ok`: the
    module's geometry allows TAPS)."""
    out_shape = check_inputs(x, module.weight, module.groups, residual, stride=module.stride,
                             padding=module.padding, dilation=module.dilation)
    if needs_grad or x.dim() != 4 or x.numel() == 0 or math.prod(out_shape) == 0:
        return GENERIC
    if module.padding_mode != "zeros" and module.padding != (0, 0):
        return GENERIC
    if x.dtype not in (torch.float32, torch.float64):
        return GENERIC
    if (taps_ok and cpu_taps.worth_it(out_shape)
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
        return TAPS
    if x.dtype == torch.float32 and _channels_last_strided(x) and available():
        # NCHW input stays on F.conv2d: oneDNN writes NHWC, and converting back after every layer was measured
        # slower than eager (resnet50 40.7 vs 34.8 ms). Models get channels_last once, at their boundary.
        return FOLDED_CL if _small_conv(module, x, out_shape) else ONEDNN
    return FOLDED_CL if _is_channels_last(x) else FOLDED


def _small_conv(module, x, out_shape) -> bool:
    """A conv small enough for F.conv2d on channels_last input (small_conv_macs)."""
    weight = module.weight
    return (module.groups == 1 and x.shape[0] == 1 and x.numel() <= _SMALL_INPUT and weight.numel() <= _SMALL_WEIGHT
            and math.prod(out_shape) * (weight.numel() // weight.shape[0]) <= small_conv_macs)


_ONEDNN_ROUTES = (ONEDNN, ONEDNN_COPY, ONEDNN_COPY_NCHW)


def routes_onednn(module) -> bool:
    """Whether some input signature of a FusedConv2d (a module with an eager CPU state) was routed to oneDNN."""
    state = module.__dict__.get("_cpu_state")
    return isinstance(state, EagerState) and any(r in _ONEDNN_ROUTES for r in state.routes.values())


def _is_channels_last(x) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _channels_last_strided(x) -> bool:
    """Channels_last, or dense in both layouts but not with NCHW's own strides (a (N, C, 1, 1) output of oneDNN):
    PyTorch's convs take the latter as channels_last too, and on their native kernel copy an NCHW weight to
    channels_last on every call (1.5 ms for a 512->512 3x3 weight, against 72 us for the oneDNN route)."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if not x.is_contiguous():
        return True
    _, c, h, w = x.shape
    return x.stride()[1:] != (h * w, w, 1)


def _view_route(module, state: EagerState, x, residual) -> str | None:
    """ONEDNN_COPY / ONEDNN_COPY_NCHW (FOLDED_COPY / FOLDED_COPY_NCHW for a small conv) for a float32 view dense in
    neither layout, by the layout F.conv2d answers it in (one F.conv2d call per such signature, on its first
    call); None to stay on F.conv2d."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return None
    y = _conv2d(x, state.weight, state.bias, *state.conv_args)
    small = _small_conv(module, x, y.shape)
    if y.is_contiguous(memory_format=torch.channels_last):
        return FOLDED_COPY if small else ONEDNN_COPY
    if y.is_contiguous() and residual is None:  # (a residual's layout would be oneDNN's to mix: not done)
        return FOLDED_COPY_NCHW if small else ONEDNN_COPY_NCHW
    return None


def _jit_tracing_state():
    return True if torch.jit.is_tracing() else None


# torch.jit tracing state, not None while tracing: the C function itself where this PyTorch has it (what
# torch.jit.is_tracing() reads, without its Python frames and scripting check).
_tracing_state = getattr(torch._C, "_get_tracing_state", None) or _jit_tracing_state
_USE_KERNEL = ops.use_kernel
_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_conv2d = torch.conv2d
# Dynamo (torch.compile, strict torch.export) reads this function as True while it traces; in eager it is a bare
# `return False`, a third of torch.compiler.is_compiling()'s cost. The other tracers never reach the tensor
# checks below with a plain tensor: non-strict torch.export and make_fx pass FakeTensors / FunctionalTensors,
# torch.fx passes Proxies (both fail `type(x) is _Tensor`), and torch.jit.trace sets the tracing state.
_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", None) or torch.compiler.is_compiling
# A torch.autocast region for CPU tensors active: the call goes to FusedConv2d's general path, which computes in the
# region's dtype as the original conv would (fusedconv/autocast.py); the routes here would compute in float32. A
# region for another device type leaves a CPU conv as it is. torch.is_autocast_enabled("cpu") is "AutocastCPU not
# excluded from this thread's dispatch keys"; asking that directly is one C call with no argument parsing, half the
# cost of torch._C._is_any_autocast_enabled (which asks every device type) on every call.
_AUTOCAST_CPU = torch._C.DispatchKey.AutocastCPU
_key_excluded = getattr(torch._C, "_dispatch_tls_is_dispatch_key_excluded", None)


def _cpu_autocast_query(key) -> bool:
    # Where a PyTorch lacks the dispatch-key query: the public one, with the same answer.
    return not torch.is_autocast_enabled("cpu")


_autocast_off = _key_excluded or _cpu_autocast_query


def _new_route(module, state: EagerState, key, x, residual) -> str:
    if state.weight is None:
        # The fold was refused (the weight's dtype cannot hold scale * weight): every signature takes the
        # general path, which applies the scale to the conv output. Routes are chosen again after an edit.
        route = GENERIC
    else:
        route = _choose_route(module, x, residual, key[3], state.taps_ok)
        if route is FOLDED and x.dtype == torch.float32 and state.onednn_ok is not False and available():
            route = _view_route(module, state, x, residual) or FOLDED
    if len(state.routes) >= _MAX_ROUTES:
        state.routes.clear()
    state.routes[key] = route
    return route


def _sources_changed(module, state, weight, scale, shift) -> bool:
    """Refold if weight / scale / shift are other tensors or were edited; False when nothing can be cached
    (inference tensors). A refused fold is cached too: its signatures all route to GENERIC (_new_route)."""
    if weight is not state.weight_src or scale is not state.scale_src or shift is not state.shift_src:
        _refold(module, state, weight, scale, shift)
    elif state.snapshot is None:
        return False  # inference tensors: nothing cached
    elif state.snapshot != _snapshot(weight, scale, shift):
        _refold(module, state, weight, scale, shift)
    return state.snapshot is not None


def _route(module, x, residual, weight, scale, shift, call):
    """Everything but the repeated call: build the state, refold after an edit, look the signature up (or choose
    its route), and remember this call as the last one. None when nothing can be cached (inference tensors)."""
    state = module._cpu_state
    if state is None:
        state = module._cpu_state = EagerState(module)
    if (weight is not state.weight_src or scale is not state.scale_src or shift is not state.shift_src
            or state.snapshot is None or state.snapshot != call[4:10]):
        if not _sources_changed(module, state, weight, scale, shift):
            state.last_call = None
            return None
    key = call[:4] + call[10:]  # the input's signature without the snapshot
    route = state.routes.get(key)
    if route is None:
        route = _new_route(module, state, key, x, residual)
    state.last_call, state.last_route = call, route
    return route


def eager_forward(module, x, residual, residual_private: bool = False):
    """FusedConv2d.forward for plain CPU tensors outside tracing, or None to take the general path (called by
    forward, and by FusedConv2d.__call__ itself for a lone `module(x)` that forward would hand straight here).

    Validation and routing run once per input signature (shape, strides, dtype, whether autograd is needed);
    each later call checks only the signature and that weight, scale and shift are the same tensors with the same
    version counters and data pointers (in-place edits under no_grad, load_state_dict's copy, `.to()`,
    reassignment and `.data = new_tensor` are seen; in-place edits through `.data` are not, as documented on
    FusedConv2d.refresh). The common call (same tensors, unchanged, the same signature as the module's last
    call) is one tuple compare and runs straight through; everything else goes through `_route` (another
    signature seen before: a dict lookup; a new one: validation; an edit: a refold).

    `residual_private=True` says no one but this call can read `residual` afterwards (convert passes it only where
    the block's graph and a check on every call prove it: fusedconv.graph.private_residual); the
    oneDNN route then writes the output in place into the residual and returns it."""
    # (Dynamo's check before any read of x: under torch.compile a read of x.is_cpu is a node in the graph.)
    if (type(x) is not _Tensor or _is_dynamo_compiling() or not x.is_cpu or _tracing_state() is not None
            or not _autocast_off(_AUTOCAST_CPU)):
        return None
    d = module.__dict__  # (read through __dict__: nn.Module's __getattr__ keeps `module.name` loads slow)
    buffers = d["_buffers"]
    weight, scale, shift = d["_parameters"].get("weight"), buffers.get("scale"), buffers.get("shift")
    if weight is None or scale is None or shift is None:
        # Not the module's own tensors: a parametrized weight (torch.nn.utils.parametrize computes it on every
        # access, from tensors kept elsewhere) or one replaced by a plain attribute. Nothing derived from it can
        # be checked for staleness here: the general path reads `module.weight` and folds on every call.
        return None
    if ops.use_kernel is not _USE_KERNEL and ops.use_kernel(x, weight):
        return None  # FusedConv2d's routing to the op was patched (as tests do); unpatched it is False on CPU
    # The whole call in one tuple: the input's signature (route key; the grad mode read first, since under
    # no_grad it settles the gradient question alone; in grad mode a gradient is needed when any of x, residual,
    # weight, scale, shift requires grad, and such a call takes the general path, which is differentiable in
    # all five — a user may set requires_grad on the module's tensors at any time) followed by the snapshot of
    # weight, scale and shift (version counters: in-place edits; data pointers: `.data = t`). Equal to the last
    # call's and the same three tensor objects: the last call's route holds, with no dict lookup and no second
    # compare.
    try:
        if residual is None:
            call = (x.shape, x.stride(), x.dtype,
                    _grad_enabled() and (x.requires_grad or weight.requires_grad or scale.requires_grad
                                         or shift.requires_grad), weight._version,
                    scale._version, shift._version, weight.data_ptr(), scale.data_ptr(), shift.data_ptr())
        else:
            if type(residual) is not _Tensor:
                return None
            call = (x.shape, x.stride(), x.dtype,
                    _grad_enabled() and (x.requires_grad or residual.requires_grad or weight.requires_grad
                                         or scale.requires_grad or shift.requires_grad),
                    weight._version, scale._version, shift._version, weight.data_ptr(), scale.data_ptr(),
                    shift.data_ptr(), residual.shape, residual.stride(), residual.dtype, residual.device)
    except RuntimeError:
        # Inference tensors (a module built under torch.inference_mode) have no version counter, so an edit
        # could not be seen: nothing is cached for them, the general path refolds on every call.
        return None
    state = d.get("_cpu_state")
    if (state is not None and call == state.last_call and weight is state.weight_src and scale is state.scale_src
            and shift is state.shift_src):
        route = state.last_route
    else:
        route = _route(module, x, residual, weight, scale, shift, call)
        if route is None:
            return None  # inference tensors: the general path
        state = module._cpu_state
    if route is ONEDNN:
        if enabled and state.onednn_ok and mkldnn_enabled():
            # The common call: packed weight and oneDNN already accepted this module. (A try block costs
            # nothing until it catches.)
            try:
                if residual is None:
                    return _pointwise(x, state.packed, state.bias, *state.unary_tail)
                if residual_private and state.inplace_tail is not None and _writable(x, residual):
                    return _pointwise_binary_inplace(residual, x, state.packed, state.bias, *state.inplace_tail)
                return conv_act(x, state.packed, state.bias, state.onednn_args, residual)
            except RuntimeError:
                # oneDNN refused a later signature: as on the first call, F.conv2d from now on.
                state.onednn_ok = False
                state.packed = None
        elif enabled and state.onednn_ok is None and mkldnn_enabled():
            y = _first_onednn_call(state, x, residual)
            if y is not None:
                return y
    elif route is FOLDED and residual is None and not state.bias_after:
        # folded_call's common case (NCHW, no residual) without its frame and layout branches.
        y = _conv2d(x, state.weight, state.bias, *state.conv_args)
        act = state.act
        return y if act is None else apply_activation(y, act[0], act[1], inplace=True)
    elif route is GENERIC:
        return None
    elif route is TAPS:
        return taps_call(state, x, residual)
    elif route is ONEDNN_COPY or route is ONEDNN_COPY_NCHW:
        y = _copied_onednn_call(state, x, residual) if enabled and mkldnn_enabled() else None
        if y is not None:
            return y if route is ONEDNN_COPY else y.contiguous()
        route = FOLDED_CL if route is ONEDNN_COPY else FOLDED  # oneDNN off or refused: F.conv2d, same layout
    elif route is FOLDED_COPY or route is FOLDED_COPY_NCHW:
        return copied_folded_call(state, route, x, residual)
    return folded_call(state, route, x, residual)


def folded_call(state: EagerState, route: str, x, residual):
    """The F.conv2d routes (FOLDED, FOLDED_CL, and ONEDNN* when oneDNN is off or refused): the conv with the folded
    weight and bias, then the residual and the activation in place; output in the input's layout."""
    weight = state.weight
    if route is FOLDED_CL and x.dtype == torch.float32:
        # For channels_last input aten's convs (its native kernel and its oneDNN call) read a channels_last weight;
        # an NCHW one is copied or reordered on every call.
        weight = state.weight_cl
        if weight is None:
            weight = state.weight_cl = state.weight.contiguous(memory_format=torch.channels_last)
    if state.bias_after:
        y = _conv2d(x, weight, None, *state.conv_args).add_(state.bias.view(1, -1, 1, 1))
    else:
        y = _conv2d(x, weight, state.bias, *state.conv_args)
    if residual is not None:
        y = y.add_(residual)
    if state.act is not None:
        y = apply_activation(y, state.act[0], state.act[1], inplace=True)
    if route is not FOLDED and not y.is_contiguous(memory_format=torch.channels_last):
        # F.conv2d's CPU kernels do not always keep channels_last; the output follows the input's layout.
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def taps_call(state: EagerState, x, residual):
    """TAPS: the conv as cpu_taps.conv_taps with the folded weight and bias, then the residual and the activation
    in place. The route takes one output channel only, so the contiguous output is in either input's layout."""
    taps = state.taps
    if taps is None:
        taps = state.taps = cpu_taps.tap_weight(state.weight)
    padding, _, dilation, _ = state.geometry
    weight = state.weight
    h, w = x.shape[2], x.shape[3]
    out_hw = (h + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1),
              w + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1))
    y = cpu_taps.conv_taps(x, taps, state.bias, weight.shape[2:], padding, dilation, out_hw)
    if residual is not None:
        y = y.add_(residual)
    if state.act is not None:
        y = apply_activation(y, state.act[0], state.act[1], inplace=True)
    return y


def copied_folded_call(state: EagerState, route: str, x, residual):
    """FOLDED_COPY / FOLDED_COPY_NCHW: FOLDED_CL on a channels_last copy of the view `x`; the output in the layout
    F.conv2d answers the view in (channels_last, or contiguous for FOLDED_COPY_NCHW)."""
    y = folded_call(state, FOLDED_CL, x.contiguous(memory_format=torch.channels_last), residual)
    return y if route is FOLDED_COPY else y.contiguous()


def _copied_onednn_call(state: EagerState, x, residual):
    """The oneDNN route on a channels_last copy of `x` (ONEDNN_COPY*): its channels_last output, or None when
    oneDNN refused this module (then, as on any route, F.conv2d from now on)."""
    if state.onednn_ok is False:
        return None
    x = x.contiguous(memory_format=torch.channels_last)
    if state.onednn_ok is None:
        return _first_onednn_call(state, x, residual)
    try:
        if residual is None:
            return _pointwise(x, state.packed, state.bias, *state.unary_tail)
        return conv_act(x, state.packed, state.bias, state.onednn_args, residual)
    except RuntimeError:
        state.onednn_ok = False
        state.packed = None
        return None


def _first_onednn_call(state: EagerState, x, residual):
    """Pack the weight and try oneDNN once for this module: its output, or None (remembered) when it raises."""
    try:
        if state.packed is None:
            padding, stride, dilation, groups = state.geometry
            state.packed = pack_weight(state.weight, padding, stride, dilation, groups, x.shape)
        if residual is None:
            y = _pointwise(x, state.packed, state.bias, *state.unary_tail)
        else:
            y = conv_act(x, state.packed, state.bias, state.onednn_args, residual)
    except RuntimeError:
        # oneDNN refused this module (an unusual geometry or build): remember, and use F.conv2d from now on.
        state.onednn_ok = False
        state.packed = None
        return None
    state.onednn_ok = True
    return y
