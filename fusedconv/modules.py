"""FusedConv2d: one inference module for act(conv(x) * scale + shift [+ residual]).

On CUDA (fp16 / bf16 / fp32 and a geometry the kernels cover) forward calls the `fusedconv::conv_bn_act` op,
which runs one Triton kernel with BN scale/shift, the residual add and the activation in its epilogue.
Everywhere else it runs the standard-conv fallback: BN's scale is folded into a cached copy of the weight
(computed in float32 from the stored weight, checked to be exactly representable enough in the weight's dtype),
so a single `F.conv2d` with bias does conv + BN and the activation runs in place — no separate BN pass.
When the scale does not fit the weight's dtype (fp16 overflow or subnormals) it is applied to the conv output
in fp32 instead. The cache is keyed on the tensors' identities and version counters (edits through `.data`
need `refresh()`); under torch.compile / torch.export the fold is traced instead, so nothing is mutated.

Autograd: an inference module that still gives exact gradients. Its weight is created with requires_grad=False,
but whenever grad mode is on and x, the residual, the weight, scale or shift requires grad (a user fine-tuning
or taking a saliency map), forward computes through differentiable standard ops: the Triton op (which has no
backward) is routed around, the cached fold (computed from detached tensors) is bypassed and the scale is folded
in the graph, `conv2d(x, weight * scale) + shift`, so every tensor that requires grad gets its exact gradient
(the weight's through the chain rule of weight * scale); nothing is written in place into an input then (the
CPU path's in-place residual route needs no gradient anywhere, fusedconv/cpu.py). Under no_grad /
inference_mode, or when nothing requires grad, nothing changes.

Inputs: (N, C, H, W) or unbatched (C, H, W) like nn.Conv2d; empty batches and empty spatial outputs give empty
outputs of the right shape; any strides; the output's memory format is nn.Conv2d's (channels_last when the input
or the weight is, fusedconv/layout.py). A module built from a conv that pads in forward (TF "SAME",
fusedconv/same_padding.py) zero-pads the input first (`pre_pad`).

State (the state_dict, stable names): `weight` (Cout, Cin/groups, KH, KW) in the conv's dtype, `scale` and
`shift` (Cout,) in float32 (float64 when the module is float64). The scale/shift stay float32 when the module is
cast with `.half()` / `.to(torch.bfloat16)`: they are applied to the fp32 accumulator, and casting them would
lose exactly the precision the epilogue exists to keep.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module
from torch.nn.modules.utils import _pair

from fusedconv import autocast, cpu, fold, layout, ops, same_padding, tied
from fusedconv.scripting import refuse_script
from fusedconv.training_mode import warn_if_training
from fusedconv.fx_leaf import leaf_call
from fusedconv.validation import BroadcastResidual, check_inputs
from fusedconv.activations import ActivationSpec, apply_activation, as_spec

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Keys of a Conv2d / BatchNorm state that never occur in a FusedConv2d state (used to explain a wrong checkpoint).
_UNFUSED_KEYS = ("bias", "running_mean", "running_var", "num_batches_tracked")
# The geometry a FusedConv2d is built with: validated and normalized together at construction (a symmetric pre-pad
# joins `padding`, TF "SAME" at stride 1 becomes a fixed pad) and baked into what its routes derive (the CPU
# route's oneDNN arguments and packed weight, the CUDA packing by groups). Assigning one afterwards raises: nn.Conv2d
# would simply convolve with the new value, and a FusedConv2d that kept its old derived state would silently not.
_GEOMETRY = frozenset({"stride", "padding", "dilation", "groups", "padding_mode", "pre_pad"})
# Read from the weight's shape at construction.
_FROM_WEIGHT = frozenset({"in_channels", "out_channels", "kernel_size"})


# nn.Module's call machinery as torch defines it, read at import; tools that patch it while they run (torch.fx's
# tracer patches nn.Module.__call__) are seen by comparing against these on every call.
_MODULE_CALL = nn.Module.__call__
_MODULE_CALL_IMPL = nn.Module._call_impl
_tracing_state = torch._C._get_tracing_state


def _epilogue_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """scale/shift dtype: float64 for float64 modules, float32 for every other dtype."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is channels_last and not also plain contiguous (the rule F.conv2d follows)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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
    `residual_required=True` (set by convert on a module whose epilogue took over a residual add) makes a call
    without `residual` an error instead of silently skipping the add.
    """

    residual_required = False
    # False on a lone conv convert made a FusedConv2d only for its CPU route (graph/legality.lone_conv_gains): on
    # CUDA it runs the library conv (cuDNN), as the model did, not the Triton kernel (unmeasured for such layers).
    cuda_kernel = True
    # The zero pad a padding conv (TF "SAME", fusedconv/same_padding.py) applies before convolving: None,
    # same_padding.SAME (computed per input size) or a static (left, right, top, bottom) that is not symmetric
    # (a symmetric one is part of `padding`). Configuration, not state: never in the state_dict.
    pre_pad = None
    # torch.jit.script cannot compile this module's forward: it raises a clear error instead (fusedconv/scripting.py).
    __prepare_scriptable__ = refuse_script

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
        pre_pad=None,
    ):
        super().__init__()
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight: expected a 4-d tensor (Cout, Cin/groups, KH, KW), got {type(weight).__name__}")
        if weight.dim() != 4:
            raise ValueError(f"weight: expected a 4-d tensor (Cout, Cin/groups, KH, KW), got {tuple(weight.shape)}")
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
        self.pre_pad, self.padding = same_padding.normalize_pre_pad(pre_pad, self.padding, self.kernel_size,
                                                                    self.stride, self.dilation, padding_mode)
        self.act = as_spec(activation)

        epi_dtype = _epilogue_dtype(weight.dtype)
        scale = torch.ones(cout, dtype=epi_dtype, device=weight.device) if scale is None else scale
        shift = torch.zeros(cout, dtype=epi_dtype, device=weight.device) if shift is None else shift
        for name, t in (("scale", scale), ("shift", shift)):
            if not isinstance(t, torch.Tensor) or t.shape != (cout,):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape ({cout},) (one value per output channel), got {got}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: expected finite values, got non-finite entries")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        tied.copied(self.weight, weight)  # (convert gives it back the source where both stay: fusedconv/tied.py)
        self.register_buffer("scale", scale.detach().to(device=weight.device, dtype=epi_dtype).clone())
        self.register_buffer("shift", shift.detach().to(device=weight.device, dtype=epi_dtype).clone())
        # Derived, never saved nor traced: (sources, folded weight, folded bias) of the eager fallback. A plain
        # attribute, not a buffer, so it never shows up in state_dict, named_buffers or an exported program.
        self._fold_cache = None
        # Derived, never saved: (key, sources, weight, folded weight, folded bias) in an autocast region's dtype.
        self._autocast_cache = None
        # Derived, never saved: the eager CPU path's routes per input signature and folded / packed weights
        # (`cpu.EagerState`, built on the first CPU call).
        self._cpu_state = None
        self._repack()
        # An inference module (no training behaviour): born in eval mode, so a converted model stays in eval.
        self.train(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module | None = None, act=None) -> "FusedConv2d":
        """Fuse `act(bn(conv(x)))`. `bn` may be None (the conv's bias becomes the shift); `act` may be None,
        an activation module, a name or an ActivationSpec. The source modules are not modified.
        `conv` may also be a padding conv fusedconv recognises (timm's Conv2dSame, efficientnet's
        Conv2dStatic/DynamicSamePadding: fusedconv/same_padding.py), whose pad becomes the fused module's pre-pad,
        or a subclass that overrides neither forward nor _conv_forward."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected nn.Conv2d, got {type(conv).__name__}")
        pre_pad = None
        if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
            # Its own forward may compute something else (e.g. pad first): fused only when recognised.
            verdict = same_padding.conv_pre_pad(conv)
            if not verdict.ok:
                raise TypeError(f"conv: expected nn.Conv2d, a subclass that keeps Conv2d's forward, or a recognised "
                                f"padding conv (timm Conv2dSame, efficientnet Conv2dStatic/DynamicSamePadding), got "
                                f"{type(conv).__name__}: {verdict.reason}")
            pre_pad = verdict.pre_pad
        if bn is not None:
            fold.check_foldable(bn)
        scale, shift = fold.conv_bn_scale_shift(conv, bn, dtype=torch.float64)
        epi_dtype = _epilogue_dtype(conv.weight.dtype)
        padding = conv.padding
        if isinstance(padding, str):
            padding = _resolve_string_padding(conv)
        return cls(conv.weight, scale.to(epi_dtype), shift.to(epi_dtype), stride=conv.stride, padding=padding,
                   dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode, activation=act,
                   pre_pad=pre_pad)

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
        # Keep the epilogue's precision: scale/shift follow the device, not a downcast of the dtype
        # (fp32 for fp32/fp16/bf16 weights, fp64 for fp64 weights).
        epi_dtype = _epilogue_dtype(self.weight.dtype)
        self.scale = scale.to(device=self.weight.device, dtype=epi_dtype)
        self.shift = shift.to(device=self.weight.device, dtype=epi_dtype)
        self._fold_cache = None
        self._cpu_state = None
        self._repack()
        layout.converted()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        unfused = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in _UNFUSED_KEYS]
        if prefix + "weight" in state_dict and prefix + "scale" not in state_dict and prefix + "shift" not in state_dict:
            # A bare conv weight without scale/shift: loading it (even with strict=False) would silently drop the
            # BatchNorm, so it is always an error.
            unfused.insert(0, prefix + "weight (without scale/shift)")
        if unfused:
            # A Conv2d + BatchNorm checkpoint: say so instead of a bare "missing scale / unexpected bias" list.
            error_msgs.append(
                f"state_dict: expected a FusedConv2d state ({prefix}weight, {prefix}scale, {prefix}shift), got keys of "
                f"an unfused Conv2d/BatchNorm layer ({', '.join(unfused[:4])}); load the checkpoint into the unfused "
                "model first and call fusedconv.convert() on it")
        for name in ("scale", "shift"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                if not bool(torch.isfinite(t).all()):
                    error_msgs.append(f"{prefix}{name}: expected finite values, got "
                                      f"{int((~torch.isfinite(t)).sum())} non-finite")
                # Keep our own fp32/fp64 dtype even if the saved copy was cast.
                state_dict[prefix + name] = t.to(getattr(self, name).dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._fold_cache = None
        self._cpu_state = None

    def __setattr__(self, name, value):
        # Only once built (`_cpu_state` is set in __init__ after the geometry): __init__ assigns these itself.
        if "_cpu_state" in self.__dict__:
            if name in _GEOMETRY:
                raise AttributeError(
                    f"{name}: a FusedConv2d's geometry is fixed at construction (its folded and packed weights and "
                    f"padding were built for {name}={getattr(self, name)!r}); change the conv in the original model "
                    f"and convert it again, or build a new FusedConv2d(weight, scale, shift, {name}=...)")
            if name in _FROM_WEIGHT:
                raise AttributeError(f"{name}: derived from the weight's shape {tuple(self.weight.shape)}; assign "
                                     f"a new weight instead")
            if name == "act":
                # Configuration the CPU route derives its oneDNN post-op from: validated, then derived anew.
                value = as_spec(value)
                super().__setattr__(name, value)
                self.refresh()
                return
        super().__setattr__(name, value)

    def train(self, mode: bool = True):
        warn_if_training(mode)  # fusedconv/training_mode.py: eval semantics in training mode, said, not silent
        return super().train(mode)

    def refresh(self) -> None:
        """Recompute derived state (folded weight, packing). Needed only after editing `weight.data`, `scale.data`
        or `shift.data` in place: edits through `.data` bypass the version counter the cache checks; every
        other edit (in-place ops under no_grad, load_state_dict, .to(), assigning new tensors) is seen."""
        self._fold_cache = None
        self._autocast_cache = None
        self._cpu_state = None
        self._repack()

    # ------------------------------------------------------------------ forward
    def __call__(self, *args, **kwargs):
        # nn.Module.__call__ with no hooks anywhere, outside jit tracing and without module.compile(), does nothing
        # but `self.forward(*args, **kwargs)`, yet its two Python frames and hook reads were 1.3-1.8 us of a small
        # layer's ~5 us per-call overhead on CPU (bench/bench_overhead.py). This reads the same conditions
        # directly and hands every other call to nn.Module.__call__ (as it is now, patched or not): hooks of every
        # kind (module or global, pre, post, backward), jit tracing (which records through _slow_forward), a
        # compiled call (module.compile()), and anything that patched nn.Module.__call__ or _call_impl (torch.fx's
        # tracer). Under torch.compile, Dynamo steps through this method like any other.
        # The instance's own attributes are read from its __dict__: nn.Module defines __getattr__, which keeps
        # Python from specializing `self.name` loads, and a dozen of them were a measurable part of the call.
        d = self.__dict__
        try:
            observed = (d["_forward_pre_hooks"] or d["_forward_hooks"] or d["_backward_pre_hooks"]
                        or d["_backward_hooks"] or _nn_module._global_forward_pre_hooks
                        or _nn_module._global_forward_hooks or _nn_module._global_backward_pre_hooks
                        or _nn_module._global_backward_hooks or d.get("_compiled_call_impl") is not None
                        or nn.Module.__call__ is not _MODULE_CALL or nn.Module._call_impl is not _MODULE_CALL_IMPL)
        except KeyError:  # a module restored without nn.Module's state (never from torch's own pickling)
            observed = True
        if observed:
            # torch.fx's symbolic tracer (it patches nn.Module.__call__) records this module as one leaf call.
            traced = leaf_call(self, args, kwargs)
            if traced is not None:
                return traced
            return nn.Module.__call__(self, *args, **kwargs)
        if (len(args) == 1 and not kwargs and type(self) is FusedConv2d and "forward" not in d
                and d.get("pre_pad") is None and not d.get("residual_required", False)):
            # forward(x) without its frame and prelude: for this call (no residual, no pre-pad) it begins with
            # the eager CPU path, exactly as here.
            y = cpu.eager_forward(self, args[0], None)  # (None under jit tracing, which it checks too)
            if y is not None:
                return y
            if _tracing_state() is None:
                return self._general_forward(args[0], None)  # the rest of forward, without checking again
        if _tracing_state() is not None:
            return nn.Module.__call__(self, *args, **kwargs)  # jit tracing records scopes in _slow_forward
        return self.forward(*args, **kwargs)

    def _fold_sources(self) -> tuple:
        """What the folded weight was computed from: the tensors (held strongly by the cache, so a freed weight's
        memory cannot be reused by a new tensor that would then look identical) and a snapshot of their
        identity and version counters (taken now: the tensors' own counters keep moving)."""
        # The tensors themselves, not .detach() views: a view shares the version counter anyway, and creating
        # three per call was a measurable part of a small layer's Python overhead.
        tensors = (self.weight, self.scale, self.shift)
        if any(t.is_inference() for t in tensors):
            # Inference tensors (a module built under torch.inference_mode) have no version counter, so an
            # in-place edit could not be seen: never cache them.
            return tensors, None
        snapshot = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride()) for t in tensors)
        # A cache filled inside inference_mode holds inference tensors, which autograd cannot save outside it.
        return tensors, (snapshot, torch.is_inference_mode_enabled())

    @staticmethod
    def _same_sources(old: tuple, new: tuple) -> bool:
        return old[1] is not None and old[1] == new[1]

    def _compute_folded(self, dtype: torch.dtype | None = None):
        """The weight with scale folded in and the bias in `dtype` (default: the weight's), or (None, None) when
        that dtype cannot hold them faithfully (then the fallback applies scale/shift to the conv output in fp32
        instead)."""
        w = self.weight
        dtype = w.dtype if dtype is None else dtype
        view = (-1, 1, 1, 1)
        acc = _epilogue_dtype(w.dtype)
        # Detached: the cache serves calls that need no gradient for these tensors (the others fold in the graph).
        wf = w.detach().to(acc) * self.scale.detach().to(acc).view(view)
        folded = wf.to(dtype)
        bias = self.shift.detach().to(dtype)
        # "Exact enough": finite, and no weight flushed to zero or into the subnormal range where it loses its
        # precision; the shift must be finite in the weight's dtype too (|shift| > 65504 is inf in fp16).
        if not bool(torch.isfinite(folded).all()) or not bool(torch.isfinite(bias).all()):
            return None, None
        if dtype != acc:
            lost = (folded.abs() < torch.finfo(dtype).tiny) & (wf != 0)
            if bool(lost.any()):
                return None, None
        # Dense in the weight's own layout (fusedconv/layout.py): a channels_last weight (`.to(memory_format=...)`)
        # gives a channels_last output for any input, as the original conv's does; any other (the CUDA kernel's
        # packed strides among them) is stored plain contiguous, and the output follows the input.
        return layout.dense_copy(folded, w, w.shape[0]), bias

    def _folded(self):
        sources = self._fold_sources()
        cache = self._fold_cache
        if cache is None or not self._same_sources(cache[0], sources):
            cache = (sources, *self._compute_folded())
            self._fold_cache = cache
        return cache[1], cache[2]

    def _autocast_tensors(self, dtype: torch.dtype) -> tuple:
        """(weight, folded weight, folded bias) in an autocast region's `dtype` (fusedconv/autocast.py), the fold
        (None, None) where `dtype` cannot hold it faithfully; cached like the fold. While tracing, or when autograd
        must reach the weight, the weight is cast in the graph and nothing is folded or cached."""
        weight, scale, shift = self.weight, self.scale, self.shift
        if torch.compiler.is_compiling() or ops.grad_needed(weight, scale, shift):
            return weight.to(dtype), None, None
        try:
            # The eager CPU path's snapshot (version counters and data pointers, fusedconv/cpu.py), the dtype and
            # the inference mode (a cache filled inside inference_mode holds inference tensors).
            key = (dtype, torch.is_inference_mode_enabled(), *cpu._snapshot(weight, scale, shift))
        except RuntimeError:
            key = None  # inference tensors have no version counter: an edit could not be seen, nothing is cached
        cache = self._autocast_cache
        if (key is None or cache is None or cache[0] != key or cache[1][0] is not weight
                or cache[1][1] is not scale or cache[1][2] is not shift):
            cache = (key, (weight, scale, shift), weight.detach().to(dtype), *self._compute_folded(dtype))
            if key is not None:
                self._autocast_cache = cache
        return cache[2], cache[3], cache[4]

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x as the conv reads it (pre-pad, then a non-zero padding mode's pad) and the padding left to the conv."""
        if self.pre_pad is not None:
            x = same_padding.apply_pre_pad(x, self.pre_pad, self.kernel_size, self.stride, self.dilation)
        return self._mode_pad(x)

    def _mode_pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.padding_mode == "zeros" or self.padding == (0, 0):
            return x, self.padding
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode), (0, 0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_private: bool = False) -> torch.Tensor:
        """act(conv(x) * scale + shift [+ residual]). `x` is (N, C, H, W) or unbatched (C, H, W) like nn.Conv2d
        takes; `residual`, when given, has the output's shape (the fused paths), or a shape that broadcasts to it
        (a (1, C, 1, 1) bias, noise: the unfused path, as the original modules compute it). The output's memory
        format is nn.Conv2d's: channels_last when x or the weight is (fusedconv/layout.py). `residual_private=True`
        (set by convert's rewritten blocks only) allows the CPU path to write the output into `residual` itself:
        pass it only when nothing else can read that tensor afterwards."""
        if residual is None and self.residual_required:
            raise TypeError("FusedConv2d.forward: missing argument 'residual' (this module was built with a "
                            "residual add in its epilogue; expected a tensor of the output's shape)")
        given = x
        try:
            if self.pre_pad is not None:
                if isinstance(x, torch.Tensor) and x.dim() == 3:
                    # Unbatched: as a batch of one, so that the pre-pad is applied exactly once (below).
                    y = self.forward(x.unsqueeze(0), residual.unsqueeze(0) if isinstance(residual, torch.Tensor)
                                     else residual)
                    return y.squeeze(0)
                # A padding conv's own pad first (integer math on x's shape, then one F.pad); every path below then
                # sees the padded input, exactly what the original conv convolved.
                x = same_padding.apply_pre_pad(x, self.pre_pad, self.kernel_size, self.stride, self.dilation)
            # Plain CPU tensors in eager mode: validated and routed once per input signature (fusedconv/cpu.py).
            y = cpu.eager_forward(self, x, residual, residual_private)
            if y is not None:
                return y
            return self._general_forward(x, residual)
        except BroadcastResidual:
            # convert fuses `bn(conv(x)) + other` without knowing other's shape; where it broadcasts, so does this.
            x = given
            if x.dim() != 4 or autocast.cast_dtype(x, self.weight) is not None:
                raise
            if self.pre_pad is not None:
                x = same_padding.apply_pre_pad(x, self.pre_pad, self.kernel_size, self.stride, self.dilation)
            x, padding = self._mode_pad(x)
            return self._conv_scaled(x, padding, residual)

    def _general_forward(self, x, residual):
        """forward after the eager CPU path declined the call (CUDA, autocast, autograd, tracing, other dtypes), on
        an `x` already pre-padded; FusedConv2d.__call__ comes here straight from its own eager-path call."""
        # Inside torch.autocast the original conv runs in the region's dtype, and so does this one: input,
        # residual and weight in that dtype, scale / shift applied in fp32 (fusedconv/autocast.py).
        weight, folded = self.weight, None
        cast = autocast.cast_dtype(x, weight)
        if cast is not None:
            x, residual = x.to(cast), autocast.cast_like_autocast(residual, cast)
            weight, *folded = self._autocast_tensors(cast)
        out_shape = check_inputs(x, weight, self.groups, residual, stride=self.stride, padding=self.padding,
                                 dilation=self.dilation)
        if x.dim() == 3:
            y = self.forward(x.unsqueeze(0), None if residual is None else residual.unsqueeze(0))
            return y.squeeze(0)
        if x.numel() == 0 or math.prod(out_shape) == 0:
            # Empty batch or empty spatial output: nothing to compute (and some backends refuse empty convs).
            fmt = (torch.channels_last if layout.dense_format(weight, self.out_channels) == torch.channels_last
                   else _memory_format(x))
            return x.new_empty(out_shape).contiguous(memory_format=fmt)
        x, padding = self._mode_pad(x)
        # A call autograd must record takes the differentiable fallback (the Triton kernels are inference kernels).
        if (self.cuda_kernel and ops.use_kernel(x, weight)
                and not ops.grad_needed(x, residual, self.weight, self.scale, self.shift)):
            return ops.conv_bn_act(x, weight, self.scale, self.shift, residual, self.stride, padding,
                                   self.dilation, self.groups, self.act.name, self.act.param)
        if folded is not None:
            # Autocast: the fold in the region's dtype where it holds it faithfully, else the scaled conv.
            if folded[0] is not None:
                return self._conv_folded(x, folded[0], folded[1], padding, residual)
            return self._conv_scaled(x, padding, residual, weight)
        return self._fallback(x, padding, residual)

    def _fallback(self, x: torch.Tensor, padding, residual: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced graphs (torch.compile, torch.export) must not mutate the module or branch on data: fold in
            # the graph for fp32/fp64 (exact), apply scale to the fp32 output for fp16/bf16 (always exact).
            if _epilogue_dtype(self.weight.dtype) == self.weight.dtype:
                wf = self.weight * self.scale.view(-1, 1, 1, 1)
                return self._conv_folded(x, wf, self.shift, padding, residual)
            return self._conv_scaled(x, padding, residual)
        if ops.grad_needed(self.weight, self.scale, self.shift):
            # The cached fold is built from detached tensors: a gradient for weight / scale / shift needs the fold
            # in the graph (fp32 / fp64; half precision scales the conv output, which is differentiable as is).
            # Dense in the weight's layout for the same reason as the cached fold (fusedconv/layout.py).
            if _epilogue_dtype(self.weight.dtype) == self.weight.dtype:
                wf = layout.dense_copy(self.weight * self.scale.view(-1, 1, 1, 1), self.weight, self.out_channels)
                return self._conv_folded(x, wf, self.shift, padding, residual)
            return self._conv_scaled(x, padding, residual)
        wf, bf = self._folded()
        if wf is not None:
            return self._conv_folded(x, wf, bf, padding, residual)
        return self._conv_scaled(x, padding, residual)

    def _conv_folded(self, x, wf, bf, padding, residual):
        y = F.conv2d(x, wf, bf, self.stride, padding, self.dilation, self.groups)
        if residual is not None:
            y = y.add_(residual)
        # In place saves a pass at inference; with autograd recording, out of place (an in-place leaky_relu with
        # a negative slope has no backward, and nothing saved for backward is then overwritten).
        return apply_activation(y, self.act.name, self.act.param, inplace=not y.requires_grad)

    def _conv_scaled(self, x, padding, residual, weight=None):
        # Scale does not fit the weight's dtype: apply it to the conv output in the epilogue dtype. (`weight`: the
        # weight in an autocast region's dtype, else the module's own.)
        weight = self.weight if weight is None else weight
        y = F.conv2d(x, weight, None, self.stride, padding, self.dilation, self.groups)
        fmt = _memory_format(y)
        y = y.to(self.scale.dtype) * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        if residual is not None:
            y = y + residual.to(y.dtype)
        y = apply_activation(y, self.act.name, self.act.param, inplace=not y.requires_grad)
        return y.to(x.dtype).contiguous(memory_format=fmt)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.pre_pad is not None:
            s += f", pre_pad={self.pre_pad!r}"
        return s + f", act={self.act}"

    # The fold cache is derived: never pickle or deepcopy it (the copy rebuilds its own on first use).
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fold_cache"] = None
        state["_autocast_cache"] = None
        state["_cpu_state"] = None
        return state

    # The activation is configuration, not state: keep it across pickling / deepcopy as a plain spec.
    def __setstate__(self, state):
        super().__setstate__(state)
        if isinstance(self.__dict__.get("act"), str):
            self.act = ActivationSpec(self.__dict__["act"])
        self.__dict__.setdefault("_fold_cache", None)
        self.__dict__.setdefault("_autocast_cache", None)
        self.__dict__.setdefault("_cpu_state", None)
        # Pickles of earlier versions carry the old oneDNN cache fields.
        self.__dict__.pop("_onednn_cache", None)
        self.__dict__.pop("_onednn_ok", None)


def check_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Raise a clear ValueError when `state_dict` is a fused checkpoint and `model` is not converted (or the
    reverse), naming the first layer that differs; call it before `model.load_state_dict(state_dict)`.

    `load_state_dict(strict=True)` already refuses such a mismatch by listing missing/unexpected keys, and a
    FusedConv2d refuses an unfused layer's keys even with strict=False; this check also covers an unfused
    model given a fused checkpoint with strict=False, which PyTorch would load silently wrong.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(state_dict, "keys"):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith(".scale") and key != "scale":
            continue
        prefix = key[: -len("scale")]
        if prefix + "shift" not in state_dict or prefix + "weight" not in state_dict:
            continue
        owner = modules.get(prefix[:-1])
        # Fused layers of every kind (FusedConv2d, the N-d / transposed / linear ones) keep scale/shift buffers.
        if owner is not None and not ("scale" in owner._buffers and "shift" in owner._buffers):
            raise ValueError(
                f"state_dict: expected the state of an unconverted model, got a FusedConv2d layer's state at "
                f"{prefix[:-1] or '<root>'!r} (keys {prefix}weight/scale/shift) where the model has "
                f"{type(owner).__name__}; run fusedconv.convert() on the model before loading a converted checkpoint")
    for name, module in modules.items():
        if isinstance(module, FusedConv2d):
            prefix = f"{name}." if name else ""
            if prefix + "scale" not in state_dict and prefix + "weight" in state_dict:
                raise ValueError(
                    f"state_dict: expected a converted checkpoint with {prefix}scale and {prefix}shift for the "
                    f"FusedConv2d at {name or '<root>'!r}, got an unfused layer's keys; load the checkpoint into "
                    "the unconverted model and call fusedconv.convert() on it")


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
