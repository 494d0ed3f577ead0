"""The benchmark runner: `python -m bench [--quick] ...` (also `fusedconv bench ...`).

Plans the layers / models / reparam suites for the device present, runs them with a progress bar and writes
`bench/results/<device-slug>/<date>[-quick][-tag].json`, `.md` and PNG plots. The JSON is rewritten after each
suite, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import warnings

import torch

from bench import env as bench_env
from bench import layers as layer_suite
from bench import metrics
from bench import models as model_suite
from bench import report
from bench.shapes import NETS, layer_cases, representative

SUITES = ("layers", "models", "reparam", "guards", "overhead", "layers3d", "static")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _ints(name: str, text: str | None) -> list[int] | None:
    items = _csv(text)
    if items is None:
        return None
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise SystemExit(f"bench: error: {name}: expected comma-separated positive ints, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"bench: error: {name}: expected comma-separated positive ints, got {text!r}")
    return values


def _choices(name: str, text: str | None, allowed) -> list[str] | None:
    items = _csv(text)
    if items is None:
        return None
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"bench: error: {name}: expected a comma-separated subset of {', '.join(allowed)}, "
                         f"got {text!r}")
    return items


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("NCHW", "channels_last")


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""
defaults by device:
  CPU   layers: batch 1,8, float32, NCHW + channels_last; providers eager, folded, compile, fusedconv
        models: batch 1, float32; eager, fusedconv, fusedconv_cl, fusedconv_frozen, fx_fuse, jit, compile,
                compile_freeze, onnxruntime
  CUDA  layers: batch 1,8,32,128, float16,bfloat16,float32, channels_last + NCHW; + cudnn_relu
        models: batch 1,32, float16 channels_last; eager, fusedconv, fx_fuse, jit, compile, fusedconv_compile
  --quick: 3 representative layers per net at one batch, no torch.compile, short timings (< 5 min on CPU).
  torch.compile on layers (--compile subset, the default outside --quick) compiles only the representative
  layers: compiling ~60 layer shapes per configuration takes far longer than timing them.
""")
    p.add_argument("--quick", action="store_true", help="a small subset with short timings (smoke test / CI)")
    p.add_argument("--suite", default="layers,models,reparam,guards,overhead",
                   help="comma-separated: layers, models, reparam, guards, overhead, layers3d (r3d_18's Conv3d "
                        "layers); or static alone (no GPU: "
                        "compiled-kernel report)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; also onnxruntime's)")
    p.add_argument("--nets", default=None, help=f"layers suite nets, comma-separated from {', '.join(NETS)}")
    p.add_argument("--max-layers", type=int, default=None, help="at most this many layers per net")
    p.add_argument("--batches", default=None, help="layers suite batch sizes, e.g. 1,8")
    p.add_argument("--dtypes", default=None, help="layers suite dtypes: float32,float16,bfloat16")
    p.add_argument("--layouts", default=None, help="layers suite layouts: NCHW,channels_last")
    p.add_argument("--providers", default=None, help=f"layers suite providers from {', '.join(layer_suite.PROVIDERS)}")
    p.add_argument("--compile", choices=("none", "subset", "all"), default=None,
                   help="which layer configurations torch.compile runs on (default: subset; none with --quick)")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for layers")
    p.add_argument("--models", default=None,
                   help=f"models suite specs, comma-separated (default {', '.join(model_suite.MODELS)})")
    p.add_argument("--model-batches", default=None, help="models suite batch sizes")
    p.add_argument("--model-dtype", default=None, help="models suite dtype (default float16 on CUDA, float32 on CPU)")
    p.add_argument("--model-providers", default=None, help=f"from {', '.join(model_suite.PROVIDERS)}")
    p.add_argument("--model-compile-mode", default=None,
                   help="torch.compile mode for models (default max-autotune on CUDA, default on CPU)")
    p.add_argument("--image-size", type=int, default=224, help="models suite input size (default 224)")
    p.add_argument("--min-time", type=float, default=None, help="CPU seconds of timing per measurement")
    p.add_argument("--out", default=DEFAULT_OUT, help="results root (default bench/results)")
    p.add_argument("--tag", default=None, help="suffix for the result file names")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--verbose", action="store_true", help="show library warnings")
    p.add_argument("--note", action="append", default=[], help="a note to record with the results (repeatable)")
    p.add_argument("--targets", default=None, help="static suite: compute capabilities, e.g. 90,80 (the default)")
    p.add_argument("--jobs", type=int, default=2, help="static suite: parallel compile processes (default 2)")
    p.add_argument("--gpu-check", action="store_true",
                   help="the first thing to run on a GPU: every config's correctness, ResNet-50 layers vs cuDNN, "
                        "models under CUDA graphs; <= 8 min on an H200 (bench/gpu_check.py)")
    p.add_argument("--dry-run", action="store_true", help="--gpu-check on the CPU (interpreter, tiny shapes)")
    p.add_argument("--budget-s", type=float, default=420.0, help="--gpu-check: seconds for all parts (default 420)")
    p.add_argument("--workers", type=int, default=None,
                   help="--gpu-check: correctness worker processes (default: CPU count - 2, at most 16)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only re-write the .md table and plots of an existing results file (no benchmarking)")
    return p


