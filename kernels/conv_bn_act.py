"""The public conv + BN + activation launcher: validation, dispatch and launch of the implicit-GEMM kernels.

`conv_bn_act(...)` plans the call (`conv_plan._plan`, cached per call signature: checks, output shape, loop
flags, the schedule), then dispatches: depthwise convs to `kernels.depthwise` when that module is present,
eligible 1x1 / stride-1 KxK convs to the TMA-descriptor kernels of `conv_tma` / `conv_tma_kxk` when asked
(`tma`; their stream-K forms, `conv_tma_streamk`, on stream-K layers), sub-wave layers to the stream-K kernel
(`conv_streamk`) when the schedule model picks it (and where the model's pick leaves the GPU short, the
filling stream-K schedule is a further candidate timed at warm-up, "streamk"), and
everything else to the data-parallel pointer kernel (`conv_gemm`, with split-K when the model splits) —
autotuned on a GPU, or under TRITON_INTERPRET=1 (CPU tensors) the plain kernel with one small config. A ReLU
conv may instead run cuDNN's own fused conv + bias (+ add) + ReLU on the BN-folded weight where that candidate
agrees with the pointer kernel and was timed faster (`cudnn_fused`); `backend_log` records what each launch ran.

The kernels live beside this file, one family per file: `conv_gemm` (pointer implicit GEMM and split-K),
`conv_streamk`, `conv_tma`, `conv_tma_kxk`, `conv_tma_streamk`, `depthwise`; their configs in `configs`, the
schedule model in `schedule`. Names other modules and tests reach through this module (`_conv_gemm_kernel`, `_plan`,
`interpreting`, ...) are re-exported here.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from fusedconv.kernels import backend_log as _backend_log
from fusedconv.kernels import configs as _configs
from fusedconv.kernels import cudnn_fused as _cudnn
from fusedconv.kernels import conv_tma as _tma
from fusedconv.kernels import conv_tma_kxk as _tma_kxk
from fusedconv.kernels import conv_tma_streamk as _tma_streamk
from fusedconv.kernels import variant_choice as _variant_choice
from fusedconv.kernels import precision as _precision
from fusedconv.kernels.conv_gemm import _conv_gemm_kernel, _splitk_epilogue_kernel
from fusedconv.kernels import conv_plan as _conv_plan
from fusedconv.kernels.conv_plan import _cdiv, _check_device, _check_tensors, _depthwise_launcher, _pair, interpreting
from fusedconv.kernels.conv_plan import _num_sms  # noqa: F401  (looked up here at plan time: tests patch it)
from fusedconv.kernels import conv_streamk as _streamk
from fusedconv.kernels.conv_streamk import _conv_streamk_kernel
from fusedconv.kernels.epilogue import _tracing, traceable
from fusedconv.kernels.reference import conv_output_shape as output_shape
from fusedconv.kernels.reference import output_memory_format

__all__ = ["conv_bn_act", "output_memory_format", "output_shape", "interpreting"]

#: What `tma=None` means: "auto" (default: on sm_90 the TMA-descriptor kernels are candidates beside the pointer
#: kernel wherever eligible, the faster kept per launch signature, see variant_choice), "on" (FUSEDCONV_TMA=1:
#: always where eligible) or "off" (FUSEDCONV_TMA=0: never).
TMA_MODE = {"1": "on", "0": "off"}.get(os.environ.get("FUSEDCONV_TMA", ""), "auto")
#: Whether tma=None forces the TMA kernels wherever eligible (FUSEDCONV_TMA=1).
TMA_DEFAULT = TMA_MODE == "on"

_autotuned_kernel = None
_autotuned_streamk = None


def _get_autotuned_kernel():
    """The autotuner around _conv_gemm_kernel, built on first GPU use (never under the interpreter)."""
    global _autotuned_kernel
    if _autotuned_kernel is None:
        _autotuned_kernel = triton.autotune(
            configs=_configs.all_autotune_configs(),
            key=_configs.AUTOTUNE_KEY,
            prune_configs_by={"early_config_prune": _configs.prune_configs},
        )(_conv_gemm_kernel)
        from fusedconv.kernels.tuning_cache import bucket_m

        bucket_m(_autotuned_kernel, _configs.AUTOTUNE_KEY)  # a new batch size reuses its M bucket's config
    return _autotuned_kernel


#: One stream-K autotuner per program count: the grid size is no kernel argument, so an autotuner's key cannot
#: hold it, and a config tuned under one count (slices of one K step) would be reused under another.
_autotuned_streamk: dict = {}


def _get_autotuned_streamk(programs: int):
    """The autotuner around _conv_streamk_kernel for launches of `programs` programs (tiles up to
    STREAMK_MAX_TILE), built on first GPU use."""
    tuner = _autotuned_streamk.get(programs)
    if tuner is None:
        tuner = triton.autotune(
            configs=_configs.all_autotune_configs(),
            key=_configs.STREAMK_AUTOTUNE_KEY,
            prune_configs_by={"early_config_prune": _configs.prune_streamk_configs},
        )(_conv_streamk_kernel)
        _autotuned_streamk[programs] = tuner
    return tuner


@functools.lru_cache(maxsize=1024)
def streamk_workspace_tile(dtype, device, m, cout_g, cin_g, kh, kw, is_1x1, flat_k, row_k, row_width,
                           has_residual) -> int:
    """Values per workspace slot of a pointer stream-K launch: the largest BLOCK_M * BLOCK_N among the configs
    the autotuner may run for it (`prune_streamk_configs` on the same arguments, deny-list included), not
    STREAMK_MAX_TILE for every launch (a 16x64-tile layer on 264 programs needed 34 MB of 128x128 slots).
    The kernel's static_assert still refuses a tile larger than its slot."""
    named = {"x_ptr": torch.empty(0, dtype=dtype, device=device), "M": m, "COUT_G": cout_g, "CIN_G": cin_g,
             "KH": kh, "KW": kw, "IS_1X1": is_1x1, "FLAT_K": flat_k, "ROW_K": row_k, "ROW_WIDTH": row_width,
             "HAS_RESIDUAL": has_residual}
    kept = _configs.prune_streamk_configs(_configs.all_autotune_configs(), named)
    return max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept)


