"""Writing the static suite's results: `bench/results/static-sm<cap>/<date>.{json,md}`, one row per layer.

`run_suite(args)` is what `python -m bench --suite static` calls: for each target it runs `bench.static.run`,
stamps the environment (date, triton / torch versions, git commit, the command) and writes the JSON and the
markdown table.
"""

from __future__ import annotations

import os
import sys

from bench import env as bench_env
from bench import report, static


def _fmt(value, spec="") -> str:
    if value is None:
        return "—"
    return format(value, spec)


def _layer_row(layer: dict) -> list[str]:
    best = next((v for v in layer["variants"] if v["config"] == layer["best"]), None)
    shown = best or (layer["variants"][0] if layer["variants"] else {})
    roof = layer["roofline"]
    spills = [v for v in layer["variants"] if v.get("stack_bytes")]
    failed = [v for v in layer["variants"] if not v.get("ok")]
    note = []
    if not best:
        note.append("no spill-free MMA variant" if layer["kernel"] == "gemm" else "direct kernel: first config")
    if spills:
        note.append(f"{len(spills)} spill ({max(v['stack_bytes'] for v in spills)} B max)")
    if failed:
        note.append(f"{len(failed)} FAILED")
    def fam(key):
        b = layer.get(key)
        return f"{b[0]} ({b[1]:.2f}, {_fmt(b[2] if len(b) > 2 else None, '.1f')} µs)" if b else "—"

    return [layer["net"], f"{layer['layer']}" + (f" (x{layer['count']})" if layer["count"] > 1 else ""),
            layer["shape"], layer["path"], f"{layer['M']}/{layer['N']}/{layer['K']}",
            f"{roof['bound']} ({roof['intensity']:.0f})", f"{max(roof['t_compute_us'], roof['t_memory_us']):.1f}",
            str(len(layer["variants"])), (layer["best"] or f"({shown.get('config', '—')})"),
            _fmt(shown.get("registers")), _fmt(shown.get("stack_bytes")),
            _fmt(None if shown.get("shared_bytes") is None else shown["shared_bytes"] / 1024, ".0f"),
            _fmt(shown.get("mma")), _fmt(shown.get("async_loads")), _fmt(shown.get("loop_instructions")),
            _fmt(shown.get("issue_ratio"), ".2f"), _fmt(shown.get("est_us"), ".1f"), layer.get("schedule", "—"),
            f"{_fmt(layer.get('dp_waves_128'), '.2f')} → {_fmt(shown.get('waves'), '.2f')} "
            f"(max {_fmt(layer.get('achievable_waves'), '.2f')}{', ' + layer['waves_status'] if layer.get('waves_status') else ''})",
            fam("best_pointer"), fam("best_tma") if layer["kernel"] == "gemm" else "—", "; ".join(note)]


HEADERS = ["net", "layer", "shape", "path", "M/N/K", "bound (FLOP/B)", "floor µs", "cands", "best candidate",
           "regs", "spill B", "smem KB", "MMA", "loads", "loop insns", "issue ratio", "est µs", "schedule",
           "waves (128² grid → best (achievable, status))", "best pointer (ratio, est)", "best TMA (ratio, est)", "notes"]


