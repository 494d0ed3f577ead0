"""The static suite's time estimate and verdicts per layer: what a variant's schedule should cost, which variant
is a layer's best candidate, and whether that candidate fills the GPU as far as the layer's work allows.

Kept apart from `bench.static` (planning and compiling): these are the model's judgments on the compiled
variants, with the terms of the launcher's schedule rule (`kernels/schedule.py`) so the report and the rule
rate schedules alike.
"""

from __future__ import annotations

from fusedconv.kernels import schedule as sched

#: Per target: the device whose numbers rate it. sm_90: H200 (the GPU machine) with measured ceilings; sm_80:
#: A100 SXM datasheet. mma_flop_per_cycle: dense fp16 tensor-core FLOP per cycle per SM; smem_per_sm: shared
#: memory one SM gives its resident programs.
TARGETS = {
    90: {"device": "H200", "tflops": 790.0, "tb_s": 4.3, "source": "measured on the project's H200 (bf16 GEMM, copy)",
         "sms": 132, "mma_flop_per_cycle": 4096, "clock_ghz": 1.755, "smem_per_sm": 227 * 1024},
    80: {"device": "A100 SXM", "tflops": 312.0, "tb_s": 2.0, "source": "vendor datasheet (dense fp16)",
         "sms": 108, "mma_flop_per_cycle": 2048, "clock_ghz": 1.41, "smem_per_sm": 163 * 1024},
}


def estimated_us(variant: dict, issue_ratio: float, cap: int, analysis: dict | None = None) -> float | None:
    """A static time estimate of the variant under its schedule, with the terms of the schedule rule's model
    (`kernels/schedule.py`) at the target's clock, SM count and bandwidth:

    * K loop: waves of programs (ceil(programs / SMs)) x K steps per program x the cycles of one K step — its
      tensor-core cycles (2·BM·BN·BK / FLOP per cycle per SM) over the tile shape's efficiency
      (`schedule.tile_efficiency`), or its issue cycles when longer (issue ratio x tensor-core cycles), never
      under the latency floor (`schedule.LOAD_LATENCY_S` over the num_stages - 1 K steps the pipeline keeps in flight) —
      plus one load latency per tile a program starts;
    * memory: the layer's compulsory bytes (+ a split's fp32 workspace, written and read) at the target's
      bandwidth; the estimate is the larger of the two;
    * fixed: a split's epilogue launch, a stream-K tile's partial read-back (`schedule.streamk_fixup_s`) and
      its partial tiles' round trip through L2 (`schedule.streamk_slices`: segments, tiles touched per slice).

    Data-parallel programs share an SM as far as its shared memory and registers allow (from the compiled
    variant's `analysis`: `schedule.resident_programs`), and so do stream-K programs beyond the SM count:
    they run in rounds of SMs x residents, and co-resident programs share the tensor cores but overlap their load latency. Counts wasted tiles (tile tails, TMA boxes
    past the image edge) and idle SMs. A model, not a measurement."""
    if not variant.get("steps") or not variant["block"]:
        return None
    bm, bn, bk = variant["block"]
    target = TARGETS[cap]
    clock = target["clock_ghz"] * 1e9
    info = variant.get("schedule") or {"kind": "split_k", "split": 1, "k_tile": variant["steps"],
                                       "tile_count": variant["tiles"], "nbytes": 0}
    latency = sched.LOAD_LATENCY_S * clock
    mma = 2.0 * bm * bn * bk / target["mma_flop_per_cycle"]
    # Issue slots (the issue ratio is relative to the raw tensor-core cycles) and the operand feed of the tile
    # shape (`schedule.tile_efficiency`) are separate limits of one K step that overlap: the longer one counts.
    step_mma = max(mma / sched.tile_efficiency(bm, bn), mma * issue_ratio)
    floor = latency / max(1, variant["num_stages"] - 1)
    nbytes, fixed = float(info["nbytes"]), 0.0
    resident = 1
    if analysis and analysis.get("shared_bytes") and analysis.get("registers"):
        resident = sched.resident_programs(analysis["shared_bytes"], analysis["registers"],
                                           variant["num_warps"], target["smem_per_sm"])
    if info["kind"] == "stream_k":
        # the kernel's slicing of the layer's units over its programs (`schedule.streamk_slices`)
        k_tile = info["k_tile"]
        # programs: a variant with more programs than units slices exactly as one with as many as units
        slices = sched.streamk_slices(info["tile_count"] * k_tile, k_tile, info.get("programs", variant["tiles"]))
        per_sm = min(resident, -(-slices["busy"] // target["sms"]))  # programs beyond the SMs share them
        rounds = -(-slices["busy"] // (target["sms"] * per_sm))
        loop = rounds * (slices["per_prog"] * max(step_mma * per_sm, floor) + slices["touched"] * latency)
        concurrent = max(target["sms"], min(slices["busy"], target["sms"] * per_sm))
        fixed = sched.streamk_fixup_s(bm, bn, k_tile, slices["per_prog"], concurrent) * clock
        partials = 2.0 * slices["segments"] * bm * bn * 4  # written once, read back once, through L2
        partials_l2 = partials / sched._L2_BYTES_PER_S * clock
    else:
        partials_l2 = 0.0
        per_sm = min(resident, -(-variant["tiles"] // target["sms"]))
        rounds = -(-variant["tiles"] // (target["sms"] * per_sm))
        loop = rounds * (variant["steps"] * max(step_mma * per_sm, floor) + latency)
        if info["split"] > 1:
            m_out = info["tile_count"] // info["split"] * bm * bn  # M x N, tile tails included
            nbytes += 2.0 * info["split"] * m_out * 4
            fixed = sched.EPILOGUE_LAUNCH_S * clock
    memory = nbytes / (target["tb_s"] * 1e12) * clock + partials_l2
    return round((max(loop, memory) + fixed) / (target["clock_ghz"] * 1e3), 2)


def waves_status(launch: dict, best: dict | None) -> str | None:
    """How the best candidate fills the GPU: "full" (>= 1 wave of programs), "at max" (under one wave, but at
    least `schedule.FILL_FRACTION` of what the layer's work units allow: `achievable_waves`), "short"
    (neither), None for layers without a rated GEMM candidate (depthwise)."""
    if launch.get("kernel") != "gemm" or best is None:
        return None
    if best["waves"] >= 1.0:
        return "full"
    return "at max" if sched.fills(best["waves"], launch["achievable_waves"]) else "short"


def best_candidate(rows: list[dict]) -> dict | None:
    """Among compiled, spill-free tensor-core variants, the lowest `estimated_us` (of equal ones the one keeping
    more SMs busy, as the schedule rule breaks ties, then the lower issue ratio); None when there is none."""
    ok = [r for r in rows if r.get("ok") and r.get("issue_ratio") is not None and not r.get("stack_bytes")
          and r.get("mma") in ("wgmma", "mma.sync")]
    return min(ok, key=lambda r: (r.get("est_us") or float("inf"), -min(1.0, r["waves"]), r["issue_ratio"],
                                  -r["tiles"])) if ok else None
