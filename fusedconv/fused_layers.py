"""Fused inference layers beyond Conv2d: the shared base FusedAffineLayer and FusedConv1d / FusedConv2dPostBN /
FusedConv3d (FusedConvTranspose1d/2d/3d are in fused_transpose.py, FusedLinear in fused_linear.py), all computing

    y = act(layer(x) * scale + shift [+ residual]) [* post_scale + post_shift]

where `scale`/`shift` are the BatchNorm after the layer (with the layer's bias) and the optional post-affine is a
BatchNorm after the activation (ConvMixer's Conv -> GELU -> BN).

Conventions shared with FusedConv2d: the state_dict holds `weight` in the layer's own layout and dtype, `scale` /
`shift` (and `post_scale` / `post_shift` when present) in float32 (float64 for float64 modules), kept at that
precision by `.half()` / `.to(bf16)` because the epilogue applies them to an fp32 accumulator; an unfused
layer's checkpoint is refused by name; modules are born in eval mode; `from_modules(layer, bn, act, post_bn=None)`
builds them without touching the sources.

Where they run: FusedConv3d on CUDA calls `torch.ops.fusedconv.conv3d_bn_act` (the Triton 3-D kernel with the
whole epilogue); FusedConv1d on CUDA runs the 2-D kernel op with H = 1 (post-affine then one extra elementwise
op). Everything else — CPU, float64, transposed convs on any device — is the standard op with the scale folded
into a cached copy of the weight (fp32 / fp64) or applied to the output in fp32 (fp16 / bf16), then the epilogue;
on CPU a float32 FusedConv3d runs that folded conv on oneDNN where PyTorch would take its im2col reference kernel
and oneDNN is faster (fusedconv/cpu_conv3d.py).

Autograd (as FusedConv2d): the weight is created with requires_grad=False, but whenever grad mode is on and the
input, residual, weight, scale, shift, post_scale or post_shift (FusedLinear: also its bias) requires grad, the
call skips the Triton ops (they have no backward) and the cached fold (built from detached tensors) and folds
the scale in the graph, so every tensor that requires grad gets its exact gradient. Under no_grad /
inference_mode, or when nothing requires grad, nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from fusedconv.fx_leaf import leaf_call
from fusedconv import autocast, cpu_conv3d, fold, layout, ops, ops_nd, tied
from fusedconv.activations import ActivationSpec, apply_activation, as_spec
from fusedconv.scripting import refuse_script
from fusedconv.training_mode import warn_if_training
# What torch.compiler.is_compiling() and torch.jit.is_tracing() read, without their Python frames (fusedconv/cpu.py).
from fusedconv.cpu import _is_dynamo_compiling, _tracing_state

# The ops' routing functions as imported: a test that patches them routes CPU tensors through the ops.
_USE_KERNEL, _USE_KERNEL_3D = ops.use_kernel, ops_nd.use_kernel_3d
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_UNFUSED_KEYS = ("bias", "running_mean", "running_var", "num_batches_tracked")


def epilogue_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """scale/shift dtype: float64 for float64 modules, float32 for every other dtype."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _tracing() -> bool:
    """torch.compile / torch.export (Dynamo) or torch.jit tracing: traced graphs fold in the graph and keep the
    out-of-place epilogue."""
    return _is_dynamo_compiling() or _tracing_state() is not None


def int_tuple(name: str, value, n: int, minimum: int) -> tuple[int, ...]:
    """`value` (an int or n ints) as an n-tuple, with a clear error naming the argument."""
    vals = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else tuple(value) \
        if isinstance(value, (tuple, list)) else None
    if vals is None or len(vals) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"{name}: expected an int or {n} ints, got {value!r}")
    if any(v < minimum for v in vals):
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return vals


def check_channel_vector(name: str, t, c: int) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (c,):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected shape ({c},) (one value per output channel), got {got}")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite floating-point values")