class Progress:
    """tqdm when installed, plain lines otherwise."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.total, self.done, self.desc = total, 0, desc

    def step(self, label: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60], refresh=False)
            self.bar.update(1)
        else:
            self.done += 1
            print(f"[{self.desc} {self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plan(args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    quick = args.quick
    nets = _choices("--nets", args.nets, NETS) or list(NETS)
    if args.batches:
        batches = _ints("--batches", args.batches)
    else:
        batches = ([32] if quick else [1, 8, 32, 128]) if cuda else ([1] if quick else [1, 8])
    dtypes = _choices("--dtypes", args.dtypes, tuple(DTYPES)) or (
        (["float16"] if quick else ["float16", "bfloat16", "float32"]) if cuda else ["float32"])
    if not cuda and any(d != "float32" for d in dtypes):
        raise SystemExit(f"bench: error: --dtypes: expected float32 on CPU, got {args.dtypes!r}")
    layouts = _choices("--layouts", args.layouts, LAYOUTS) or (
        (["channels_last"] if quick else ["channels_last", "NCHW"]) if cuda else ["NCHW", "channels_last"])
    default_lp = ["eager", "folded"] + (["cudnn_relu"] if cuda else []) + ["compile", "fusedconv"]
    layer_providers = _choices("--providers", args.providers, layer_suite.PROVIDERS) or default_lp
    compile_scope = args.compile or ("none" if quick else "subset")
    models = _csv(args.models) or list(model_suite.MODELS)
    model_batches = _ints("--model-batches", args.model_batches) or (([32] if quick else [1, 32]) if cuda else [1])
    model_dtype = args.model_dtype or ("float16" if cuda else "float32")
    if model_dtype not in DTYPES or (not cuda and model_dtype != "float32"):
        raise SystemExit(f"bench: error: --model-dtype: expected float32 on CPU or one of {', '.join(DTYPES)} on "
                         f"CUDA, got {model_dtype!r}")
    default_mp = (["eager", "fusedconv"] + ([] if cuda else ["fusedconv_cl", "fusedconv_frozen"])
                  + ["fx_fuse", "jit", "compile"]
                  + (["fusedconv_compile"] if cuda else ["compile_freeze", "onnxruntime"]))
    model_providers = _choices("--model-providers", args.model_providers, model_suite.PROVIDERS) or default_mp
    return {"nets": nets, "batches": batches, "dtypes": dtypes, "layouts": layouts,
            "layer_providers": layer_providers, "compile_scope": compile_scope,
            "compile_mode": args.compile_mode, "models": models, "model_batches": model_batches,
            "model_dtype": model_dtype, "model_providers": model_providers,
            "model_compile_mode": args.model_compile_mode or ("max-autotune" if cuda else "default"),
            "image_size": args.image_size, "max_layers": args.max_layers}


def run_layers(args, device, p: dict, peak_key, results: dict) -> None:
    cases_by_net = {}
    for net in p["nets"]:
        cases = layer_cases(net)
        chosen = representative(cases) if args.quick else cases
        if p["max_layers"]:
            chosen = chosen[:p["max_layers"]]
        cases_by_net[net] = (chosen, set(c.key for c in representative(cases)))
    configs = [(case, b, d, lay, case.key in rep) for net, (cases, rep) in cases_by_net.items() for case in cases
               for b in p["batches"] for d in p["dtypes"] for lay in p["layouts"]]
    tf32 = _cudnn_conv_allows_tf32() if device.type == "cuda" else False
    bar = Progress(len(configs), "layers")
    rows = []
    try:
        for case, batch, dtype, layout, is_rep in configs:
            bar.step(f"{case.net} {case.shape.label()} b{batch} {dtype} {layout}")
            if p["compile_scope"] == "all" or (p["compile_scope"] == "subset" and is_rep):
                compile_ok = True
            elif p["compile_scope"] == "none":
                compile_ok = "n/a: torch.compile not run (--quick or --compile none)"
            else:
                compile_ok = "n/a: not compiled (--compile subset compiles the representative layers only)"
            try:
                rows += layer_suite.run_case(case, batch, DTYPES[dtype], layout, p["layer_providers"], device,
                                             quick=args.quick, peak_key=peak_key, tf32=tf32, compile_ok=compile_ok,
                                             compile_mode=p["compile_mode"], cpu_min_run_time=args.min_time)
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"net": case.net, "layer": case.name, "shape": case.shape.label(), "batch": batch,
                             "dtype": dtype, "layout": layout, "provider": "*", "status": f"n/a: out of memory: {e}"})
                torch.cuda.empty_cache()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if os.environ.get("FUSEDCONV_BENCH_RESET_DYNAMO", "1") == "1" and "compile" in p["layer_providers"]:
                torch._dynamo.reset()  # one compiled graph per layer; don't let the cache hit its limit
    finally:
        bar.close()
        results["layers"] = rows
        results["layers_summary"] = layer_suite.summarize(rows)


def run_models(args, device, p: dict, results: dict) -> None:
    total = len(p["models"]) * len(p["model_batches"]) * len(p["model_providers"])
    bar = Progress(total, "models")
    rows = []
    quick_skip = "n/a: torch.compile skipped in --quick (compile time on CPU is minutes)"
    compile_ok = True if not args.quick else quick_skip
    if "compile" in (args.model_providers or "") and args.quick:
        compile_ok = True  # asked for explicitly
    min_time = args.min_time  # None: the suite's default per provider (0.5 s quick, 1.5 s full)
    try:
        for spec in p["models"]:
            for batch in p["model_batches"]:
                try:
                    rows += model_suite.run_model(spec, batch, DTYPES[p["model_dtype"]], device,
                                                  p["model_providers"], quick=args.quick, compile_ok=compile_ok,
                                                  compile_mode=p["model_compile_mode"],
                                                  image_size=p["image_size"], min_run_time=min_time,
                                                  progress=bar.step)
                except Exception as e:  # the model itself failed to build or run: record and go on
                    rows.append({"model": spec, "batch": batch, "dtype": p["model_dtype"], "provider": "*",
                                 "status": f"n/a: {type(e).__name__}: {str(e).strip()[:200]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
    finally:
        bar.close()
        results["models"] = rows


def run_reparam(args, device, results: dict, suite: str = "reparam") -> None:
    """bench/bench_<suite>.py (reparam, guards, layers3d) exposes run(device, quick) -> rows."""
    try:
        mod = importlib.import_module(f"bench.bench_{suite}")
    except ModuleNotFoundError as e:
        if e.name in (f"bench.bench_{suite}",):
            results["notes"].append(f"{suite} suite: bench/bench_{suite}.py not present, skipped")
            return
        results[suite] = [{"status": f"n/a: import failed: {type(e).__name__}: {e}"}]
        return
    try:
        rows = mod.run(str(device), args.quick)  # its API takes the device as a string ("cpu", "cuda")
        results[suite] = [dict(r) for r in rows]
    except Exception as e:
        results[suite] = [{"status": f"n/a: {type(e).__name__}: {str(e).strip()[:200]}"}]


def write(results: dict, out_dir: str, stem: str, with_plots: bool) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    results["elapsed_s"] = time.perf_counter() - results.pop("_t0", time.perf_counter())
    results["_t0"] = time.perf_counter() - results["elapsed_s"]
    pngs = report.plots(results, out_dir, stem) if with_plots else []
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    report.write_json(clean, os.path.join(out_dir, stem + ".json"))
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(report.markdown(clean, pngs))
    return [os.path.join(out_dir, stem + ext) for ext in (".json", ".md")] + pngs


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.render:
        return render(args.render, with_plots=not args.no_plots)
    if args.gpu_check or args.dry_run:
        if not args.gpu_check:
            raise SystemExit("bench: error: --dry-run: only applies to --gpu-check")
        if args.budget_s <= 0:
            raise SystemExit(f"bench: error: --budget-s: expected a positive number of seconds, got {args.budget_s}")
        from bench import gpu_check

        return gpu_check.main(args, prog.split() + list(sys.argv[1:] if argv is None else argv))
    suites = _choices("--suite", args.suite, SUITES)
    if "static" in suites:
        if suites != ["static"]:
            raise SystemExit("bench: error: --suite: static runs alone (it compiles, it does not time), "
                             f"got {args.suite!r}")
        from bench import static_report

        return static_report.run_suite(args, prog.split() + list(sys.argv[1:] if argv is None else argv))
    if not args.verbose:
        # torch.jit / torch.onnx deprecation notices would bury the progress bar; the results record versions.
        warnings.filterwarnings("ignore")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # a CUDA_HOME notice on CPU boxes
    if args.threads < 1:
        raise SystemExit(f"bench: error: --threads: expected a positive int, got {args.threads}")
    try:
        device = bench_env.pick_device(args.device)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"bench: error: {e}")
    torch.set_num_threads(args.threads)
    p = plan(args, device)
    env = bench_env.environment(device, prog.split() + list(sys.argv[1:] if argv is None else argv))
    key = metrics.peak_key(env["device_name"]) if device.type == "cuda" else None
    peak = None
    if key is not None:
        tf32 = _cudnn_conv_allows_tf32()
        peak = {"name": key, "tb_s": metrics.peak_tb_s(key), "source": "vendor datasheet (dense)",
                "tflops": {d: metrics.peak_tflops(key, d, tf32=tf32) for d in p["dtypes"]}}
    stem = env["date"] + ("-quick" if args.quick else "") + (f"-{bench_env.slugify(args.tag)}" if args.tag else "")
    out_dir = os.path.join(args.out, env["device_slug"])
    results = {"schema": 1, "environment": env, "quick": args.quick, "plan": p, "peak": peak, "notes": [],
               "_t0": time.perf_counter()}
    results["notes"] += list(args.note)
    # What other processes use just before any benchmark thread runs (this process has only imported so far).
    results["other_processes_cores_busy_at_start"], note = bench_env.busy_at_start(
        env["cpu_count"], env["load_average_1m_at_start"])
    other_use = bench_env.OtherCPUUse()
    if note:
        results["notes"].append(note)
    if device.type == "cpu":
        results["notes"].append(f"CPU timings use {args.threads} torch threads (torch.set_num_threads); "
                                "onnxruntime uses the same intra-op thread count.")
    if device.type == "cuda" and peak is None:
        results["notes"].append(f"no datasheet peaks for {env['device_name']}: % of peak not reported")
    print(f"fusedconv bench: {env['device_name']} ({device}), suites {', '.join(suites)}"
          f"{' (quick)' if args.quick else ''}; torch threads {torch.get_num_threads()}", file=sys.stderr)
    files = []
    for suite in suites:
        if suite == "layers":
            run_layers(args, device, p, key, results)
        elif suite == "models":
            run_models(args, device, p, results)
        elif suite == "overhead":  # FusedConv2d's per-call CPU overhead (bench/bench_overhead.py)
            results["overhead"] = importlib.import_module("bench.bench_overhead").run(args.quick)
        else:
            run_reparam(args, device, results, suite)
        files = write(results, out_dir, stem, with_plots=not args.no_plots)
    results["load_average_1m_at_end"] = bench_env.load_average()
    # Not the load average at the end: it counts this benchmark's own threads (on an idle 2-core machine a
    # 2-thread run reads as busy). What other processes used while it ran, measured directly:
    others = results["other_processes_cores_busy"] = other_use.cores()
    if others is not None:
        note = bench_env.busy_note(others, env["cpu_count"], "during the run",
                                   what="cores kept busy by other processes, on average,")
    else:  # no /proc/stat: the load average, less the threads this benchmark kept busy itself
        load = results["load_average_1m_at_end"]
        note = bench_env.busy_note(None if load is None else round(max(load - args.threads, 0.0), 2),
                                   env["cpu_count"], "at the end",
                                   what=f"1-minute load average less this run's {args.threads} threads,")
    if note:
        results["notes"].append(note)
    files = write(results, out_dir, stem, with_plots=not args.no_plots)
    _print_summary(results)
    for n in results["notes"]:
        print(f"note: {n}")
    print("wrote:\n  " + "\n  ".join(files))
    return 0


def render(path: str, with_plots: bool = True) -> int:
    """Rebuild `<stem>.md` and the plots next to an existing `<stem>.json`."""
    import json

    if not path.endswith(".json") or not os.path.isfile(path):
        raise SystemExit(f"bench: error: --render: expected an existing results .json file, got {path!r}")
    with open(path) as f:
        results = json.load(f)
    out_dir, stem = os.path.dirname(os.path.abspath(path)), os.path.basename(path)[:-len(".json")]
    pngs = report.plots(results, out_dir, stem) if with_plots else []
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(report.markdown(results, pngs))
    print("wrote:\n  " + "\n  ".join([os.path.join(out_dir, stem + ".md")] + pngs))
    return 0


def _print_summary(results: dict) -> None:
    for s in results.get("layers_summary") or []:
        print(f"layers {s['net']:>13} b{s['batch']:<3} {s['dtype']:<8} {s['layout']:<13} fusedconv vs "
              f"{s['vs']:<10} {s['geomean_speedup']:.2f}x geomean over {s['layers']} layers")
    for r in results.get("models") or []:
        if r.get("status") == "ok":
            print(f"model {r['model']:<26} b{r['batch']:<3} {r['provider']:<18} {r['latency_ms']:9.2f} ms "
                  f"({r.get('speedup_vs_eager', 0):.2f}x eager)")
        else:
            print(f"model {r['model']:<26} b{r['batch']:<3} {r['provider']:<18} {r['status']}")


if __name__ == "__main__":
    sys.exit(main())


def _cudnn_conv_allows_tf32() -> bool:
    # Imported when asked: importing fusedconv.kernels imports triton, which must see TRITON_INTERPRET first.
    from fusedconv.kernels.precision import cudnn_conv_allows_tf32

    return cudnn_conv_allows_tf32()