def _plan(*args, **kwargs):
    """`conv_plan._plan` with this module's `_num_sms` (looked up per call, so it can be replaced)."""
    return _conv_plan._plan(*args, sm_count=lambda device: _num_sms(device), **kwargs)


_plan_cached = functools.lru_cache(maxsize=2048)(_plan)

def _streamk_tile(plan, x) -> int:
    """WS_TILE of a pointer stream-K launch: the interpreter's one tile, else `streamk_workspace_tile`."""
    if interpreting():
        return _configs.INTERPRET_CONFIG["BLOCK_M"] * _configs.INTERPRET_CONFIG["BLOCK_N"]
    f = plan["flags"]
    return streamk_workspace_tile(x.dtype, x.device, plan["m"], plan["cout_g"], plan["int_args"][6], f["KH"],
                                  f["KW"], f["IS_1X1"], f["FLAT_K"], f["ROW_K"], f["ROW_WIDTH"], f["HAS_RESIDUAL"])


def _launch_streamk(plan, x, weight, scale, shift, res, y, act_param):
    """Stream-K launch: `plan['streamk_programs']` programs, per-program workspace slots, tile counters."""
    programs, m, cout_g = plan["streamk_programs"], plan["m"], plan["cout_g"]
    groups = plan["cout"] // cout_g
    tile = _streamk_tile(plan, x)
    if interpreting():
        min_bm, min_bn = _configs.INTERPRET_CONFIG["BLOCK_M"], _configs.INTERPRET_CONFIG["BLOCK_N"]
    else:
        min_bm, min_bn = 16, 16
    workspace = _streamk.partial_workspace(programs, tile, x.device)
    counters = _streamk.tile_counters(x.device, _cdiv(m, min_bm) * _cdiv(cout_g, min_bn) * groups)
    args = (x, weight, scale, shift, res, y, workspace, counters, *plan["int_args"], float(act_param), groups)
    flags = {k: v for k, v in plan["flags"].items() if k != "SPLIT_K"}
    flags["WS_TILE"] = tile
    if interpreting():
        _conv_streamk_kernel[(programs,)](*args, **flags, **_configs.INTERPRET_CONFIG)
    else:
        traceable(_get_autotuned_streamk(programs))[(programs,)](*args, **flags)
    return y