class FusedAffineLayer(nn.Module):
    """Base of the fused layers: weight + per-channel scale/shift + activation + optional post-affine.

    Subclasses set `_LAYER` (the name used in messages), implement `_layer(x, weight, bias)` (the standard op)
    and `_scale_weight(weight, scale)` (the scale folded along the weight's output-channel axis).
    """

    _LAYER = "layer"
    # torch.jit.script cannot compile these forwards: it raises a clear error instead (fusedconv/scripting.py).
    __prepare_scriptable__ = refuse_script
    _EXTRA_STATE = ("scale", "shift", "post_scale", "post_shift")
    # Set by convert on a module whose epilogue took over a residual add (as on FusedConv2d): a call without
    # `residual` is then an error instead of silently skipping the add.
    residual_required = False

    def _init_affine(self, weight, scale, shift, activation, post_scale, post_shift, cout: int) -> None:
        if not weight.is_floating_point():
            raise TypeError(f"weight: expected a floating-point tensor, got dtype {weight.dtype}")
        epi = epilogue_dtype(weight.dtype)
        dev = weight.device
        scale = torch.ones(cout, dtype=epi, device=dev) if scale is None else scale
        shift = torch.zeros(cout, dtype=epi, device=dev) if shift is None else shift
        if (post_scale is None) != (post_shift is None):
            raise ValueError("post_scale/post_shift: expected both or neither, got only one")
        named = [("scale", scale), ("shift", shift)]
        if post_scale is not None:
            named += [("post_scale", post_scale), ("post_shift", post_shift)]
        for name, t in named:
            check_channel_vector(name, t, cout)
        self.act = as_spec(activation)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        tied.copied(self.weight, weight)  # (convert gives it back the source where both stay: fusedconv/tied.py)
        for name in self._EXTRA_STATE:
            t = dict(named).get(name)
            self.register_buffer(name, None if t is None else t.detach().to(device=dev, dtype=epi).clone())
        self._fold_cache = None
        self.train(False)

    def train(self, mode: bool = True):
        warn_if_training(mode)  # fusedconv/training_mode.py: eval semantics in training mode, said, not silent
        return super().train(mode)

    # ------------------------------------------------------------------ dtype / state handling
    def _apply(self, fn, recurse=True):
        saved = {n: getattr(self, n) for n in self._EXTRA_STATE}
        super()._apply(fn, recurse)
        epi = epilogue_dtype(self.weight.dtype)
        for n, t in saved.items():  # follow the device, never a downcast of the epilogue precision
            if t is not None:
                setattr(self, n, t.to(device=self.weight.device, dtype=epi))
        self._fold_cache = None
        layout.converted()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        unfused = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in _UNFUSED_KEYS
                   and not (k[len(prefix):] == "bias" and getattr(self, "bias", None) is not None)]
        if prefix + "weight" in state_dict and prefix + "scale" not in state_dict and self.scale is not None:
            unfused.insert(0, prefix + "weight (without scale/shift)")
        if unfused:
            error_msgs.append(
                f"state_dict: expected a {type(self).__name__} state ({prefix}weight, {prefix}scale, {prefix}shift), "
                f"got keys of an unfused {self._LAYER}/BatchNorm layer ({', '.join(unfused[:4])}); load the "
                "checkpoint into the unfused model first and call fusedconv.convert() on it")
        for name in self._EXTRA_STATE:
            t = state_dict.get(prefix + name)
            own = getattr(self, name, None)
            if isinstance(t, torch.Tensor) and own is not None:
                if not bool(torch.isfinite(t).all()):
                    error_msgs.append(f"{prefix}{name}: expected finite values, got "
                                      f"{int((~torch.isfinite(t)).sum())} non-finite")
                state_dict[prefix + name] = t.to(own.dtype)
            elif isinstance(t, torch.Tensor) and own is None:
                error_msgs.append(f"{prefix}{name}: this {type(self).__name__} has no post-activation BatchNorm, "
                                  "but the state_dict has one; build the module with post_bn / post_scale")
                state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._fold_cache = None

    def refresh(self) -> None:
        """Drop the cached folded weight (needed only after editing `.data` of weight / scale / shift in place)."""
        self._fold_cache = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fold_cache"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if isinstance(self.__dict__.get("act"), str):
            self.act = ActivationSpec(self.__dict__["act"])
        self.__dict__.setdefault("_fold_cache", None)

    # ------------------------------------------------------------------ the computation
    def _layer(self, x, weight, bias, *args):
        raise NotImplementedError

    def _scale_weight(self, weight, scale):
        raise NotImplementedError

    def _channel_view(self, y: torch.Tensor) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector over `y` (channels on dim 1, or dim 0 when unbatched)."""
        return (1, -1) + (1,) * (y.dim() - 2)

    def _fold_tensors(self) -> tuple:
        """The tensors the fold reads (FusedLinear adds its bias); a gradient for any of them needs the fold in
        the graph (`_fold_in_graph`)."""
        return self.weight, self.scale, self.shift

    def _fold_in_graph(self) -> bool:
        """Fold in the traced / autograd graph rather than from the cache: while tracing (a traced graph must not
        mutate the module) and when autograd must reach the weight, scale or shift (the cache is detached)."""
        return _tracing() or (torch.is_grad_enabled() and ops.grad_needed(*self._fold_tensors()))

    def _affine_tensors(self) -> tuple:
        """(weight, scale, shift), read from the module's dicts (nn.Module.__getattr__ costs a frame per read)."""
        weight, scale, shift = self._parameters.get("weight"), self._buffers.get("scale"), self._buffers.get("shift")
        if weight is None or scale is None or shift is None:  # re-registered elsewhere (e.g. as a Parameter)
            weight, scale, shift = self.weight, self.scale, self.shift
        return weight, scale, shift

    def _folded(self):
        """(weight * scale, shift) in the weight's dtype, from detached tensors (no gradient reaches the sources
        through it: calls needing one fold in the graph), cached per weight / scale / shift (the same tensors with
        the same data pointers, version counters, dtypes and devices) and per inference mode (a fold made inside
        inference_mode is an inference tensor autograd cannot save)."""
        tensors = self._affine_tensors()
        w, c, h = tensors
        try:
            key = (w.data_ptr(), c.data_ptr(), h.data_ptr(), w._version, c._version, h._version, w.dtype, c.dtype,
                   h.dtype, w.device, c.device, h.device, torch.is_inference_mode_enabled())
        except RuntimeError:
            key = None  # inference tensors have no version counter: an edit could not be seen, nothing is cached
        cache = self._fold_cache
        if key is None or cache is None or cache[0] != key or cache[1][0] is not w or cache[1][1] is not c \
                or cache[1][2] is not h:
            folded = self._scale_weight(w.detach(), c.detach().to(w.dtype))
            cache = (key, tensors, folded, h.detach().to(w.dtype))
            if key is not None:
                self._fold_cache = cache
        return cache[2], cache[3]

    def _epilogue_rest(self, y, residual):
        """[+ residual], activation, [post-affine] on a tensor already holding layer(x) * scale + shift.

        `y` is always a tensor the caller has just made (a layer's or an arithmetic op's output), so outside
        tracing and autograd every step runs in place on it: the original's BN and activation cost one pass each
        and so do these, without a new tensor per step (measured on CPU: an out-of-place post-affine made
        convmixer_768_32 slower converted than as written)."""
        inplace = not y.requires_grad and not _tracing()
        if residual is not None:
            y = y.add_(residual.to(y.dtype)) if inplace else y + residual.to(y.dtype)
        # An in-place leaky_relu with a negative slope has no backward: in place only without autograd.
        y = apply_activation(y, self.act.name, self.act.param, inplace=inplace)
        if self.post_scale is not None:
            view = self._channel_view(y)
            post_scale, post_shift = self.post_scale.to(y.dtype).view(view), self.post_shift.to(y.dtype).view(view)
            y = y.mul_(post_scale).add_(post_shift) if inplace else y * post_scale + post_shift
        return y

    def _fallback(self, x, residual, *layer_args):
        """The standard op with the BN folded (fp32 / fp64), or applied to the output in fp32 (fp16 / bf16)."""
        dtype = self._affine_tensors()[0].dtype
        acc = epilogue_dtype(dtype)
        if dtype == acc:
            if self._fold_in_graph():
                # Traced graphs must not mutate the module: the fold is part of the graph (exported as a constant);
                # a gradient for weight / scale / shift flows through it.
                wf, bf = self._scale_weight(self.weight, self.scale), self.shift
                return self._epilogue_rest(self._layer(x, wf, bf, *layer_args), residual)
            wf, bf = self._folded()
            return self._epilogue_rest(self._folded_layer(x, wf, bf, *layer_args), residual)
        return self._scaled(x, self.weight, residual, acc, *layer_args)

    def _folded_layer(self, x, weight, bias, *layer_args):
        """The layer with the cached fold (no tracing, no gradient for the module's tensors): `_layer`, unless a
        subclass has a faster kernel for it (FusedConv3d on CPU: fusedconv/cpu_conv3d.py)."""
        return self._layer(x, weight, bias, *layer_args)

    def _scaled(self, x, weight, residual, acc: torch.dtype, *layer_args):
        """The layer with `weight` (in x's dtype), then scale / shift, the residual, the activation (and the
        post-affine) in `acc` on its output, returned in x's dtype."""
        y = self._layer(x, weight, None, *layer_args)
        view = self._channel_view(y)
        y = y.to(acc) * self.scale.to(acc).view(view) + self.shift.to(acc).view(view)
        y = self._epilogue_rest(y, None if residual is None else residual.to(acc))
        return y.to(x.dtype)

    def _autocast_layer(self, x, residual, dtype: torch.dtype, *layer_args):
        """Inside a torch.autocast region (fusedconv/autocast.py): the layer in the region's `dtype`, as the
        original layer ran, the rest in fp32 on its output (`_scaled`), returned in `dtype`. Nothing cached: the
        weight is cast in the graph, so autograd reaches it."""
        weight = self._affine_tensors()[0]
        return self._scaled(x.to(dtype), weight.to(dtype), residual, torch.float32, *layer_args)

    def _check_x(self, x, residual, nd: int, cin: int) -> torch.dtype | None:
        """Raise a clear error for an input (and residual) this layer cannot take; return the dtype of the
        autocast region the call runs in (None outside one), where input, residual and weight may differ in
        dtype as the original layer allows them to."""
        if residual is None and self.residual_required:
            raise TypeError(f"{type(self).__name__}.forward: missing argument 'residual' (this module was built with "
                            "a residual add in its epilogue; expected a tensor of the output's shape)")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (nd + 1, nd + 2):
            raise ValueError(f"input: expected a {nd + 2}-d (N, C, ...) or unbatched {nd + 1}-d tensor for "
                             f"{type(self).__name__}, got shape {tuple(x.shape)}")
        if nd == 1 and x.dim() == 2:
            # BatchNorm1d reads a 2-d tensor as (N, C): on the unbatched (C, L) output of the original Conv1d it
            # normalises along L (and works whenever L happens to equal its channel count), while the folded
            # scale is per conv channel. Refuse rather than compute a different function.
            raise ValueError(f"input: {type(self).__name__} folds a BatchNorm1d, which on an unbatched (C, L) conv "
                             f"output normalises dim 1 (L) instead of the channels; expected a batched 3-d "
                             f"(N, C, L) tensor, got shape {tuple(x.shape)}")
        c = x.shape[x.dim() - nd - 1]
        if c != cin:
            raise ValueError(f"input: expected {cin} channels, got {c} (shape {tuple(x.shape)})")
        weight = self._affine_tensors()[0]
        cast = autocast.cast_dtype(x, weight)
        if x.dtype != weight.dtype and cast is None:
            raise TypeError(f"input: expected dtype {weight.dtype} to match the module's weight, got {x.dtype}")
        if x.device != weight.device:
            raise RuntimeError(f"input: expected device {weight.device} to match the module's weight, got {x.device}")
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or residual.dim() != x.dim():
                raise ValueError(f"residual: expected a {x.dim()}-d tensor like the input, got "
                                 f"{tuple(residual.shape) if isinstance(residual, torch.Tensor) else residual!r}")
            if (residual.dtype != x.dtype and cast is None) or residual.device != x.device:
                raise TypeError(f"residual: expected dtype {x.dtype} on {x.device} like the input, got "
                                f"{residual.dtype} on {residual.device}")
        return cast