def markdown(result: dict) -> str:
    env, rated = result["environment"], result["rated_against"]
    lines = [f"# Static kernel report, {result['target']} — {env['date']}", "",
             f"triton {env['triton']}, torch {env['torch']}, commit {env['git_commit']}; {result['dtype']} "
             f"{result['layout']}; nets {', '.join(result['nets'])}; batch {', '.join(map(str, result['batches']))}; "
             f"`{env['command']}`; {result['distinct_kernels']} distinct kernels "
             f"({result['compiled_now']} compiled in this run, {result['failed']} failed), {result['elapsed_s']} s.", "",
             "Compiled ahead of time (no GPU): per layer the configs the autotuner keeps after pruning, each "
             "specialised as a real launch would be. **est µs** = the schedule model's estimate "
             "(`bench/static_estimate.py`, the terms of `kernels/schedule.py`): rounds of programs (as many per SM "
             "as its shared memory and registers hold) x K steps per program x the cycles of a K step (tensor-core "
             "cycles over the tile shape's efficiency `schedule.tile_efficiency`, or issue cycles where longer, "
             "never under the load-latency floor) plus a load latency per tile a program starts, against "
             "the compulsory bytes at the target's bandwidth, plus a split's workspace and epilogue launch or "
             "stream-K's partial tiles (their L2 round trip, a shared tile's read-back); at "
             f"{rated.get('clock_ghz', '?')} GHz: counts idle SMs and wasted tiles; the model's constants are "
             "assumptions until a GPU measures them (a static proxy, not a measurement). **best candidate** = "
             "lowest est µs among spill-free tensor-core variants (ties: the one keeping more SMs busy); its "
             "registers, spill (stack) bytes, shared memory, MMA kind, load kind "
             "(cp.async / tma / sync) and K loop follow. A config in parentheses is shown only because no "
             "variant qualified. **issue ratio** = K-loop SASS instructions x warps / 4 schedulers over the "
             f"tensor-core cycles of one K step (2·BM·BN·BK / {rated['mma_flop_per_cycle']} FLOP/cycle/SM); "
             "near or above 1 the SM spends its issue slots on address arithmetic, not on feeding the MMAs. "
             f"**bound** and **floor** rate the layer's compulsory FLOPs and bytes against {rated['device']} "
             f"({rated['tflops']:g} TFLOP/s, {rated['tb_s']:g} TB/s; {rated['source']}); **waves** = programs "
             f"/ {rated['sms']} SMs: first for a plain grid of 128x128 tiles, then for the best candidate under "
             "the layer's **schedule** (`kernels/schedule.py`: data-parallel, split-K, or stream-K, whose programs — "
             "one per SM, or up to two per SM where that gives each a whole number of a small tile's K steps — "
             "share all tiles' K steps in balanced slices of floor or ceil(tiles x K steps / programs) units; a "
             "stream-K candidate counts the programs with work, min(programs, tiles x K steps)), then the layer's **achievable** maximum (work units of the "
             "smallest tile / SMs, capped at 1: no schedule keeps more SMs busy) and the status: *full* "
             "(>= 1 wave), *at max* (under one wave but >= 90 % of the achievable), *short* (neither) — by the "
             "model's best estimate; where the rule's schedule does not fill, a GPU's warm-up also times the "
             "filling stream-K schedule and keeps the faster (noted per short layer; the status does not "
             "assume it wins). TMA "
             "candidates run the layer's schedule: data-parallel, or on stream-K layers the TMA kernels' "
             "stream-K form (`kernels/conv_tma_streamk.py`, same programs and fix-up as the pointer stream-K "
             "kernel, tiles that fit its workspace slots); split-K layers list none (the launcher runs the "
             "pointer kernel's split). Candidates are the pointer kernel's configs and, where "
             "eligible (stride 1, groups 1, 16-byte channel rows), the TMA-descriptor kernel's (`tma ...`; the "
             "launcher times both per shape on sm_90); the best of each family is shown. Every variant's numbers "
             "are in the JSON beside this file.", ""] + summary(result)
    for batch in result["batches"]:
        rows = [_layer_row(layer) for layer in result["layers"] if layer["batch"] == batch]
        lines += [f"## Batch {batch}", ""] + report._table(HEADERS, rows) + [""]
    spilled = sorted({(v["config"], v["stack_bytes"]) for layer in result["layers"] for v in layer["variants"]
                      if v.get("stack_bytes")}, key=lambda t: -t[1])
    if spilled:
        lines += ["## Variants with a stack frame (spills)", "",
                  ", ".join(f"{cfg}: {nbytes} B" for cfg, nbytes in spilled[:20]), ""]
    failures = [(layer["layer"], layer["batch"], v["config"], v.get("error", "")) for layer in result["layers"]
                for v in layer["variants"] if not v.get("ok")]
    if failures:
        lines += ["## Compile failures", ""] + [f"- {name} b{b} {cfg}: `{err[:300]}`" for name, b, cfg, err in failures]
    return "\n".join(lines) + "\n"


def summary(result: dict) -> list[str]:
    """The headline numbers: median issue ratio of the best candidates, spills, and the waves of the stage 3/4
    ResNet-50 layers (and every layer under one wave)."""
    import statistics

    lines = ["## Summary", ""]
    for batch in result["batches"]:
        layers = [layer for layer in result["layers"] if layer["batch"] == batch]
        ratios = []
        for layer in layers:
            best = next((v for v in layer["variants"] if v["config"] == layer["best"]), None)
            if best and best.get("issue_ratio") is not None:
                ratios.append(best["issue_ratio"])
        spilled = [v for layer in layers for v in layer["variants"] if v.get("stack_bytes")]
        best_spills = sum(1 for layer in layers for v in layer["variants"]
                          if v["config"] == layer["best"] and v.get("stack_bytes"))
        sub_wave = []
        for layer in layers:
            best = next((v for v in layer["variants"] if v["config"] == layer["best"]), None)
            if layer["kernel"] == "gemm" and best and best["waves"] < 1:
                sub_wave.append(f"{layer['net']} {layer['layer']} {best['waves']:.2f}")
        tma_best = sum(1 for layer in layers if str(layer["best"] or "").startswith("tma"))
        lines.append(f"- batch {batch}: median issue ratio of the best candidates "
                     f"{statistics.median(ratios) if ratios else float('nan'):.3f} over {len(ratios)} layers; "
                     f"{len(spilled)} variants with a stack frame (max {max((v['stack_bytes'] for v in spilled), default=0)} B), "
                     f"{best_spills} of them a layer's best; TMA candidate best on {tma_best} layers; "
                     f"GEMM layers whose best candidate runs under one wave: {len(sub_wave)}"
                     + (f" ({', '.join(sub_wave)})" if sub_wave else ""))
        status = {k: [layer for layer in layers if layer.get("waves_status") == k]
                  for k in ("full", "at max", "short")}
        lines.append(f"  - waves criterion, batch {batch}: {len(status['full'])} GEMM layers at >= 1 wave; "
                     f"{len(status['at max'])} below 1 wave at their achievable maximum (>= 90 % of it: "
                     + ", ".join(f"{l['net']} {l['layer']} {_best_waves(l):.2f} of {l['achievable_waves']:.2f}"
                                 for l in status["at max"])
                     + f"); {len(status['short'])} neither"
                     + (" (" + ", ".join(_short(layer) for layer in status["short"]) + ")"
                        if status["short"] else ""))
        stage = [layer for layer in layers if layer["net"] == "resnet50" and layer["kernel"] == "gemm"
                 and layer["layer"].startswith(("layer3", "layer4"))]
        for layer in stage:
            best = next((v for v in layer["variants"] if v["config"] == layer["best"]), None)
            lines.append(f"  - {layer['layer']}: {layer.get('schedule', '—')}, waves "
                         f"{_fmt(layer.get('dp_waves_128'), '.2f')} (128² grid) → "
                         f"{_fmt(best and best['waves'], '.2f')} ({layer['best']})")
    return lines + [""]