def conv_bn_act(x, weight, scale, shift, *, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                act_param=0.0, residual=None, split_k=None, tma=None, stream_k=None, cudnn=None):
    """act(conv2d(x, weight) * scale + shift [+ residual]) in one Triton kernel launch.

    x: (N, Cin, H, W) fp16 / bf16 / fp32, any strides (channels_last is the fast path). weight: (Cout, Cin/groups,
    KH, KW) in x's dtype, any strides (`pack_weight` gives the fastest). scale, shift: (Cout,) — applied in fp32.
    residual: None or a tensor of the output's shape, any strides. activation: a name of
    `reference.ACTIVATIONS`; act_param is leaky_relu's slope. Returns a tensor in x's dtype and memory format.
    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. Depthwise convs (groups == Cin == Cout)
    go to `kernels.depthwise` when it is present. `split_k` overrides the automatic split-K choice and keeps
    the conv on this GEMM kernel (tests use it to exercise those paths).

    `stream_k`: None lets the schedule model (`schedule.choose_schedule`, from the SM count) pick data-parallel,
    split-K or the stream-K kernel; False never stream-K; True stream-K on every SM (under the interpreter:
    `conv_plan.INTERPRET_STREAMK_PROGRAMS` programs); an int: stream-K with that many programs.

    `tma`: run eligible 1x1 convs (see `conv_tma.tma_1x1_eligible`) through the TMA-descriptor GEMM kernel and
    eligible stride-1 KxK convs (`conv_tma_kxk.tma_kxk_eligible`) through the 4-D NHWC descriptor kernel
    (True), never (False), or as `TMA_MODE` says (None; default "auto": on an sm_90 GPU the TMA kernel and the
    pointer kernel are both candidates for an eligible conv and the faster is kept per launch signature,
    `variant_choice`; FUSEDCONV_TMA=1 / 0 at import forces on / off). Ineligible convs — unaligned strides
    included — always run the pointer kernel, never a faulting descriptor. The GPU check runs every TMA config
    against float64 and deny-lists failing ones.

    `cudnn`: offer cuDNN's own fused conv + bias (+ add) + ReLU on the BN-folded weight as a further
    candidate where it computes this call exactly (ReLU only; see `cudnn_fused`), kept only if it agrees with
    the pointer kernel and is faster (None: as `cudnn_fused.MODE` says, default on, FUSEDCONV_CUDNN=0 at import
    turns it off; False: never). Never while tracing: the traced graph holds the Triton kernel.

    The metadata-only part of a launch (checks, split-K, int64, integer arguments) is cached per distinct call
    signature, so a repeated call costs little more than the allocation and the kernel launch.
    """
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    _check_tensors(x, weight, scale, shift, residual)
    tf32 = x.dtype == torch.float32 and x.is_cuda and _precision.cudnn_conv_allows_tf32()
    fmt = output_memory_format(x)
    res_meta = None if residual is None else (tuple(residual.shape), tuple(residual.stride()), residual.dtype)
    key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, tuple(weight.shape), tuple(weight.stride()),
           weight.dtype, tuple(scale.shape), tuple(shift.shape), res_meta, stride, padding, dilation, groups,
           activation, act_param, split_k, tf32, fmt == torch.channels_last, stream_k)
    try:
        plan = _plan_cached(*key)
    except TypeError:
        # Symbolic shapes (torch.compile with dynamic shapes) are unhashable: plan without the cache. (A
        # TypeError from the argument checks is raised again by this call.)
        plan = _plan(*key)
    _check_device(x)  # after the argument checks, so a bad argument is reported as such on any device

    if plan["depthwise"]:
        depthwise = _depthwise_launcher()
        if depthwise is not None:
            _backend_log.record("depthwise")
            return depthwise(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation,
                             activation=activation, act_param=act_param, residual=residual)

    y = torch.empty(plan["out_shape"], dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    if tuple(y.stride()) != plan["y_stride"]:  # the plan's output strides must be the ones torch allocated
        raise RuntimeError(f"internal: output strides {tuple(y.stride())} differ from the planned {plan['y_stride']}")
    pinned_schedule = split_k is not None or stream_k is not None
    scale_src, shift_src = scale, shift  # the caller's tensors: the cuDNN fold is cached on their identity
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.to(torch.float32).contiguous()
    if shift.dtype != torch.float32 or not shift.is_contiguous():
        shift = shift.to(torch.float32).contiguous()
    split_k, m, cout = plan["split_k"], plan["m"], plan["cout"]
    res = residual if residual is not None else y  # dummy pointer when HAS_RESIDUAL is False
    workspace = (torch.empty((split_k, m, cout), dtype=torch.float32, device=x.device) if split_k > 1
                 else scale)  # dummy pointer when SPLIT_K == 1
    args = (x, weight, scale, shift, res, y, workspace, *plan["int_args"], float(act_param))

    def pointer():
        return _launch_pointer(plan, x, weight, scale, shift, res, y, workspace, args, act_param)

    mode = TMA_MODE if tma is None else ("on" if tma else "off")
    tracing = _tracing()
    # "auto": on an sm_90 GPU the TMA kernel is a candidate beside the pointer kernel and the faster is kept per
    # launch signature (variant_choice: timed in eager calls only; a CUDA-graph capture replays the eager
    # choice); while tracing the pointer kernel runs.
    tma_launch = None
    if mode == "on" or (mode == "auto" and not interpreting() and not tracing and _sm_major(x.device) == 9):
        tma_launch = _tma_candidate(plan, x, weight, scale, shift, residual, y, groups, stride, padding, dilation,
                                    act_param, tf32)
    if mode == "on" and tma_launch is not None:
        _backend_log.record("tma")
        return tma_launch()
    candidates = {"pointer": pointer}
    if tma_launch is not None:
        candidates["tma"] = tma_launch
    if plan["filling_streamk"] and x.is_cuda and not tracing:
        # The rule's schedule leaves SMs idle and the model rates the filling stream-K schedule slower: only
        # timing on this GPU can tell (variant_choice keeps the faster; the traced graph keeps the rule's).
        filling_plan = {**plan, "streamk_programs": plan["filling_streamk"]}

        def streamk():
            return _launch_streamk(filling_plan, x, weight, scale, shift, res, y, act_param)
        candidates["streamk"] = streamk
    cudnn_launch = _cudnn.candidate(x, weight, scale_src, shift_src, residual, stride, padding, dilation, groups,
                                    activation, fmt, enabled=cudnn, pinned_schedule=pinned_schedule,
                                    fallback=pointer, tracing=tracing)
    if cudnn_launch is not None:
        candidates["cudnn"] = cudnn_launch
    name = "pointer" if len(candidates) == 1 else _cudnn.choose(key, candidates, x.device, y, _variant_choice)
    if name not in candidates:  # a choice cached for a candidate this call does not offer
        name = "pointer"
    _backend_log.record(name)
    return candidates[name]()


def _sm_major(device) -> int:
    try:
        return torch.cuda.get_device_capability(device)[0]
    except (RuntimeError, AssertionError):  # no driver (fake CUDA tensors while tracing)
        return 0


def _tma_candidate(plan, x, weight, scale, shift, residual, y, groups, stride, padding, dilation, act_param, tf32):
    """A zero-argument launch of the TMA-descriptor kernel for this conv, or None where it is not eligible
    (unaligned strides, stride-2 KxK, grouped / unpacked layouts, pre-Hopper GPUs, triton without host-side
    descriptors): those run the pointer kernel. The TMA kernel runs the layer's schedule: data-parallel, or
    where the schedule rule gave the layer stream-K (`schedule.choose_schedule`) the TMA stream-K kernels of
    `conv_tma_streamk` with the same program count, so the two families are timed under the same schedule
    (variant_choice). Split-K layers have no TMA candidate: the pointer kernel's split runs. Stride-1 1x1: the
    2-D GEMM descriptors of conv_tma; strided 1x1 and stride-1 KxK: the 4-D NHWC descriptor kernel of
    conv_tma_kxk (the former on the strided view of x)."""
    flags, split_k, programs = plan["flags"], plan["split_k"], plan["streamk_programs"]
    if split_k != 1:
        return None
    interp = interpreting()
    if flags["IS_1X1"] and _tma.tma_1x1_eligible(x, weight, groups, stride, padding, None):
        if programs:
            def launch_1x1_streamk():
                return _tma_streamk.conv1x1_tma_streamk_launch(
                    x, weight, scale, shift, residual, y, flags["ACTIVATION"], act_param, tf32, plan["res_stride"],
                    programs, traceable, interpret_cfg=_configs.INTERPRET_CONFIG if interp else None)
            return launch_1x1_streamk

        def launch_1x1():
            return _tma.conv1x1_tma_launch(
                x, weight, scale, shift, residual, y, flags["ACTIVATION"], act_param, tf32, plan["res_stride"],
                None if interp else traceable(_tma.autotuned_kernel()),
                interpret_cfg=_configs.INTERPRET_CONFIG if interp else None)
        return launch_1x1
    view = None
    if flags["IS_1X1"]:
        # stride-2 1x1 (downsample): a descriptor on the strided view, run as a 1x1 stride-1 conv
        view = _tma_kxk.strided_1x1_view(x, weight, groups, stride, padding, None)
    elif _tma_kxk.tma_kxk_eligible(x, weight, groups, stride, None):
        view = x
    if view is None:
        return None
    cfg = _tma_kxk.INTERPRET_CONFIG if interp else None
    if programs:
        def launch_kxk_streamk():
            return _tma_streamk.conv_kxk_tma_streamk_launch(
                view, weight, scale, shift, residual, y, padding, dilation, flags["ACTIVATION"], act_param, tf32,
                plan["res_stride"], programs, traceable, interpret_cfg=cfg)
        return launch_kxk_streamk

    def launch_kxk():
        return _tma_kxk.conv_kxk_tma_launch(
            view, weight, scale, shift, residual, y, padding, dilation, flags["ACTIVATION"], act_param, tf32,
            plan["res_stride"], traceable, interpret_cfg=cfg)
    return launch_kxk


def _launch_pointer(plan, x, weight, scale, shift, res, y, workspace, args, act_param):
    """The pointer kernel family: stream-K when planned, else the data-parallel grid (+ split-K epilogue)."""
    if plan["streamk_programs"]:
        return _launch_streamk(plan, x, weight, scale, shift, res, y, act_param)
    flags, split_k, m, cout, cout_g = plan["flags"], plan["split_k"], plan["m"], plan["cout"], plan["cout_g"]
    groups = cout // cout_g
    if interpreting():
        cfg = _configs.INTERPRET_CONFIG
        grid = (_cdiv(m, cfg["BLOCK_M"]) * _cdiv(cout_g, cfg["BLOCK_N"]), groups, split_k)
        _conv_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        def grid(meta):
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(cout_g, meta["BLOCK_N"]), groups, split_k)

        traceable(_get_autotuned_kernel())[grid](*args, **flags)

    if split_k > 1:
        block = 32 if interpreting() else 64
        grid2 = (_cdiv(m, block), _cdiv(cout, block))
        epi = _splitk_epilogue_kernel if interpreting() else traceable(_splitk_epilogue_kernel)
        epi[grid2](workspace, scale, shift, res, y, m, cout, plan["oh"], plan["ow"], *plan["res_stride"],
                   *plan["y_stride"], float(act_param), SPLIT_K=split_k, ACTIVATION=flags["ACTIVATION"],
                   HAS_RESIDUAL=flags["HAS_RESIDUAL"], USE_INT64=flags["USE_INT64"], BLOCK_M=block,
                   BLOCK_N=block)
    return y
