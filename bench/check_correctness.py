"""GPU check, part (a): every candidate config of every layer against a float64 Conv -> BN -> act reference.

The autotuner runs only its winner afterwards, so a config that computes garbage but is never fastest stays
hidden — until another GPU, batch size or triton version makes it the fastest. Here each config the autotuner
may keep for a layer (after pruning, same rule as the launcher) is forced in turn through the library's own
launcher (`forced_config`), and its output is compared with F.conv2d -> F.batch_norm -> activation computed in
float64 on the same (rounded) inputs: relative Frobenius error and worst element, NaN / unwritten outputs
caught by poisoning the allocator's next block with NaN first.

Work items are (geometry, batch, dtype mode) with all their configs; `python -m bench.check_correctness ITEMS
OUT DEADLINE` is the worker process the GPU check starts several of (compiling is single-threaded per
process, so parallel workers cut the compile time of hundreds of specialisations). Each finished config is
appended to OUT as one JSON line immediately, so a worker killed at its deadline loses nothing finished.

Stream-K (pointer and TMA kernels) runs every config at each program count the schedule rule may launch the
layer with on this GPU (`check_streamk`: one per SM, more than SMs on short-K layers, the filling count, and a
count that leaves some programs one step more), and one short layer runs the launcher's "streamk" warm-up
candidate itself.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.check_forcing import forced_config, pinned_warmup  # noqa: F401  (forced_config: part of this API)

#: Relative Frobenius error and worst-element error (over max |ref|) per dtype mode. A miscompiled config is
#: off by O(1); these bound rounding: 16-bit output rounding (2^-11 fp16, 2^-8 bf16), TF32 operands (2^-11),
#: fp32 accumulation order.
TOLERANCE = {"float16": (2e-3, 1e-2), "bfloat16": (1e-2, 3e-2), "tf32": (5e-3, 2e-2), "float32": (1e-5, 1e-4)}
DTYPE_MODES = ("float16", "bfloat16", "tf32", "float32")
#: The GEMM schedules every non-depthwise item is checked under (their kernels and candidate configs differ);
#: "tma" only where a TMA-descriptor kernel is eligible (`tma_kernel`), else it has no candidates.
SCHEDULES = ("data-parallel", "stream-K", "tma")
#: Kernel labels of the rows (and deny-list kernel names) of the stream-K schedules.
STREAMK_KERNELS = ("streamk", "tma1x1_streamk", "tmakxk_streamk")


@dataclass(frozen=True)
class Geometry:
    """One conv layer to check: input (batch given separately) cin x h x w, cout, kernel, stride, padding..."""

    name: str
    cin: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    activation: str = "relu"
    residual: bool = False

    def out_hw(self) -> tuple[int, int]:
        oh = (self.h + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        ow = (self.w + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        return oh, ow

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin == self.cout


#: The kernel tests' edge-case geometries (odd sizes, K masks, flat K, dilation, groups, depthwise, rectangles).
TEST_GEOMETRIES = (
    Geometry("t_1x1", 8, 5, 5, 20, 1, 1, activation="silu", residual=True),
    Geometry("t_1x1_stride2", 16, 7, 7, 12, 1, 1, stride=(2, 2), activation="identity"),
    Geometry("t_3x3_prime_stride2", 7, 11, 13, 11, 3, 3, (2, 2), (1, 1), activation="relu6"),
    Geometry("t_7x7_stride2_flatk", 3, 13, 13, 8, 7, 7, (2, 2), (3, 3), residual=True),
    Geometry("t_3x3_dilation2", 17, 9, 9, 6, 3, 3, padding=(2, 2), dilation=(2, 2), activation="hardswish"),
    Geometry("t_3x3_groups2", 6, 5, 5, 10, 3, 3, padding=(1, 1), groups=2, activation="gelu"),
    Geometry("t_depthwise", 8, 6, 5, 8, 3, 3, padding=(1, 1), groups=8, residual=True),
    Geometry("t_rect_1x3", 5, 4, 7, 3, 1, 3, (1, 2), (0, 1), activation="leaky_relu"),
    Geometry("t_3x3_cin19", 19, 5, 3, 5, 3, 3, padding=(1, 1)),
    Geometry("t_3x3_even_k", 32, 4, 5, 18, 3, 3, padding=(1, 1), residual=True),
    Geometry("t_3x3_cin24_s2", 24, 17, 17, 40, 3, 3, (2, 2), (1, 1), activation="silu"),
)


def from_layer_case(case) -> Geometry:
    """A bench LayerCase (bench/shapes.py) as a Geometry."""
    s = case.shape
    return Geometry(f"{case.net}.{case.name}", s.cin, s.h, s.w, s.cout, s.kh, s.kw, (s.stride, s.stride),
                    (s.padding, s.padding), (s.dilation, s.dilation), s.groups, case.activation, case.residual)


# --------------------------------------------------------------------------------------------- configs
def candidate_configs(g: Geometry, batch: int, dtype_mode: str, device: torch.device,
                      schedule: str = "data-parallel") -> list:
    """The triton.Configs the autotuner may choose for this launch (after pruning, deny-list included), for
    the data-parallel GEMM kernel or (`schedule="stream-K"`) the stream-K kernel."""
    import triton

    if g.depthwise:
        from fusedconv.kernels import depthwise as dw

        oh, ow = g.out_hw()
        cap_c = min(max(2, triton.next_power_of_2(g.cin)), 128)
        cap_p = min(max(16, triton.next_power_of_2(batch * oh * ow)), 1024)
        return dw.depthwise_configs(True, cap_c, cap_p)
    from fusedconv.kernels import configs as cfgs

    oh, ow = g.out_hw()
    dtype = torch.float32 if dtype_mode in ("tf32", "float32") else getattr(torch, dtype_mode)
    from fusedconv.kernels import conv_plan

    is_1x1 = g.kh == g.kw == 1 and g.padding == (0, 0)
    cin_g = g.cin // g.groups
    # the launcher's loop flags (conv_plan._plan): they cap the tiles pruning keeps
    small_cin = not is_1x1 and g.kh * g.kw > 1 and cin_g < conv_plan._FLAT_K_BELOW
    row_k = small_cin and g.kw * cin_g <= conv_plan._ROW_K_MAX_WIDTH
    named = {"x_ptr": torch.empty(0, dtype=dtype, device=device), "M": batch * oh * ow, "COUT_G": g.cout // g.groups,
             "CIN_G": cin_g, "KH": g.kh, "KW": g.kw, "IS_1X1": is_1x1, "FLAT_K": small_cin and not row_k,
             "ROW_K": row_k, "ROW_WIDTH": cfgs.row_width(g.kw, cin_g, g.kh) if row_k else 16,
             "HAS_RESIDUAL": g.residual}
    if schedule == "stream-K":
        return cfgs.prune_streamk_configs(cfgs.all_autotune_configs(), named)
    if schedule == "tma":
        return _tma_candidates(g, batch, dtype, device)
    if schedule == "tma-stream-K":
        return _tma_candidates(g, batch, dtype, device, streamk=True)
    return cfgs.prune_configs(cfgs.all_autotune_configs(), named)


def tma_kernel(g: Geometry, dtype: torch.dtype, device: torch.device) -> str | None:
    """"tma1x1" / "tmakxk" when the launcher may run this geometry through a TMA-descriptor kernel (the
    eligibility rules of conv_tma / conv_tma_kxk for a dense channels_last input and a packed weight: groups
    1, stride 1 or a strided unpadded 1x1, 16-byte channel rows, sm_90 or the CPU interpreter), else None."""
    strided_1x1 = g.kh == g.kw == 1 and g.padding == (0, 0) and g.stride != (1, 1)
    if g.groups != 1 or (g.stride != (1, 1) and not strided_1x1):
        return None
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return None
    esize = torch.empty(0, dtype=dtype).element_size()
    if (g.cin * esize) % 16 or (g.cout * esize) % 16:
        return None
    if g.kh == g.kw == 1 and not strided_1x1:
        return "tma1x1" if g.padding == (0, 0) else None
    return "tmakxk"  # stride-1 KxK, and strided 1x1 through the strided view


def _tma_candidates(g: Geometry, batch: int, dtype: torch.dtype, device: torch.device, streamk: bool = False) -> list:
    from types import SimpleNamespace

    from fusedconv.kernels import conv_tma, conv_tma_kxk, conv_tma_streamk

    kernel = tma_kernel(g, dtype, device)
    base = SimpleNamespace(base=torch.empty(0, dtype=dtype, device=device))
    oh, ow = g.out_hw()
    if streamk and kernel == "tma1x1":  # the stream-K kernels' own pruning: workspace fit, their deny-list
        return conv_tma_streamk._prune_1x1(conv_tma_streamk.configs_1x1(2) + conv_tma_streamk.configs_1x1(4),
                                           {"a_desc": base, "M": batch * oh * ow, "CIN": g.cin, "COUT": g.cout,
                                            "HAS_RESIDUAL": g.residual})
    if streamk and kernel == "tmakxk":
        return conv_tma_streamk._prune_kxk(conv_tma_streamk.configs_kxk(2) + conv_tma_streamk.configs_kxk(4),
                                           {"x_desc": base, "CIN": g.cin, "COUT": g.cout, "HAS_RESIDUAL": g.residual})
    if kernel == "tma1x1":  # the launcher's output is dense channels_last: it has an output descriptor (y_desc),
        # so the TMA-store-epilogue twins are candidates too (conv_tma.dp_configs), and the persistent configs
        return conv_tma._prune_tma(conv_tma.all_configs(),
                                   {"a_desc": base, "y_desc": base, "M": batch * oh * ow, "CIN": g.cin,
                                    "COUT": g.cout, "HAS_RESIDUAL": g.residual})
    if kernel == "tmakxk":  # likewise with its 4-D output descriptor
        return conv_tma_kxk._prune_kxk(conv_tma_kxk.dp_configs(2) + conv_tma_kxk.dp_configs(4),
                                       {"x_desc": base, "y_desc": base, "CIN": g.cin, "COUT": g.cout,
                                        "HAS_RESIDUAL": g.residual})
    return []


def config_label(cfg) -> str:
    kw = cfg.kwargs
    if "BLOCK_P" in kw:
        return f"P{kw['BLOCK_P']}xC{kw['BLOCK_C']} w{cfg.num_warps}"
    if "BLOCK_H" in kw:  # the TMA KxK kernel's box of output pixels
        return (f"{kw['BLOCK_H']}x{kw['BLOCK_W']}px x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps}"
                f"/s{cfg.num_stages}{' tma-store' if kw.get('TMA_EPILOGUE') else ''}")
    store = " tma-store" if kw.get("TMA_EPILOGUE") else ""  # the TMA kernels' bulk-tensor store epilogue
    persistent = f" persistent x{kw['PROGRAMS_PER_SM']}/SM" if kw.get("PERSISTENT") else ""  # conv_tma's
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps}/s{cfg.num_stages}{store}{persistent}"


# --------------------------------------------------------------------------------------------- checking
def _inputs(g: Geometry, batch: int, dtype: torch.dtype, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, g.cin, g.h, g.w, generator=gen)
    w = torch.randn(g.cout, g.cin // g.groups, g.kh, g.kw, generator=gen) / (g.cin // g.groups * g.kh * g.kw) ** 0.5
    gamma, beta = torch.rand(g.cout, generator=gen) + 0.5, torch.randn(g.cout, generator=gen) * 0.2
    mean, var = torch.randn(g.cout, generator=gen) * 0.2, torch.rand(g.cout, generator=gen) + 0.5
    oh, ow = g.out_hw()
    res = torch.randn(batch, g.cout, oh, ow, generator=gen) if g.residual else None
    cl = torch.channels_last
    x, w = x.to(dtype).to(device, memory_format=cl), w.to(dtype).to(device)
    res = None if res is None else res.to(dtype).to(device, memory_format=cl)
    return x, w, (gamma, beta, mean, var), res


def reference(g: Geometry, x, w, bn, res) -> torch.Tensor:
    """F.conv2d -> F.batch_norm (eval) -> [+ residual] -> activation, all in float64, on the rounded inputs."""
    from fusedconv.kernels.reference import apply_activation

    gamma, beta, mean, var = (t.double().to(x.device) for t in bn)
    y = F.conv2d(x.double(), w.double(), None, g.stride, g.padding, g.dilation, g.groups)
    y = F.batch_norm(y, mean, var, gamma, beta, training=False, eps=1e-5)
    if res is not None:
        y = y + res.double()
    return apply_activation(y, g.activation, 0.01 if g.activation == "leaky_relu" else 0.0)


def _path(g: Geometry) -> str:
    """The kernel loop variant the launcher picks (the deny-list's "path")."""
    if g.depthwise:
        return "dw"
    if g.kh == g.kw == 1 and g.padding == (0, 0):
        return "1x1"
    return "flatk" if g.kh * g.kw > 1 and g.cin // g.groups < 16 else "spatial"


def check_item(g: Geometry, batch: int, dtype_mode: str, device, configs=None, seed: int = 0, emit=None,
               schedule: str = "data-parallel", counts: list[int] | None = None) -> list[dict]:
    """One row per candidate config (and program count): errors vs float64 and pass/fail. `schedule`:
    "data-parallel" runs the configs through the one-program-per-tile kernel (split-K as the launcher picks
    it), "stream-K" / "tma-stream-K" through the pointer / TMA stream-K kernel at each of `counts` programs
    (plus, per config, a count that splits its units unevenly: `check_streamk.config_program_counts`; without
    `counts`: one program per SM), "tma" through the TMA-descriptor kernel where eligible, and
    "streamk-warmup" the launcher's own "streamk" warm-up candidate (the variant choice pinned to it; a row
    fails if the launcher does not offer it) — so every candidate of every kernel meets the float64 reference."""
    from bench import check_streamk
    from fusedconv.kernels import conv_bn_act, pack_weight

    dtype = torch.float32 if dtype_mode in ("tf32", "float32") else getattr(torch, dtype_mode)
    x, w, bn, res = _inputs(g, batch, dtype, device, seed)
    ref = reference(g, x, w, bn, res)
    gamma, beta, mean, var = bn
    scale = (gamma.double() / torch.sqrt(var.double() + 1e-5))
    shift = (beta.double() - mean.double() * scale)
    scale, shift = scale.float().to(device), shift.float().to(device)
    packed = pack_weight(w, groups=g.groups)
    act_param = 0.01 if g.activation == "leaky_relu" else 0.0
    norm_tol, max_tol = TOLERANCE[dtype_mode]
    ref_norm, ref_max = ref.norm().item(), ref.abs().max().item()
    rows = []
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = dtype_mode == "tf32"  # the launcher picks TF32 as cuDNN would
    try:
        streamk = schedule in ("stream-K", "tma-stream-K") and not g.depthwise
        tma = tma_kernel(g, dtype, device) if schedule in ("tma", "tma-stream-K") and not g.depthwise else None
        if g.depthwise:
            launch_schedule, kernel = {}, "depthwise"
        elif schedule == "tma-stream-K":
            launch_schedule, kernel = {"tma": True}, (tma + "_streamk" if tma else None)
        elif tma:
            launch_schedule, kernel = {"tma": True, "stream_k": False}, tma
        elif schedule == check_streamk.WARMUP_SCHEDULE:
            # the launcher's own schedule choice (stream_k None), its "streamk" candidate picked
            launch_schedule, kernel = {"tma": False, "cudnn": False}, "streamk"
        else:
            # the pointer kernel, pinned: tma=False so an sm_90 launch does not pick the TMA kernel instead
            launch_schedule = {"stream_k": True, "tma": False} if streamk else {"stream_k": False, "tma": False}
            kernel = "streamk" if streamk else "gemm"
        runs = []
        for cfg in configs if configs is not None else candidate_configs(g, batch, dtype_mode, device, schedule):
            if not streamk or kernel is None:
                runs.append((cfg, None, None))
                continue
            units = check_streamk.work_units(g, batch, cfg, kernel)
            for p in check_streamk.config_program_counts(counts, units) if counts else [True]:
                runs.append((cfg, p, units))
        for cfg, programs, units in runs:
            row = {"geometry": g.name, "batch": batch, "dtype": dtype_mode, "config": config_label(cfg),
                   "config_key": [*cfg.kwargs.values(), cfg.num_warps, cfg.num_stages],
                   "kernel": kernel, "path": _path(g), "schedule": schedule}
            call = dict(launch_schedule)
            if programs is not None:
                call["stream_k"] = programs
                row.update(programs=programs, units=units,
                           uneven=programs is not True and check_streamk.uneven(units, programs))
            start = time.perf_counter()
            try:
                poison = torch.full(ref.shape, float("nan"), dtype=dtype, device=device)
                del poison  # the allocator hands this NaN-filled block to the output next: unwritten shows
                warm = schedule == check_streamk.WARMUP_SCHEDULE
                with forced_config(cfg, g.depthwise, kernel), pinned_warmup(warm):
                    out = conv_bn_act(x, packed, scale, shift, stride=g.stride, padding=g.padding,
                                      dilation=g.dilation, groups=g.groups, activation=g.activation,
                                      act_param=act_param, residual=res, **call)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                diff = out.double() - ref
                finite = bool(torch.isfinite(out).all())
                rel = diff.norm().item() / max(ref_norm, 1e-30)
                worst = diff.abs().max().item() / max(ref_max, 1e-30)
                row.update(rel_error=rel, max_error=worst, finite=finite,
                           ok=finite and rel <= norm_tol and worst <= max_tol)
            except Exception as exc:  # a config that fails to compile or launch is a failed config
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            if emit is not None:
                emit(row)
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    return rows


# --------------------------------------------------------------------------------------------- worker
def worker(items_path: str, out_path: str, deadline: float) -> int:
    """Check the work items in `items_path` (JSON list) until `deadline` (time.time()); JSON lines to out_path."""
    with open(items_path) as f:
        items = json.load(f)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with open(out_path, "a") as out:
        def emit(row):
            out.write(json.dumps(row) + "\n")
            out.flush()

        for item in items:
            if time.time() > deadline:
                break
            g = Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in item["geometry"].items()})
            for schedule in item.get("schedules", ("data-parallel",) if g.depthwise else SCHEDULES):
                # the warm-up candidate runs the stream-K kernel's autotuned pick: one run, any config
                configs = candidate_configs(g, item["batch"], item["dtype"], device,
                                            "stream-K" if schedule == "streamk-warmup" else schedule)
                if item.get("max_configs"):
                    configs = configs[:item["max_configs"]]
                check_item(g, item["batch"], item["dtype"], device, configs, seed=item.get("seed", 0), emit=emit,
                           schedule=schedule, counts=item.get("streamk_counts"))
    return 0


def item(g: Geometry, batch: int, dtype_mode: str, max_configs: int | None = None, schedules=None,
         streamk_counts: list[int] | None = None) -> dict:
    """A work item: `schedules` (default: every schedule, data-parallel only for depthwise), the stream-K
    program counts (`check_streamk.rule_program_counts`; default one program per SM)."""
    out = {"geometry": asdict(g), "batch": batch, "dtype": dtype_mode, "max_configs": max_configs}
    if schedules is not None:
        out["schedules"] = list(schedules)
    if streamk_counts is not None:
        out["streamk_counts"] = list(streamk_counts)
    return out


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2], float(sys.argv[3])))
