"""Static evidence for the TMA-store epilogue: pointer-store vs TMA-store epilogue of the 1x1 TMA kernel, per layer.

For every stride-1 1x1 layer of the chosen nets (fp16, channels_last, batch 32: the layers `conv_tma`'s 2-D
descriptor kernel runs) it compiles, for sm_90, each config the data-parallel kernel's pruning keeps — the
pointer-store configs and their TMA_EPILOGUE twins (`conv_tma.dp_configs`) — exactly as the static suite
specialises them (`bench.static.tma_variants`), and reads from the cubin: registers, stack (spill) bytes, shared
memory, the K loop (`bench.sass.k_loop`) and the epilogue: the SASS instructions from the K loop's closing
branch to the first unpredicated EXIT after it, with its stores (STG: per-thread global stores, UTMASTG:
bulk-tensor stores) and shared-memory traffic (STS / LDS: the tile staged for the copy engine, or a layout change).

Static evidence only: fewer issued instructions do not say the epilogue is faster (the bulk store waits for the
copy engine); whether a twin pays is the GPU autotuner's call, per shape.

    python -m bench.static_tma_epilogue --out bench/results/static-sm90/2026-12-02-tma-epilogue.md
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import os
from collections import Counter

import torch

from bench import aot, sass, static
from bench.shapes import layer_cases

EPILOGUE_OPS = ("STG", "UTMASTG", "STS", "STSM", "LDS", "LDG", "UTMALDG", "BAR")
_CACHE = os.path.join(static.REPO_ROOT, ".cache", "static-tma-epilogue")


def epilogue_summary(instrs) -> dict | None:
    """Instructions from after the K loop's backward branch to the first unpredicated EXIT (inclusive), with
    opcode counts. (A predicated `@P EXIT` is not the end: the pointer-store epilogue's last store follows
    one.)"""
    loop = sass.k_loop(instrs)
    if loop is None or loop.get("unrolled"):
        return None
    end = next(i for i, ins in enumerate(instrs) if ins.address == loop["end_address"])
    stop = next((i for i in range(end + 1, len(instrs)) if instrs[i].base == "EXIT" and not instrs[i].predicated),
                len(instrs) - 1)
    body = instrs[end + 1:stop + 1]
    bases = Counter(ins.base for ins in body)
    return {"instructions": len(body), **{op: bases.get(op, 0) for op in EPILOGUE_OPS}}


def analyse(spec: dict) -> dict:
    """`aot.analyse_uncached`'s fields plus the epilogue summary (cached on disk by the spec key)."""
    path = os.path.join(_CACHE, f"{aot.spec_key(spec, 90)}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    try:
        cubin, ptx, shared = aot.compile_cubin(spec, 90)
        usage, text = aot.read_cubin(cubin)
        instrs = sass.parse(text)
        result = {"ok": True, "registers": usage.get("registers"), "stack_bytes": usage.get("stack"),
                  "local_bytes": usage.get("local"), "shared_bytes": shared, "mma": sass.mma_kind(instrs, ptx),
                  "async_loads": sass.async_loads(instrs, ptx), "k_loop": sass.k_loop(instrs),
                  "epilogue": epilogue_summary(instrs)}
    except Exception as exc:  # reported in the table
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-500:]}
    os.makedirs(_CACHE, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f)
    return result


_JOBS: dict = {}


def _job(key):
    return key, analyse(_JOBS[key])


def layer_variants(case, batch: int = 32, dtype: str = "float16") -> tuple[dict, list[dict]]:
    """(the launcher's schedule summary, the data-parallel TMA 1x1 kernel's variants) for one layer."""
    from fusedconv.kernels.epilogue import activation_id

    s = case.shape
    launch, _ = static.gemm_variants(case, batch, dtype, static.TARGETS[90]["sms"], 90)
    oh, ow = s.out_hw
    out = static._cl_strides(batch, s.cout, oh, ow)
    plan = {"flags": {"ACTIVATION": activation_id(case.activation), "HAS_RESIDUAL": case.residual, "IS_1X1": True},
            "res_stride": out, "y_stride": out}
    return launch, static.tma_variants(case, batch, dtype, plan, 0)


