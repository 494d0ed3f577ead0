"""The static suite: what the compiler made of every kernel variant the autotuner may pick, without a GPU.

`python -m bench --suite static` takes the bench layer shapes (ResNet-50, MobileNetV2, RepVGG-A0; fp16
channels_last, batch 32 and 1), plans each launch exactly as the launcher does (split-K for the target's SM
count, int64 offsets, EVEN_K / FLAT_K / IS_1X1 flags, packed weight strides), lists the configs the autotuner
keeps after pruning, and compiles each specialisation for sm_90 and sm_80 (`bench.aot`). Per variant it records
registers, stack (spill) bytes, shared memory, warps / stages, the MMA kind, whether global loads are
asynchronous, the K-loop SASS instruction count and the issue ratio (`bench.sass.issue_ratio`); per layer the
roofline bound and the best candidate: the lowest issue ratio among spill-free tensor-core variants.

Results: `bench/results/static-sm90/<date>.{json,md}` and `static-sm80/`. Analyses are cached on disk
(`.cache/static/`, keyed by triton version, kernel source and specialisation), so a rerun takes seconds.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import sys
import time

import torch

from bench import aot, metrics, sass
from bench.shapes import NETS, LayerCase, layer_cases
# re-exported: callers and tests reach these through bench.static
from bench.static_estimate import TARGETS, best_candidate, estimated_us, waves_status  # noqa: F401
from fusedconv.kernels import schedule as sched

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(REPO_ROOT, ".cache", "static")

_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


# --------------------------------------------------------------------------------------------- planning
def _packed_weight_strides(shape) -> tuple[int, ...]:
    from fusedconv.kernels.packing import pack_weight

    w = torch.empty(shape.cout, shape.cin // shape.groups, shape.kh, shape.kw, device="meta")
    return tuple(pack_weight(w, groups=shape.groups).stride())


def _cl_strides(n, c, h, w) -> tuple[int, int, int, int]:
    return (h * w * c, 1, w * c, c)


def gemm_variants(case: LayerCase, batch: int, dtype: str, sms: int, cap: int = 90) -> tuple[dict, list[dict]]:
    """(launch summary, [variant]) for a non-depthwise layer: one variant per config the autotuner keeps."""
    import importlib

    from fusedconv.kernels import configs as cfgs

    # The package binds the launcher function over its module's name: import the module itself.
    cba = importlib.import_module("fusedconv.kernels.conv_bn_act")

    s, tdtype = case.shape, getattr(torch, dtype)
    x_shape = (batch, s.cin, s.h, s.w)
    w_shape = (s.cout, s.cin // s.groups, s.kh, s.kw)
    oh, ow = s.out_hw
    out_shape = (batch, s.cout, oh, ow)
    cin_g, cout_g, m = s.cin // s.groups, s.cout // s.groups, batch * oh * ow
    # The launcher's schedule choice, with the target's SM count instead of the local device's.
    if s.kh * s.kw > 1 and cin_g < 16:
        k_iters = -(-(s.kh * s.kw * cin_g) // 64)
    else:
        k_iters = s.kh * s.kw * -(-cin_g // 64)
    nbytes = sched.layer_bytes(m, cout_g, s.groups, k_iters, input_k=cin_g, elem_bytes=tdtype.itemsize)
    kind, value = cfgs.choose_schedule(m, cout_g, s.groups, k_iters, sms, nbytes=nbytes)
    # The rule's own view: its chosen option's modelled time against the fastest schedule that fills the GPU.
    options = sched.schedule_options(m, cout_g, s.groups, k_iters, sms, nbytes=nbytes)
    reach = sched.achievable_waves(m, cout_g, s.groups, k_iters, sms)
    chosen = sched.pick(options, reach)
    filling = [o for o in options if sched.fills(o["waves"], reach)]
    rule_fill_cost = round(min(o["time"] for o in filling) / chosen["time"] - 1, 3) if filling else None
    # What a GPU decides at warm-up where the rule's pick does not fill: the launcher also times the filling
    # stream-K schedule (schedule.schedule_candidates; the same function the launcher's plan calls).
    warmup_streamk = sched.filling_streamk(m, cout_g, s.groups, k_iters, sms, nbytes=nbytes)
    split_k, stream_k = (1, value) if kind == "stream_k" else (value, False)
    res_meta = (out_shape, _cl_strides(*out_shape), tdtype) if case.residual else None
    plan = cba._plan(x_shape, _cl_strides(*x_shape), tdtype, torch.device("cpu"), w_shape,
                     _packed_weight_strides(s), tdtype, (s.cout,), (s.cout,), res_meta, (s.stride, s.stride),
                     (s.padding, s.padding), (s.dilation, s.dilation), s.groups, case.activation, 0.0, split_k,
                     False, True, stream_k)
    flags = plan["flags"]
    named = {"x_ptr": torch.empty(0, dtype=tdtype, device="meta"), "M": m, "COUT_G": cout_g, "CIN_G": cin_g,
             "KH": s.kh, "KW": s.kw, "FLAT_K": flags["FLAT_K"], "ROW_K": flags["ROW_K"],
             "ROW_WIDTH": flags["ROW_WIDTH"], "IS_1X1": flags["IS_1X1"], "HAS_RESIDUAL": flags["HAS_RESIDUAL"]}
    if stream_k:
        fn = cba._conv_streamk_kernel
        kept = cfgs.prune_streamk_configs(cfgs.all_autotune_configs(), named)
        base = cfgs.streamk_kernel_signature(_SHORT[dtype], flags["USE_INT64"])
        flags = {**{k: v for k, v in flags.items() if k != "SPLIT_K"}, "WS_TILE": cfgs.STREAMK_MAX_TILE}
    else:
        fn = cba._conv_gemm_kernel
        kept = cfgs.prune_configs(cfgs.all_autotune_configs(), named)
        base = cfgs._kernel_signature(_SHORT[dtype], flags["USE_INT64"])
    int_names = fn.arg_names[fn.arg_names.index("N"):fn.arg_names.index("N") + len(plan["int_args"])]
    values = dict(zip(int_names, plan["int_args"]))
    if stream_k:
        values["GROUPS"] = s.groups
    path = "1x1" if flags["IS_1X1"] else ("flatk" if flags["FLAT_K"] else f"{s.kh}x{s.kw}")
    nbytes_roof = metrics.conv_bytes(s, batch, dtype, residual=case.residual)
    variants = []
    for cfg in kept:
        kw = cfg.kwargs
        spec = aot.spec_from_args(fn, base, values, {**flags, **kw}, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages)
        tiles = -(-m // kw["BLOCK_M"]) * -(-cout_g // kw["BLOCK_N"]) * s.groups * split_k
        k_steps = _k_steps(s, cin_g, kw["BLOCK_K"], flags)
        steps = -(-k_steps // split_k)
        sched_info = {"kind": "split_k", "split": split_k, "k_tile": k_steps, "tile_count": tiles,
                      "nbytes": nbytes_roof}
        if stream_k:  # persistent programs, each with a balanced share of all tiles' K iterations
            sched_info["kind"], sched_info["programs"] = "stream_k", stream_k
            slices = sched.streamk_slices(tiles * k_steps, k_steps, stream_k)  # the kernel's slicing
            steps, tiles = slices["per_prog"], slices["busy"]  # longest slice; programs with work
        variants.append({"schedule": sched_info,
                         "config": f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps}/s{cfg.num_stages}",
                         "block": (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]), "num_warps": cfg.num_warps,
                         "num_stages": cfg.num_stages, "tiles": tiles, "steps": steps, "spec": spec,
                         "family": "pointer"})
    if cap >= 90 and split_k == 1:
        # TMA bulk copies are Hopper's (the launcher never runs these kernels on sm_80). The launcher offers
        # them under the layer's schedule: data-parallel, or stream-K (conv_tma_streamk); split-K layers run
        # the pointer kernel only.
        variants += tma_variants(case, batch, dtype, plan, stream_k or 0)
    # Waves of the plain data-parallel grid of 128x128 tiles (what every layer launched before schedules).
    dp_waves = round(-(-m // 128) * -(-cout_g // 128) * s.groups / sms, 2)
    schedule = f"stream-K {stream_k}" if stream_k else (f"split-K {split_k}" if split_k > 1 else "data-parallel")
    launch = {"kernel": "gemm", "path": path, "split_k": split_k, "stream_k": stream_k or 0, "schedule": schedule,
              "dp_waves_128": dp_waves, "achievable_waves": round(sched.achievable_waves(m, cout_g, s.groups,
                                                                                        k_iters, sms), 2),
              "rule_fill_cost": rule_fill_cost, "warmup_streamk": warmup_streamk,
              "rule_tile": list(chosen["tile"]), "rule_fills": sched.fills(chosen["waves"], reach), "M": m, "N": cout_g, "K": cin_g * s.kh * s.kw,
              "use_int64": flags["USE_INT64"], "even_k": flags["EVEN_K"]}
    return launch, variants


def _k_steps(s, cin_g: int, block_k: int, flags: dict) -> int:
    """K steps of one output tile for the pointer kernel's loop shape and this BLOCK_K."""
    if flags["IS_1X1"]:
        return -(-cin_g // block_k)
    if flags["ROW_K"]:  # whole kernel rows per step (configs.row_k_rows)
        from fusedconv.kernels.configs import row_k_rows

        return -(-s.kh // row_k_rows(s.kh, s.kw, cin_g))
    if flags["FLAT_K"]:
        return -(-(s.kh * s.kw * cin_g) // block_k)
    return s.kh * s.kw * -(-cin_g // block_k)


def tma_variants(case: LayerCase, batch: int, dtype: str, plan: dict, stream_k: int = 0) -> list[dict]:
    """The TMA-descriptor kernel's candidates for a layer the launcher may run through it on sm_90 (dense
    channels_last input, packed weight, groups 1, stride 1 — or a strided unpadded 1x1 through the strided
    view, `conv_tma_kxk.strided_1x1_view` — and 16-byte channel rows: `conv_tma.tma_1x1_eligible` /
    `conv_tma_kxk.tma_kxk_eligible`), one per config its pruning keeps; [] where the pointer kernel is the
    only path. With `stream_k` programs (the layer's schedule), the stream-K forms of `conv_tma_streamk`
    with their pruning (tiles that fit the workspace slots)."""
    from types import SimpleNamespace

    from fusedconv.kernels import configs as cfgs
    from fusedconv.kernels import conv_tma, conv_tma_kxk, conv_tma_streamk
    from fusedconv.kernels.schedule import STREAMK_MAX_TILE

    s, t = case.shape, _SHORT[dtype]
    esize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    strided_1x1 = s.kh == s.kw == 1 and s.padding == 0 and s.stride > 1
    if s.groups != 1 or (s.stride != 1 and not strided_1x1) or (s.cin * esize) % 16 or (s.cout * esize) % 16:
        return []
    oh, ow = s.out_hw
    m = batch * oh * ow
    flags = plan["flags"]
    base = SimpleNamespace(base=torch.empty(0, dtype=getattr(torch, dtype), device="meta"))
    res_stride, y_stride = plan["res_stride"], plan["y_stride"]
    common = dict(ACTIVATION=flags["ACTIVATION"], HAS_RESIDUAL=flags["HAS_RESIDUAL"], INPUT_PRECISION="ieee")
    out = []
    if stream_k:
        common["WS_TILE"] = STREAMK_MAX_TILE
    if flags["IS_1X1"] and not strided_1x1:
        fn = conv_tma_streamk._conv1x1_tma_streamk_kernel if stream_k else conv_tma._conv1x1_tma_kernel
        prune = conv_tma_streamk._prune_1x1 if stream_k else conv_tma._prune_tma
        # the data-parallel kernel's candidates include its TMA-store-epilogue twins (the launcher's output is
        # dense channels_last: it has an output descriptor); the stream-K kernel has none
        table = conv_tma_streamk.configs_1x1(esize) if stream_k else conv_tma.dp_configs(esize)
        kept = prune(table, {"a_desc": base, "y_desc": None if stream_k else base, "M": m, "CIN": s.cin,
                             "COUT": s.cout, "HAS_RESIDUAL": case.residual})
        ints = dict(zip(("M", "CIN", "COUT", "OH", "OW", "srn", "src", "srh", "srw", "syn", "syc", "syh", "syw"),
                        (m, s.cin, s.cout, oh, ow, *res_stride, *y_stride)))
    else:  # stride-1 KxK, or a strided 1x1 through the descriptor on the strided view (conv_tma_kxk)
        fn = conv_tma_streamk._conv_kxk_tma_streamk_kernel if stream_k else conv_tma_kxk._conv_kxk_tma_kernel
        prune = conv_tma_streamk._prune_kxk if stream_k else conv_tma_kxk._prune_kxk
        table = conv_tma_streamk.configs_kxk(esize) if stream_k else conv_tma_kxk.dp_configs(esize)
        kept = prune(table, {"x_desc": base, "y_desc": None if stream_k else base, "CIN": s.cin, "COUT": s.cout,
                             "HAS_RESIDUAL": case.residual})
        ints = dict(zip(("N", "OH", "OW", "CIN", "COUT", "pad_h", "pad_w", "dil_h", "dil_w", "srn", "src", "srh",
                         "srw", "syn", "syc", "syh", "syw"),
                        (batch, oh, ow, s.cin, s.cout, s.padding, s.padding, s.dilation, s.dilation, *res_stride,
                         *y_stride)))
        common.update(KH=s.kh, KW=s.kw)
    for cfg in kept:
        kw = {k: v for k, v in cfg.kwargs.items()}
        if "a_desc" in fn.arg_names:  # the 1x1 GEMM kernels (data-parallel or stream-K)
            bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
            descs = {"a_desc": f"tensordesc<{t}[{bm},{bk}]>", "b_desc": f"tensordesc<{t}[{bk},{bn}]>"}
            if "y_desc" in fn.arg_names:  # output / residual descriptors (conv_tma.conv1x1_tma_launch)
                descs["y_desc"] = descs["r_desc"] = f"tensordesc<{t}[{bm},{bn}]>"
            tiles = -(-m // bm) * -(-s.cout // bn)
            label = (f"tma {bm}x{bn}x{bk} w{cfg.num_warps}/s{cfg.num_stages}"
                     f"{' tma-store' if kw.get('TMA_EPILOGUE') else ''}")
        else:
            bh, bw, bn, bk = kw["BLOCK_H"], kw["BLOCK_W"], kw["BLOCK_N"], kw["BLOCK_K"]
            bm = bh * bw
            descs = {"x_desc": f"tensordesc<{t}[1,{bh},{bw},{bk}]>", "w_desc": f"tensordesc<{t}[1,{bk},{bn}]>"}
            if "y_desc" in fn.arg_names:  # output / residual descriptors (conv_tma_kxk.conv_kxk_tma_launch)
                descs["y_desc"] = descs["r_desc"] = f"tensordesc<{t}[1,{bh},{bw},{bn}]>"
            tiles = batch * -(-oh // bh) * -(-ow // bw) * -(-s.cout // bn)
            label = (f"tma {bh}x{bw}px x{bn}x{bk} w{cfg.num_warps}/s{cfg.num_stages}"
                     f"{' tma-store' if kw.get('TMA_EPILOGUE') else ''}")
        # the kernel's own defaults for constexprs the config leaves out (the data-parallel kernels' TMA_EPILOGUE
        # False; conv_tma's PERSISTENT False: its persistent configs are left out of this report, whose wave model
        # has one program per tile)
        kw = {**cfgs.constexpr_defaults(fn), **kw}
        if "y_desc" in fn.arg_names:
            if not case.residual:
                kw["r_desc"] = None  # no residual: the launcher passes no residual descriptor
        sig = {**descs, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": f"*{t}", "y_ptr": f"*{t}",
               "ws_ptr": "*fp32", "count_ptr": "*i32", **{name: "i32" for name in ints}, "ACT_PARAM": "fp32"}
        constexprs = {**common, **kw}
        sig.update({name: "constexpr" for name in constexprs})
        sig = {name: sig[name] for name in fn.arg_names}  # parameter order
        spec = aot.spec_from_args(fn, sig, ints, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        steps = s.kh * s.kw * -(-s.cin // bk)
        sched_info = {"kind": "split_k", "split": 1, "k_tile": steps, "tile_count": tiles,
                      "nbytes": metrics.conv_bytes(s, batch, dtype, residual=case.residual)}
        if stream_k:  # as the pointer stream-K variants: each program's share of all tiles' K steps
            sched_info["kind"], sched_info["programs"] = "stream_k", stream_k
            slices = sched.streamk_slices(tiles * steps, steps, stream_k)
            steps, tiles = slices["per_prog"], slices["busy"]
        out.append({"schedule": sched_info,
                    "config": label, "block": (bm, bn, bk), "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages, "tiles": tiles, "steps": steps, "spec": spec, "family": "tma"})
    return out


def depthwise_variants(case: LayerCase, batch: int, dtype: str, sms: int) -> tuple[dict, list[dict]]:
    """(launch summary, [variant]) for a depthwise layer: the direct kernel's configs for this layer's caps."""
    import triton

    from fusedconv.kernels import depthwise as dw
    from fusedconv.kernels.epilogue import activation_id

    s = case.shape
    oh, ow = s.out_hw
    c, m = s.cin, batch * oh * ow
    x_stride = _cl_strides(batch, c, s.h, s.w)
    y_stride = _cl_strides(batch, c, oh, ow)
    w_strides = _packed_weight_strides(s)
    values = dict(zip(("M", "C", "H", "W", "OH", "OW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"),
                      (m, c, s.h, s.w, oh, ow, s.stride, s.stride, s.padding, s.padding, s.dilation, s.dilation)))
    values.update(zip(("sxn", "sxc", "sxh", "sxw"), x_stride))
    values.update(swc=w_strides[0], swh=w_strides[2], sww=w_strides[3])
    values.update(zip(("srn", "src", "srh", "srw"), y_stride))
    values.update(zip(("syn", "syc", "syh", "syw"), y_stride))
    use_int64 = max(batch * c * s.h * s.w, batch * c * oh * ow, m + 1024) >= dw.INT64_THRESHOLD
    consts = {"KH": s.kh, "KW": s.kw, "ACTIVATION": activation_id(case.activation), "HAS_RESIDUAL": case.residual,
              "USE_INT64": use_int64, "PIXELS_INNER": False}
    cap_c = min(max(2, triton.next_power_of_2(c)), 128)
    cap_p = min(max(16, triton.next_power_of_2(m)), 1024)
    base = dw._signature(_SHORT[dtype], use_int64, ())
    variants = []
    for cfg in dw.depthwise_configs(True, cap_c, cap_p):
        kw = cfg.kwargs
        spec = aot.spec_from_args(dw._depthwise_kernel, base, values, {**consts, **kw}, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages)
        variants.append({"config": f"P{kw['BLOCK_P']}xC{kw['BLOCK_C']} w{cfg.num_warps}", "block": None,
                         "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                         "tiles": -(-m // kw["BLOCK_P"]) * -(-c // kw["BLOCK_C"]), "spec": spec})
    return {"kernel": "depthwise", "path": "dw", "split_k": 1, "M": m, "N": c, "K": s.kh * s.kw,
            "use_int64": use_int64, "even_k": None}, variants


def roofline(case: LayerCase, batch: int, dtype: str, target: dict) -> dict:
    """The layer's compulsory FLOPs and bytes against the target's ceilings: which one bounds it, and the floor."""
    flops = metrics.conv_flops(case.shape, batch)
    nbytes = metrics.conv_bytes(case.shape, batch, dtype, residual=case.residual)
    t_compute = flops / (target["tflops"] * 1e12)
    t_memory = nbytes / (target["tb_s"] * 1e12)
    return {"gflop": flops / 1e9, "mbytes": nbytes / 1e6, "intensity": flops / nbytes,
            "t_compute_us": t_compute * 1e6, "t_memory_us": t_memory * 1e6,
            "bound": "compute" if t_compute >= t_memory else "memory"}


# --------------------------------------------------------------------------------------------- running
_WORKER_SPECS: dict = {}


def _job_init(jobs: dict) -> None:
    _WORKER_SPECS.update(jobs)


def _analyse_job(key: str, cap: int, cache_dir: str) -> tuple[str, dict]:
    """Worker side: the specs were handed to the pool's initializer and inherited through fork (not pickled)."""
    return key, aot.analyse(_WORKER_SPECS[key], cap, cache_dir)


def _plan_layers(nets, batches, dtype, cap, max_layers=None, layers=None):
    target = TARGETS[cap]
    planned = []
    for net in nets:
        cases = layer_cases(net)
        if layers:
            cases = [c for c in cases if c.name in layers]
        if max_layers:
            cases = cases[:max_layers]
        for case in cases:
            for batch in batches:
                if case.shape.depthwise:
                    launch, variants = depthwise_variants(case, batch, dtype, target["sms"])
                else:
                    launch, variants = gemm_variants(case, batch, dtype, target["sms"], cap)
                planned.append((case, batch, launch, variants))
    return planned


def analyse_all(specs: dict, cap: int, cache_dir: str | None, jobs: int, progress=None) -> dict:
    """{spec key: analysis} for every spec, compiled in `jobs` worker processes (cache hits in this one)."""
    results, todo = {}, {}
    for key, spec in specs.items():
        path = os.path.join(cache_dir, f"{aot.spec_key(spec, cap)}.json") if cache_dir else None
        if path and os.path.isfile(path):
            results[key] = aot.analyse(spec, cap, cache_dir)
        else:
            todo[key] = spec
    if not todo:
        return results
    if jobs <= 1:
        for key, spec in todo.items():
            results[key] = aot.analyse(spec, cap, cache_dir)
            if progress:
                progress(key)
        return results
    ctx = multiprocessing.get_context("fork")  # the specs (JIT functions) are inherited, not pickled
    with futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_job_init, initargs=(todo,)) as pool:
        pending = [pool.submit(_analyse_job, key, cap, cache_dir) for key in todo]
        for done in futures.as_completed(pending):
            key, result = done.result()
            results[key] = result
            if progress:
                progress(key)
    return results


def _variant_row(variant: dict, analysis: dict, cap: int) -> dict:
    row = {k: variant[k] for k in ("config", "num_warps", "num_stages", "tiles")}
    row["family"] = variant.get("family", "pointer")
    row["steps"] = variant.get("steps")
    row["waves"] = round(variant["tiles"] / TARGETS[cap]["sms"], 2)
    row.update({k: analysis.get(k) for k in ("ok", "registers", "stack_bytes", "local_bytes", "shared_bytes", "mma",
                                             "async_loads", "spill_instructions", "compile_s")})
    if not analysis.get("ok"):
        row["error"] = analysis.get("error")
        return row
    loop = analysis.get("k_loop")
    row["k_loop"] = loop
    row["loop_instructions"] = loop["instructions"] if loop else None
    if loop and variant["block"]:
        bm, bn, bk = variant["block"]
        row["issue_ratio"] = round(sass.issue_ratio(loop["instructions"], variant["num_warps"], bm, bn, bk,
                                                    TARGETS[cap]["mma_flop_per_cycle"]), 3)
        row["est_us"] = estimated_us(variant, row["issue_ratio"], cap, analysis)
    else:
        row["issue_ratio"] = None
    return row


def run(cap: int, *, nets=NETS, batches=(32, 1), dtype="float16", cache_dir=DEFAULT_CACHE, jobs=2,
        max_layers=None, layers=None, progress=None) -> dict:
    """The static report for sm_`cap` as a JSON-able dict (see the module docstring)."""
    if cap not in TARGETS:
        raise ValueError(f"cap: expected one of {sorted(TARGETS)}, got {cap!r}")
    start = time.perf_counter()
    planned = _plan_layers(nets, batches, dtype, cap, max_layers, layers)
    specs = {}
    for _, _, _, variants in planned:
        for v in variants:
            v["key"] = aot.spec_key(v["spec"], cap)
            specs[v["key"]] = v["spec"]
    analyses = analyse_all(specs, cap, cache_dir, jobs, progress)
    layers_out = []
    for case, batch, launch, variants in planned:
        rows = [_variant_row(v, analyses[v["key"]], cap) for v in variants]
        best = best_candidate(rows)
        per_family = {fam: best_candidate([r for r in rows if r["family"] == fam]) for fam in ("pointer", "tma")}
        launch = {**launch, **{f"best_{fam}": (b["config"], b["issue_ratio"], b["est_us"]) if b else None
                               for fam, b in per_family.items()},
                  "tma_candidates": sum(1 for r in rows if r["family"] == "tma")}
        launch["waves_status"] = waves_status(launch, best)
        if launch["waves_status"] == "short":  # what filling would cost: the best candidate that fills
            filling = best_candidate([r for r in rows if waves_status(launch, r) != "short"])
            launch["best_filling"] = (filling["config"], filling["waves"], filling["est_us"]) if filling else None
        layers_out.append({"net": case.net, "layer": case.name, "shape": case.shape.label(), "batch": batch,
                           "activation": case.activation, "residual": case.residual, "count": case.count,
                           **launch, "roofline": roofline(case, batch, dtype, TARGETS[cap]),
                           "best": best["config"] if best else None, "variants": rows})
    compiled = sum(1 for a in analyses.values() if not a.get("cached"))
    return {"target": f"sm_{cap}", "rated_against": TARGETS[cap], "dtype": dtype, "layout": "channels_last",
            "batches": list(batches), "nets": list(nets), "distinct_kernels": len(specs),
            "compiled_now": compiled, "failed": sum(1 for a in analyses.values() if not a.get("ok")),
            "layers": layers_out, "elapsed_s": round(time.perf_counter() - start, 1)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