def _short(layer: dict) -> str:
    """A layer below its achievable waves, with what the best filling candidate would cost by the estimate."""
    best = next((v for v in layer["variants"] if v["config"] == layer["best"]), None)
    text = (f"{layer['net']} {layer['layer']} {layer.get('schedule')} {_best_waves(layer):.2f} of "
            f"{layer['achievable_waves']:.2f}")
    fill = layer.get("best_filling")
    if fill and best and best.get("est_us"):
        text += f" [filling: {fill[0]} {fill[1]:.2f} waves, est {fill[2] / best['est_us'] - 1:+.0%}]"
    elif best:
        text += " [no candidate of this schedule fills]"
    cost = layer.get("rule_fill_cost")
    text += (f" [rule: fastest filling schedule modelled {cost:+.0%}]" if cost is not None
             else " [rule: no schedule fills]")
    return text + _warmup_note(layer)


def _warmup_note(layer: dict) -> str:
    """What a GPU decides for a short layer at warm-up (the status stays the model's best estimate)."""
    if layer.get("warmup_streamk"):
        return f" [GPU warm-up also times the filling stream-K {layer['warmup_streamk']} schedule, keeps the faster]"
    if layer.get("rule_fills") and layer.get("rule_tile"):
        bm, bn = layer["rule_tile"]
        return (f" [the rule's schedule fills at its {bm}x{bn} model tile: the autotuner times the filling "
                f"tiles on a GPU]")
    return ""


def _best_waves(layer: dict) -> float:
    best = next((v for v in layer["variants"] if v["config"] == layer["best"]), None)
    return best["waves"] if best else float("nan")


def write(result: dict, out_root: str, stem: str) -> list[str]:
    out_dir = os.path.join(out_root, f"static-sm{result['target'].split('_')[1]}")
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")
    report.write_json(result, json_path)
    with open(md_path, "w") as f:
        f.write(markdown(result))
    return [json_path, md_path]


def run_suite(args, argv: list[str]) -> int:
    """`python -m bench --suite static [--targets 90,80] [--jobs N] [--nets ...] [--batches ...]`."""
    import torch

    targets = [int(t) for t in (args.targets or "90,80").split(",") if t.strip()]
    bad = [t for t in targets if t not in static.TARGETS]
    if bad:
        raise SystemExit(f"bench: error: --targets: expected a comma-separated subset of "
                         f"{','.join(map(str, static.TARGETS))}, got {args.targets!r}")
    nets = [n for n in (args.nets or ",".join(static.NETS)).split(",") if n]
    batches = [int(b) for b in (args.batches or "32,1").split(",") if b]
    env = bench_env.environment(torch.device("cpu"), argv)
    stem = env["date"] + (f"-{bench_env.slugify(args.tag)}" if args.tag else "")
    files, failed = [], 0
    for cap in targets:
        done = [0]

        def progress(_key, cap=cap):
            done[0] += 1
            if done[0] % 10 == 0:
                static.log(f"[static sm_{cap}] compiled {done[0]}")

        static.log(f"[static sm_{cap}] planning {', '.join(nets)} at batch {', '.join(map(str, batches))}")
        result = static.run(cap, nets=nets, batches=batches, jobs=args.jobs, max_layers=args.max_layers,
                            progress=progress)
        result["environment"] = env
        files += write(result, args.out, stem)
        failed += result["failed"]
        static.log(f"[static sm_{cap}] {result['distinct_kernels']} kernels ({result['compiled_now']} compiled, "
                   f"{result['failed']} failed) in {result['elapsed_s']} s")
    print("wrote:\n  " + "\n  ".join(files))
    if failed:
        print(f"static: {failed} kernel specialisations failed to compile (see the reports)", file=sys.stderr)
    return 1 if failed else 0
