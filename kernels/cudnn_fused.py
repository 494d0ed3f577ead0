"""cuDNN's own fused conv + bias (+ add) + ReLU as a candidate beside the Triton kernels, chosen only if faster.

The launcher's contract is act(conv(x, w) * scale + shift [+ residual]). With the BN scale folded into the
weight (w * scale per output channel, in x's dtype) and the shift as the bias, cuDNN computes the same thing in
one fused call for exactly two forms:
  * relu(conv + bias)          `torch.cudnn_convolution_relu(x, w, bias, stride, padding, dilation, groups)`
  * relu(conv + bias + z)      `torch.cudnn_convolution_add_relu(x, w, z, 1.0, bias, stride, padding, ...)`
Nothing else gets a cuDNN candidate (`ineligibility` says why, as a pure function of plain values):
  * identity: torch has no fused cuDNN conv + bias op. `cudnn_convolution` takes no bias and ATen adds it in a
    second kernel (an extra read and write of the whole output), so it is not a fused path; the GPU check's
    "folded" provider measures that two-kernel form separately.
  * other activations, and residual forms other than act(conv + bias + z): cuDNN's fused op is ReLU after the
    add only.
  * a residual in another dtype than x (the op adds in x's dtype), float64, depthwise convs (the launcher sends
    them to the depthwise kernel first), inputs that are neither NCHW- nor channels_last-dense (cuDNN would copy
    the whole input first), and calls that pin the Triton schedule (`split_k` / `stream_k` given).

The folded weight is derived data: `FoldCache` computes it once per (weight, scale, shift) identity and version
counter, and again only when one of them changed (an in-place edit bumps `_version`; `.data` reassignment
changes `data_ptr`). A weight whose fold does not fit the dtype (fp16 overflow, or weights flushed into the
subnormal range) gets no candidate. A layer whose choice is not cuDNN drops its folded copy again. Inference tensors carry no version counter: no candidate for them either,
since folding per call is what the cache exists to avoid.

`choose` puts the candidate through `variant_choice.choose` beside the Triton candidates: one probe run first
(a cuDNN that raises, e.g. no engine for this shape, is dropped with one warning per distinct error), then the
same agreement check against the pointer kernel's output and the same timing, under a launch-signature key of
its own (`key + ("cudnn",)`), so switching the candidate off never reuses a choice that included it.

Tracing (torch.compile / export): no candidate is built, the traced graph holds the Triton kernel. CUDA-graph
capture: no probing or timing (variant_choice returns the eager choice or the pointer kernel); when the eager
choice was cuDNN it runs if its folded weight is already cached, else the pointer kernel runs (nothing is folded
inside a capture).

Off switch: FUSEDCONV_CUDNN=0 in the environment at import (`MODE`), or the launcher's `cudnn=False`.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch

#: "auto" (default: a candidate where eligible) or "off" (FUSEDCONV_CUDNN=0).
MODE = "off" if os.environ.get("FUSEDCONV_CUDNN", "") == "0" else "auto"

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=4096)
def ineligibility(activation: str, dtype: torch.dtype, residual_dtype: torch.dtype | None, groups: int,
                  cin: int, cout: int, x_layout: str, pinned_schedule: bool) -> str | None:
    """None when cuDNN's fused op computes exactly this launch's contract, else the reason it does not.

    x_layout: "nchw", "channels_last" or "strided"; residual_dtype: None without a residual."""
    if activation == "identity":
        return "identity: torch has no fused cuDNN conv + bias (the bias is a second kernel)"
    if activation != "relu":
        return f"activation {activation!r}: cuDNN's fused op is ReLU only"
    if dtype not in _FUSED_DTYPES:
        return f"dtype {dtype}: the fused op is used for float16 / bfloat16 / float32 only"
    if residual_dtype is not None and residual_dtype != dtype:
        return f"residual dtype {residual_dtype} differs from the input's {dtype}"
    if groups > 1 and groups == cin == cout:
        return "depthwise: runs the depthwise kernel"
    if x_layout not in ("nchw", "channels_last"):
        return "input neither NCHW- nor channels_last-dense (cuDNN would copy it first)"
    if pinned_schedule:
        return "split_k / stream_k given: the call pins the Triton kernel"
    return None


def layout_of(x: torch.Tensor) -> str:
    """"channels_last", "nchw" or "strided" (channels_last wins where both hold, as output_memory_format's)."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "nchw" if x.is_contiguous() else "strided"


@functools.cache
def _cudnn_built() -> bool:
    return torch.backends.cudnn.is_available()  # fixed for the process; a few µs per call, so asked once


def available(device: torch.device) -> bool:
    """Whether cuDNN can run on `device` now (tests on CPU replace this together with `cudnn_ops`)."""
    return device.type == "cuda" and _cudnn_built() and torch.backends.cudnn.enabled


def cudnn_ops():
    """(conv + bias + relu, conv + bias + add + relu): torch's cuDNN fused ops, schemas as in torch 2.11+."""
    return torch.cudnn_convolution_relu, torch.cudnn_convolution_add_relu


# ------------------------------------------------------------------------------------------- folded weight
def fold(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, memory_format):
    """(weight * scale per output channel, shift) in the weight's dtype, or None when that dtype cannot hold
    them faithfully: a non-finite value, or an output channel whose folded weights are off by more than one
    unit in the last place of the channel's largest weight (its scale pushed the channel into the subnormal
    range, or to zero).

    Judged per channel, not per weight: a trained fp16 layer always has some weights near zero, which land in
    the subnormal range after the fold with an error of at most 2**-25 — nothing next to the channel's large
    weights, whose own rounding is ~1000 times that. (A per-weight "below the normal range" test refused the
    fold of nearly every fp16 layer, so the cuDNN candidate never ran in fp16: the H200 check, 2026-12-04.)"""
    acc = torch.float64 if weight.dtype == torch.float32 else torch.float32
    with torch.inference_mode(False), torch.no_grad():
        exact = weight.detach().to(acc) * scale.detach().to(acc).view(-1, 1, 1, 1)
        folded = exact.to(weight.dtype)
        bias = shift.detach().to(weight.dtype)
        if not bool(torch.isfinite(folded).all()) or not bool(torch.isfinite(bias).all()):
            return None
        rows = exact.flatten(1)
        worst = (folded.to(acc).flatten(1) - rows).abs().amax(dim=1)
        if bool((worst > torch.finfo(weight.dtype).eps * rows.abs().amax(dim=1)).any()):
            return None
        return folded.contiguous(memory_format=memory_format), bias.contiguous()


def _snapshot(tensors) -> tuple | None:
    """What a fold depends on besides identity: storage, version counter, shape and strides (a `.data`
    reassignment may keep the object and the version). Checked per call, so kept to what can change."""
    w, s, h = tensors
    try:
        return (w.data_ptr(), w._version, w.shape, w.stride(), s.data_ptr(), s._version, s.shape,
                h.data_ptr(), h._version, h.shape)
    except RuntimeError:  # inference tensors have no version counter: an in-place edit could not be seen
        return None


class FoldCache:
    """Folded (weight, bias) per (weight, scale, shift) object and memory format, recomputed only when one of
    the three changed. Holds weak references: a freed weight's entry is dropped, never matched by identity."""

    def __init__(self):
        self._entries: dict = {}
        self.folds = 0  # how many folds were computed (tests check "once per version")

    def get(self, weight, scale, shift, memory_format, compute: bool = True):
        """(folded weight, bias); None when the fold does not fit the dtype, the tensors have no version
        counter, or (compute=False) it is not cached yet."""
        tensors = (weight, scale, shift)
        snap = _snapshot(tensors)
        if snap is None:
            return None
        key = (id(weight), id(scale), id(shift), memory_format)
        entry = self._entries.get(key)
        if entry is not None and entry[1] == snap:
            rw, rs, rh = entry[0]  # the same objects, not new ones that reuse a freed one's id
            if rw() is weight and rs() is scale and rh() is shift:
                return entry[2]
        if not compute:
            return None
        value = fold(weight, scale, shift, memory_format)
        self.folds += 1
        self._prune()
        self._entries[key] = (tuple(weakref.ref(t) for t in tensors), snap, value)
        return value

    def discard(self, weight, scale, shift, memory_format) -> None:
        """Forget the fold of these tensors (a layer that did not choose cuDNN need not keep a weight copy)."""
        self._entries.pop((id(weight), id(scale), id(shift), memory_format), None)

    def _prune(self) -> None:
        dead = [k for k, e in self._entries.items() if any(r() is None for r in e[0])]
        for k in dead:
            del self._entries[k]

    def __len__(self) -> int:
        return len(self._entries)


FOLDS = FoldCache()


# ------------------------------------------------------------------------------------------- the candidate
def run(x, weight, scale, shift, residual, stride, padding, dilation, groups, memory_format, *, compute=True):
    """relu(conv(x, weight * scale) + shift [+ residual]) through cuDNN's fused op, in `memory_format`; None
    when the folded weight is unusable (or, compute=False, not cached)."""
    folded = FOLDS.get(weight, scale, shift, memory_format, compute=compute)
    if folded is None:
        return None
    w, b = folded
    relu_op, add_relu_op = cudnn_ops()
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if residual is None:
        y = relu_op(x, w, b, stride, padding, dilation, groups)
    else:
        y = add_relu_op(x, w, residual, 1.0, b, stride, padding, dilation, groups)
    return y.contiguous(memory_format=memory_format)  # the op's contract: the output in x's memory format


def candidate(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, memory_format,
              *, enabled: bool | None, pinned_schedule: bool, fallback, tracing: bool):
    """A zero-argument launch through cuDNN for this call, or None where there is none (switched off, no
    cuDNN, tracing, ineligible). Inside a CUDA-graph capture the launch runs `fallback` unless the folded
    weight is already cached (nothing is computed or cached from inside a capture)."""
    if activation != "relu" or not (MODE == "auto" if enabled is None else enabled) or tracing:
        return None  # (ReLU first: the cheapest test, and what most launches that get no candidate fail)
    if not available(x.device):
        return None
    reason = ineligibility(activation, x.dtype, None if residual is None else residual.dtype, groups,
                           x.shape[1], weight.shape[0], layout_of(x), pinned_schedule)
    if reason is not None:
        return None

    def launch():
        compute = not _capturing(x.device)
        y = run(x, weight, scale, shift, residual, stride, padding, dilation, groups, memory_format,
                compute=compute)
        return fallback() if y is None else y
    launch.folded_ok = lambda: FOLDS.get(weight, scale, shift, memory_format) is not None
    launch.discard_fold = lambda: FOLDS.discard(weight, scale, shift, memory_format)
    return launch


def _capturing(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except (RuntimeError, AssertionError):
        return False


# ------------------------------------------------------------------------------------------- the choice
_failed: set = set()  # choice keys whose cuDNN probe raised (or whose fold was unusable)
_warned: set = set()  # distinct errors already warned about
_decided: set = set()  # choice keys variant_choice has decided (timed eagerly): later calls only look them up


def choice_key(key) -> tuple:
    """The launch-signature key of a choice that had a cuDNN candidate."""
    return (*key, "cudnn") if isinstance(key, tuple) else (key, "cudnn")


def choose(key, candidates: dict, device, output, variant_choice) -> str:
    """`variant_choice.choose` over `candidates` ({name: launch}, "pointer" first), where a "cudnn" candidate is
    probed once before it may be compared and timed, and writes `output` on its first (compared) run."""
    launch = candidates.get("cudnn")
    if launch is None:
        return variant_choice.choose(key, candidates, device, output=output)
    ckey = choice_key(key)
    others = {k: v for k, v in candidates.items() if k != "cudnn"}
    if ckey in _failed:
        return variant_choice.choose(key, others, device, output=output) if len(others) > 1 else "pointer"
    if ckey in _decided or not variant_choice.can_time(device):
        return variant_choice.choose(ckey, candidates, device, output=output)  # the cached choice, or "pointer"
    if not _probe(ckey, launch):
        return variant_choice.choose(key, others, device, output=output) if len(others) > 1 else "pointer"
    name = variant_choice.choose(ckey, {**others, "cudnn": _writes_output_once(launch, output)}, device,
                                 output=output)
    _decided.add(ckey)
    if name != "cudnn":
        launch.discard_fold()  # the folded copy is only kept for layers that run cuDNN
    return name


def _probe(ckey, launch) -> bool:
    """Run the candidate once; False (candidate dropped for this key, warned once per distinct error) if cuDNN
    raises or the folded weight does not fit the dtype."""
    try:
        if not launch.folded_ok():
            _failed.add(ckey)
            return False
        launch()
        return True
    except Exception as exc:  # cuDNN without an engine for this shape / dtype, or no fused op in this build
        _failed.add(ckey)
        launch.discard_fold()
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if msg not in _warned:
            _warned.add(msg)
            warnings.warn(f"fusedconv: cuDNN's fused conv is not used for launch {ckey[:-1]!r} (it raised "
                          f"{msg[:300]}); the Triton kernel runs instead", RuntimeWarning, stacklevel=4)
        return False


def _writes_output_once(launch, output):
    """The launch, copying its result into `output` on its first call only: variant_choice compares `output`
    after that call, and times the later calls (which, like the chosen path, return a fresh tensor)."""
    state = {"first": True}

    @functools.wraps(launch)
    def wrapped():
        y = launch()
        if state["first"]:
            state["first"] = False
            if output is not None:
                output.copy_(y)
        return y
    return wrapped


def failed() -> set:
    """Choice keys (see `choice_key`) whose cuDNN candidate was dropped before timing."""
    return set(_failed)
