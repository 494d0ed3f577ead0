"""Writing the GPU check's results: `<date>-check.json` (everything) and `.md` (readable at a glance)."""

from __future__ import annotations

import os
from collections import Counter

from bench import report


def _f(value, spec=".3g") -> str:
    return "—" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# GPU check — {env['device_name']} — {env['timestamp_utc']}" + (" (CPU dry run)" if results["dry_run"]
                                                                              else ""), "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"commit {env['git_commit']}; `{env['command']}`; {results.get('elapsed_s')} s of a "
             f"{results['budget_s']} s budget.", ""]
    lines += report._table(["part", "status", "elapsed s"],
                           [[k, v.get("status"), _f(v.get("elapsed_s"), ".1f")] for k, v in results["parts"].items()])
    lines.append("")
    ceil = results.get("ceilings")
    if ceil:
        lines += [f"Measured ceilings: copy {ceil['copy_tb_s']:.2f} TB/s, fp16 matmul {ceil['fp16_matmul_tflops']:.0f} "
                  f"TFLOP/s ({ceil['method']}).", ""]
    lines += _correctness(results.get("correctness")) + _cudnn_candidate(results.get("cudnn_candidate"))
    lines += _gpu_tests(results.get("autocast"), "Converted models in torch.autocast regions")
    lines += _layers(results.get("layers")) + _models(results.get("models"))
    lines += _layers3d(results.get("layers3d"))
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _correctness(sec) -> list[str]:
    if not sec:
        return []
    rows = sec["rows"]
    by_dtype = Counter((r["dtype"], bool(r.get("ok"))) for r in rows)
    dtypes = sorted({d for d, _ in by_dtype})
    out = ["## (a) Correctness of every candidate config vs float64 Conv→BN→act", "",
           f"{sec.get('items_done', '?')} of {sec['items_total']} (layer, batch, dtype) items checked with "
           f"{sec['workers']} workers; {len(rows)} config runs; deny-list entries added: "
           f"{sec.get('denylist_added', 0)}." + (f" {sec['note']}." if sec.get("note") else ""), ""]
    out += report._table(["dtype", "configs passed", "configs failed"],
                         [[d, by_dtype[(d, True)], by_dtype[(d, False)]] for d in dtypes])
    # per kernel (stream-K ones at several program counts): runs, failures and time spent, compiles included
    kernels = sorted({r.get("kernel", "?") for r in rows})
    out += ["", *report._table(
        ["kernel", "runs", "failed", "program counts", "uneven-slice runs", "seconds (sum over workers)"],
        [[k, sum(1 for r in rows if r.get("kernel") == k), sum(1 for r in rows if r.get("kernel") == k
                                                                  and not r.get("ok")),
          len({r["programs"] for r in rows if r.get("kernel") == k and "programs" in r}) or "-",
          sum(1 for r in rows if r.get("kernel") == k and r.get("uneven")),
          round(sum(r.get("seconds", 0) for r in rows if r.get("kernel") == k), 1)] for k in kernels])]
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        out += ["", "**Failing configs:**", ""]
        out += report._table(["layer", "batch", "dtype", "kernel", "programs", "path", "config", "rel error", "worst",
                              "error"],
                             [[r["geometry"], r["batch"], r["dtype"], r.get("kernel", "?"), r.get("programs", "-"),
                               r["path"], r["config"], _f(r.get("rel_error")), _f(r.get("max_error")),
                               (r.get("error") or "")[:120]] for r in failed[:60]])
    worst = max((r for r in rows if r.get("ok")), key=lambda r: r["rel_error"], default=None)
    if worst:
        out += ["", f"Largest passing error: {worst['rel_error']:.2e} relative ({worst['geometry']} b{worst['batch']} "
                    f"{worst['dtype']} {worst['config']})."]
    if sec.get("not_run"):
        out += ["", f"Not run (time box): {len(sec['not_run'])} items, first: {', '.join(sec['not_run'][:8])}."]
    return out + [""]


def _cudnn_candidate(sec) -> list[str]:
    return _gpu_tests(sec, "cuDNN candidate vs float64")