class FusedConvNd(FusedAffineLayer):
    """act(convNd(x) * scale + shift [+ residual]) [* post_scale + post_shift], N = `_ND` (1, 2 or 3)."""

    _ND = 0
    _CONV = None  # nn.Conv1d / nn.Conv3d

    def __init__(self, weight: torch.Tensor, scale=None, shift=None, *, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", activation=None, post_scale=None, post_shift=None):
        super().__init__()
        nd = self._ND
        if not isinstance(weight, torch.Tensor) or weight.dim() != nd + 2:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight: expected a {nd + 2}-d tensor (Cout, Cin/groups, {', '.join('k' * nd)}), "
                             f"got {got}")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or weight.shape[0] % groups:
            raise ValueError(f"groups: expected a positive int dividing out_channels={weight.shape[0]}, got {groups!r}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {_PADDING_MODES}, got {padding_mode!r}")
        if isinstance(padding, str):
            raise ValueError(f"padding: expected an int or {nd} ints (resolve 'same'/'valid' first), got {padding!r}")
        self.stride = int_tuple("stride", stride, nd, 1)
        self.padding = int_tuple("padding", padding, nd, 0)
        self.dilation = int_tuple("dilation", dilation, nd, 1)
        self.groups, self.padding_mode = groups, padding_mode
        self.in_channels, self.out_channels = weight.shape[1] * groups, weight.shape[0]
        self.kernel_size = tuple(weight.shape[2:])
        if nd == 3:
            from fusedconv.kernels.conv3d import pack_weight_3d

            weight = pack_weight_3d(weight.detach())  # same values and shape, kernel-friendly strides
        self._init_affine(weight, scale, shift, activation, post_scale, post_shift, weight.shape[0])

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.Module | None = None, act=None, post_bn: nn.Module | None = None):
        """Fuse `post_bn(act(bn(conv(x))))`; `bn`, `act` and `post_bn` may each be None."""
        # `computes_as`: a subclass whose forward only refuses inputs (bn_folded_layers.BNFoldedConv1d) and
        # that computes exactly as the base on every input it accepts; the fused module refuses the same ones.
        if type(conv) is not cls._CONV and getattr(type(conv), "computes_as", None) is not cls._CONV and not (
                isinstance(conv, cls._CONV) and type(conv).forward is cls._CONV.forward):
            raise TypeError(f"conv: expected nn.{cls._CONV.__name__} (or a subclass without its own forward), "
                            f"got {type(conv).__name__}")
        scale, shift = fold.layer_bn_scale_shift(conv, bn, dtype=torch.float64)
        post = (None, None) if post_bn is None else fold.post_affine(post_bn, torch.float64)
        if post_bn is not None and post[0].numel() != conv.out_channels:
            raise ValueError(f"post_bn: expected {conv.out_channels} features, got {post[0].numel()}")
        padding = conv.padding
        if isinstance(padding, str):
            padding = _resolve_string_padding(conv)
        return cls(conv.weight.detach(), scale, shift, stride=conv.stride, padding=padding, dilation=conv.dilation,
                   groups=conv.groups, padding_mode=conv.padding_mode, activation=act, post_scale=post[0],
                   post_shift=post[1])

    def _scale_weight(self, weight, scale):
        folded = weight * scale.view((-1,) + (1,) * (self._ND + 1))
        # A 2-d layer's fold keeps a channels_last weight's layout, as FusedConv2d's does (fusedconv/layout.py).
        return layout.dense_copy(folded, weight, weight.shape[0]) if self._ND == 2 else folded.contiguous()

    def _layer(self, x, weight, bias, padding):
        fn = (F.conv1d, F.conv2d, F.conv3d)[self._ND - 1]
        return fn(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def _pad_input(self, x):
        if self.padding_mode == "zeros" or not any(self.padding):
            return x, self.padding
        pads = [p for p in reversed(self.padding) for _ in range(2)]
        return F.pad(x, pads, mode=self.padding_mode), (0,) * self._ND

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_private: bool = False) -> torch.Tensor:
        """act(conv(x) * scale + shift [+ residual]) [* post_scale + post_shift]; batched or unbatched input.
        `residual_private=True` (set by convert's flat forward only) allows the CPU path to write the output into
        `residual` itself (FusedConv3d's channels_last_3d route): pass it only when nothing else can read that
        tensor afterwards."""
        if isinstance(x, fx.Proxy):  # torch.fx symbolic tracing: record one leaf call (fusedconv/fx_leaf.py)
            return leaf_call(self, (x, residual), {"residual_private": residual_private} if residual_private else {})
        cast = self._check_x(x, residual, self._ND, self.in_channels)
        if x.dim() == self._ND + 1:
            y = self.forward(x.unsqueeze(0), None if residual is None else residual.unsqueeze(0))
            return y.squeeze(0)
        x, pad = self._pad_input(x)
        if cast is not None:
            return self._autocast_layer(x, residual, cast, pad)
        if x.numel() > 0 and torch.is_grad_enabled() and ops.grad_needed(
                x, residual, self.weight, self.scale, self.shift, self.post_scale, self.post_shift):
            return self._fallback(x, residual, pad)  # the ops have no backward: the differentiable path
        if not x.is_cuda and ops.use_kernel is _USE_KERNEL and ops_nd.use_kernel_3d is _USE_KERNEL_3D:
            # The Triton ops run on CUDA only (unless a test routes them).
            return self._cpu_layer(x, residual, pad, residual_private)
        if x.numel() > 0 and self._ND == 3 and ops_nd.use_kernel_3d(x, self.weight):
            return ops_nd.conv3d_bn_act(x, self.weight, self.scale, self.shift, residual, self.post_scale,
                                        self.post_shift, self.stride, pad, self.dilation, self.groups,
                                        self.act.name, self.act.param)
        if x.numel() > 0 and self._ND in (1, 2) and ops.use_kernel(x, self.weight):
            # The 2-D kernel (Conv1d as H = 1); a post-affine is one more elementwise op after it.
            as2d = (lambda t: t.unsqueeze(2)) if self._ND == 1 else (lambda t: t)
            geo = [((1, v[0]) if self._ND == 1 else v) for v in (self.stride, pad, self.dilation)]
            geo[1] = (0, pad[0]) if self._ND == 1 else pad
            y = ops.conv_bn_act(as2d(x), as2d(self.weight), self.scale, self.shift,
                                None if residual is None else as2d(residual), *geo, self.groups, self.act.name,
                                self.act.param)
            y = y.squeeze(2) if self._ND == 1 else y
            if self.post_scale is not None:
                view = self._channel_view(y)
                y = (y.float() * self.post_scale.view(view) + self.post_shift.view(view)).to(x.dtype)
            return y
        return self._fallback(x, residual, pad)

    def _cpu_layer(self, x, residual, padding, residual_private: bool):
        """The layer on CPU, where no Triton op runs: the standard op with the cached fold (`_fallback`)."""
        return self._fallback(x, residual, padding)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", act={self.act}" + (", post_bn" if self.post_scale is not None else "")


