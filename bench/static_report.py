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
    if layer["split_k"] > 1:
        note.append(f"split-K {layer['split_k']}")
    return [layer["net"], f"{layer['layer']}" + (f" (x{layer['count']})" if layer["count"] > 1 else ""),
            layer["shape"], layer["path"], f"{layer['M']}/{layer['N']}/{layer['K']}",
            f"{roof['bound']} ({roof['intensity']:.0f})", f"{max(roof['t_compute_us'], roof['t_memory_us']):.1f}",
            str(len(layer["variants"])), (layer["best"] or f"({shown.get('config', '—')})"),
            _fmt(shown.get("registers")), _fmt(shown.get("stack_bytes")),
            _fmt(None if shown.get("shared_bytes") is None else shown["shared_bytes"] / 1024, ".0f"),
            _fmt(shown.get("mma")), _fmt(shown.get("async_loads")), _fmt(shown.get("loop_instructions")),
            _fmt(shown.get("issue_ratio"), ".2f"), _fmt(shown.get("waves"), ".2f"), "; ".join(note)]


HEADERS = ["net", "layer", "shape", "path", "M/N/K", "bound (FLOP/B)", "floor µs", "cands", "best candidate",
           "regs", "spill B", "smem KB", "MMA", "loads", "loop insns", "issue ratio", "waves", "notes"]


def markdown(result: dict) -> str:
    env, rated = result["environment"], result["rated_against"]
    lines = [f"# Static kernel report, {result['target']} — {env['date']}", "",
             f"triton {env['triton']}, torch {env['torch']}, commit {env['git_commit']}; {result['dtype']} "
             f"{result['layout']}; nets {', '.join(result['nets'])}; batch {', '.join(map(str, result['batches']))}; "
             f"`{env['command']}`; {result['distinct_kernels']} distinct kernels "
             f"({result['compiled_now']} compiled in this run, {result['failed']} failed), {result['elapsed_s']} s.", "",
             "Compiled ahead of time (no GPU): per layer the configs the autotuner keeps after pruning, each "
             "specialised as a real launch would be. **best candidate** = lowest issue ratio among spill-free "
             "tensor-core variants; its registers, spill (stack) bytes, shared memory, MMA kind, load kind "
             "(cp.async / tma / sync) and K loop follow. A config in parentheses is shown only because no "
             "variant qualified. **issue ratio** = K-loop SASS instructions x warps / 4 schedulers over the "
             f"tensor-core cycles of one K step (2·BM·BN·BK / {rated['mma_flop_per_cycle']} FLOP/cycle/SM); "
             "near or above 1 the SM spends its issue slots on address arithmetic, not on feeding the MMAs. "
             f"**bound** and **floor** rate the layer's compulsory FLOPs and bytes against {rated['device']} "
             f"({rated['tflops']:g} TFLOP/s, {rated['tb_s']:g} TB/s; {rated['source']}); **waves** = output "
             f"tiles / {rated['sms']} SMs. Every variant's numbers are in the JSON beside this file.", ""]
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