def run(nets=("resnet50", "mobilenet_v2"), jobs: int = 2) -> list[dict]:
    """One entry per stride-1 1x1 layer: the schedule and every kept config's row (`bench.static._variant_row`
    fields plus the epilogue)."""
    planned = []
    for net in nets:
        for case in layer_cases(net):
            s = case.shape
            if (s.kh, s.kw, s.stride, s.padding, s.groups) != (1, 1, 1, 0, 1) or (s.cin * 2) % 16 or (s.cout * 2) % 16:
                continue
            launch, variants = layer_variants(case)
            for v in variants:
                v["key"] = aot.spec_key(v["spec"], 90)
                _JOBS[v["key"]] = v["spec"]
            planned.append((case, launch, variants))
    ctx = multiprocessing.get_context("fork")  # the specs (JIT functions) are inherited, not pickled
    with futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        results = dict(pool.map(_job, list(_JOBS)))
    layers = []
    for case, launch, variants in planned:
        rows = []
        for v in variants:
            analysis = results[v["key"]]
            row = static._variant_row(v, analysis, 90)
            row["tma_store"] = "tma-store" in v["config"]
            row["epilogue"] = analysis.get("epilogue")
            rows.append(row)
        layers.append({"net": case.net, "layer": case.name, "shape": case.shape.label(), "count": case.count,
                       "residual": case.residual, "activation": case.activation, "schedule": launch["schedule"],
                       "rows": rows})
    return layers


def _cell(row, key):
    if row is None:
        return "—"
    if key == "epilogue":
        e = row.get("epilogue") or {}
        staged = e.get("STS", 0) + e.get("STSM", 0)
        return f"{e.get('instructions', '?')} ({e.get('STG', 0)} STG, {e.get('UTMASTG', 0)} UTMASTG, {staged} STS/STSM)"
    return str(row.get(key))