class FusedConv1d(FusedConvNd):
    """Conv1d + BatchNorm1d + activation (+ BatchNorm1d after it); the CUDA path is the 2-D kernel with H = 1."""

    _ND, _CONV, _LAYER = 1, nn.Conv1d, "Conv1d"


class FusedConv2dPostBN(FusedConvNd):
    """Conv2d [+ BatchNorm2d] + activation + BatchNorm2d after the activation (ConvMixer's Conv -> GELU -> BN).

    FusedConv2d has no post-affine; this member of the shared N-d family covers the chains that need one. On
    CUDA it runs the 2-D kernel op and then the post-affine as one elementwise op.
    """

    _ND, _CONV, _LAYER = 2, nn.Conv2d, "Conv2d"


class FusedConv3d(FusedConvNd):
    """Conv3d + BatchNorm3d + activation (+ BatchNorm3d after it); the CUDA path is the Triton 3-D kernel."""

    _ND, _CONV, _LAYER = 3, nn.Conv3d, "Conv3d"

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_onednn_3d", None)  # the packed weight of the fold it drops
        return super()._apply(fn, recurse)

    def refresh(self) -> None:
        self.__dict__.pop("_onednn_3d", None)
        super().refresh()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_onednn_3d", None)  # an opaque oneDNN tensor: packed again on the next call
        return state

    def _cpu_layer(self, x, residual, padding, residual_private: bool):
        # Channels_last_3d inside a call the layout boundary switched: one oneDNN conv with post-ops (cpu_conv3d).
        # Never while tracing: traced graphs keep the standard op.
        y = None if _tracing() else cpu_conv3d.fused_call(self, x, residual, padding, residual_private)
        return self._fallback(x, residual, padding) if y is None else y

    def _folded_layer(self, x, weight, bias, padding):
        # On CPU, oneDNN where PyTorch would take its im2col reference kernel and oneDNN pays (cpu_conv3d.py).
        y = cpu_conv3d.conv3d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        return self._layer(x, weight, bias, padding) if y is None else y


def _resolve_string_padding(conv: nn.Module) -> tuple[int, ...]:
    """padding='valid'/'same' as explicit symmetric padding (refusing 'same' that needs asymmetry)."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(f"conv padding: 'same' with kernel {conv.kernel_size} and dilation {conv.dilation} "
                             "needs asymmetric padding, which the fused layers do not support")
        pads.append(total // 2)
    return tuple(pads)