def _gpu_tests(sec, title: str) -> list[str]:
    """A child pytest of `gpu` tests (gpu_check.run_gpu_tests): its exit code, summary and failures."""
    if not sec:
        return []
    out = [f"## {title} (`pytest -m gpu " + sec["tests"] + "`)", "",
           f"exit code {sec['returncode']}: {sec['summary']}"]
    out += [f"- {ln}" for ln in sec.get("failed") or []]
    if sec.get("errors"):
        out += ["", "Error lines:", "", "```", *sec["errors"], "```"]
    return out + [""]


def _layers(rows) -> list[str]:
    if not rows:
        return []
    table = {}
    for r in rows:
        key = (r["layer"], r["shape"], r["batch"])
        table.setdefault(key, {})[r["provider"]] = r
    body = []
    for (layer, shape, batch), per in table.items():
        fc = per.get("fusedconv", {})
        cells = [layer, shape, batch]
        for p in ("eager", "folded", "cudnn_relu", "fusedconv_triton", "fusedconv"):
            r = per.get(p, {})
            cells.append(_f(r.get("time_ms") * 1e3, ".1f") if r.get("status") == "ok" else (r.get("status") or "—")[:24])
        cells += [fc.get("backend") or "—", _f(_ratio(per, "cudnn_relu", "fusedconv_triton"), ".2f"),
                  _f(fc.get("speedup_vs_cudnn_relu"), ".2f"), _f(fc.get("speedup_vs_folded"), ".2f"),
                  _f(fc.get("pct_roofline_measured", fc.get("pct_roofline")), ".0f")]
        body.append(cells)
    return ["## (b) ResNet-50 layers, channels_last (µs; medians, CUDA-graph replays on a GPU)", "",
            "`triton best`: fusedconv with its cuDNN candidate off; `chosen`: fusedconv as shipped, which keeps "
            "cuDNN's fused op for a ReLU layer where that is faster and agrees; `backend`: what it chose.", ""
            ] + report._table(
        ["layer", "shape", "batch", "eager", "folded+epilogue", "cudnn fused relu", "triton best", "chosen",
         "backend", "triton x vs cudnn fused", "chosen x vs cudnn fused", "chosen x vs folded",
         "chosen % roofline"], body) + [""]


def _ratio(per: dict, base: str, new: str) -> float | None:
    """time(base) / time(new) where both ran."""
    b, n = per.get(base, {}), per.get(new, {})
    if b.get("status") == "ok" and n.get("status") == "ok" and n.get("time_ms"):
        return b["time_ms"] / n["time_ms"]
    return None


def _models(rows) -> list[str]:
    if not rows:
        return []
    body = [[r["model"], r["batch"], r["dtype"], _f(r.get("eager_ms"), ".3f"), _f(r.get("fusedconv_ms"), ".3f"),
             _f(r.get("speedup"), ".2f"), _f(r.get("max_rel_error_vs_eager"), ".1e"), _backends(r.get("backends")),
             r.get("status")] for r in rows]
    return ["## (c) Models end to end, channels_last, after warmup (ms; CUDA-graph replays on a GPU)", ""] + report._table(
        ["model", "batch", "dtype", "eager", "fusedconv", "speed-up", "max rel err", "fused layers per backend",
         "status"], body) + [""]


def _backends(counts) -> str:
    if not counts:
        return "—"
    return ", ".join(f"{n} {b}" for b, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _layers3d(rows) -> list[str]:
    if not rows:
        return []
    body = [[r.get("layer"), r.get("shape"), r.get("provider"), _f(r.get("median_ms"), ".3f"),
             _f(r.get("speedup_vs_eager"), ".2f"), _f(r.get("max_rel_error_vs_eager"), ".1e"), r.get("status")]
            for r in rows]
    return ["## (d) r3d_18 Conv3d layers, fp16 channels_last_3d, batch 1 (ms; CUDA-graph replays)", ""] + report._table(
        ["layer", "shape", "provider", "ms", "vs eager", "max rel err", "status"], body) + [""]


def write(results: dict, out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")
    report.write_json(results, json_path)
    with open(md_path + ".tmp", "w") as f:
        f.write(markdown(results))
    os.replace(md_path + ".tmp", md_path)
    return [json_path, md_path]