def markdown(layers: list[dict], command: str) -> str:
    """The report: per layer, the static-best TMA config (pointer-store epilogue) beside its TMA-store twin,
    and — where that tile has no twin — the best twinned tile's pair too."""
    lines = [
        "# TMA-store epilogue vs pointer-store epilogue — static evidence, sm_90 (2026-12-02)", "",
        "**Static evidence, not a measurement.** Compiled for sm_90 without a GPU (triton "
        f"{_triton_version()}); counts are SASS instructions issued once per output tile, not time. Whether a "
        "TMA-store twin pays is the GPU autotuner's call per shape (it times the twins against their "
        "pointer-store tiles).", "",
        f"Command: `{command}`", "",
        "Layers: every stride-1 1x1 conv of ResNet-50 and MobileNetV2 (fp16, channels_last, batch 32), the layers "
        "the 2-D descriptor kernel (`kernels/conv_tma.py`) runs. Per layer: the best TMA config of the "
        "pointer-store table by the static suite's rule (`bench.static_estimate.best_candidate`) and its "
        "TMA_EPILOGUE twin; where that tile has no twin (twins exist for tiles of >= 128x128 outputs before "
        "capping), the best twinned tile's pair as a second row. *epilogue*: SASS instructions from the K "
        "loop's closing branch to the first unpredicated EXIT (STG: per-thread global stores, UTMASTG: bulk-tensor "
        "stores, STS: "
        "shared-memory stores). *schedule*: the launcher's rule; on stream-K layers the data-parallel TMA kernel "
        "(and so the twin) is not offered, the TMA stream-K kernel runs the pointer-store epilogue.", "",
        "| layer | shape | sched. | tile | regs ptr / tma | spill B ptr / tma | smem B ptr / tma "
        "| epilogue ptr | epilogue tma |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for layer in layers:
        rows = layer["rows"]
        pointer = [r for r in rows if not r["tma_store"]]
        twins = {r["config"].replace(" tma-store", ""): r for r in rows if r["tma_store"]}
        best = static.best_candidate(pointer)
        pairs = []
        if best is not None:
            pairs.append((best, twins.get(best["config"])))
            if best["config"] not in twins and twins:
                twinned = [r for r in pointer if r["config"] in twins]
                alt = static.best_candidate(twinned) or (twinned[0] if twinned else None)
                if alt is not None:
                    pairs.append((alt, twins[alt["config"]]))
        summary += [(layer, ptr, tma, i == 0) for i, (ptr, tma) in enumerate(pairs) if tma is not None]
        for i, (ptr, tma) in enumerate(pairs):
            tile = ptr["config"].replace("tma ", "") + (" (best)" if i == 0 else "")
            name = f"{layer['net']} {layer['layer']}" + (" +res" if layer["residual"] else "")
            lines.append(f"| {name if i == 0 else ''} | {layer['shape'] if i == 0 else ''} | "
                         f"{layer['schedule'] if i == 0 else ''} | {tile} | "
                         f"{_cell(ptr, 'registers')} / {_cell(tma, 'registers')} | "
                         f"{_cell(ptr, 'stack_bytes')} / {_cell(tma, 'stack_bytes')} | "
                         f"{_cell(ptr, 'shared_bytes')} / {_cell(tma, 'shared_bytes')} | "
                         f"{_cell(ptr, 'epilogue')} | {_cell(tma, 'epilogue')} |")
    return "\n".join(lines + [""] + _reading(summary, len(layers))) + "\n"


def _reading(pairs, n_layers: int) -> list[str]:
    """What the table says, computed from it: the pairs' epilogue, register, spill and shared-memory deltas."""
    ok = [(ly, p, t, best) for ly, p, t, best in pairs if p.get("epilogue") and t.get("epilogue")]
    if not ok:
        return ["No pointer-store / TMA-store pair compiled."]
    ratios = [t["epilogue"]["instructions"] / p["epilogue"]["instructions"] for _, p, t, _ in ok]
    regs = [t["registers"] - p["registers"] for _, p, t, _ in ok]
    same_smem = sum(1 for _, p, t, _ in ok if p["shared_bytes"] == t["shared_bytes"])
    spills = sum(1 for _, p, t, _ in ok if p["stack_bytes"] or t["stack_bytes"])
    best_has_twin = sum(1 for _, _, _, best in ok if best)
    return [
        "## Reading (computed from the rows above)", "",
        f"- {len(ok)} pointer-store / TMA-store pairs over {n_layers} layers. The TMA-store epilogue issues "
        f"{min(ratios):.2f}x to {max(ratios):.2f}x the pointer-store epilogue's SASS instructions per tile "
        "(its per-thread STG stores become one UTMASTG).",
        f"- Registers: TMA-store minus pointer-store from {min(regs):+d} to {max(regs):+d}. Shared memory equal in "
        f"{same_smem} of {len(ok)} pairs (the compile metadata reports the same allocation: the staged output "
        "tile fits in what the K-loop pipeline reserves). Pairs with "
        f"a spill: {spills}.",
        f"- The static rule's best pointer-store TMA config has a twin on {best_has_twin} of {n_layers} layers; "
        "on the others (small tiles of narrow or late layers) the twins compete only through the GPU "
        "autotuner, which times every kept config per shape.",
        "- Not shown: the KxK kernel's twin (8x16-pixel x 128-channel patch; compile tests check its bulk store "
        "and 0 spills), and time — a bulk store still waits for the copy engine before the program exits, so "
        "fewer instructions need not mean a faster tile.",
    ]


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file (a .json with every row is written beside it)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    layers = run(jobs=args.jobs)
    command = f"python -m bench.static_tma_epilogue --out {args.out}"
    with open(args.out, "w") as f:
        f.write(markdown(layers, command))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(layers, f, indent=1, default=str)


if __name__ == "__main__":
    main()
