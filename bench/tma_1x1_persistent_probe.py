"""`python -m bench.tma_1x1_persistent_probe`: every TMA 1x1 config, persistent ones included, on ResNet-50's
stride-1 1x1 convs against cuDNN's fused conv+bias+ReLU. CUDA only.

Why: on the H200 (2026-12-04 GPU check) the best Triton kernel ran ResNet-50's memory-bound 1x1 layers at
0.59-0.81 of cuDNN's speed. The persistent configs of kernels/conv_tma.py (PERSISTENT) are the candidate fix;
this says, per layer and config, whether a config is right (float64 reference) and how fast it is, so the
config table can be judged config by config, not only by the autotuner's winner.

Per layer (fp16, channels_last, BN folded to a random per-channel scale and shift, ReLU, no residual) and
batch: cuDNN's fused op on the folded weight (`cudnn`), the pointer kernel alone (`pointer`, the launcher with
tma=False and cuDNN off), and each TMA 1x1 config the launcher's pruning keeps, forced through the launcher
(`bench.check_forcing.forced_config`): its relative error against a float64 conv -> scale/shift -> ReLU and its
CUDA-graph median (triton.testing.do_bench_cudagraph). Writes `--out` JSON as it goes and a markdown report
beside it; everything is time-boxed (`--budget-s`), batch 32 first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

#: ResNet-50's stride-1 1x1 convs: (name, Cin, Cout, H = W).
LAYERS = (
    ("layer1.0.conv1", 64, 64, 56), ("layer1.0.conv3", 64, 256, 56), ("layer1.1.conv1", 256, 64, 56),
    ("layer2.0.conv1", 256, 128, 56), ("layer2.0.conv3", 128, 512, 28), ("layer2.1.conv1", 512, 128, 28),
    ("layer3.0.conv1", 512, 256, 28), ("layer3.0.conv3", 256, 1024, 14), ("layer3.1.conv1", 1024, 256, 14),
    ("layer4.0.conv1", 1024, 512, 14), ("layer4.0.conv3", 512, 2048, 7), ("layer4.1.conv1", 2048, 512, 7),
)
#: `--dry-run` (CPU, TRITON_INTERPRET=1): one tiny layer, so CI runs the probe's plumbing end to end.
DRY_LAYERS = (("tiny", 16, 32, 5),)
TOLERANCE = 1e-2  # fp16: relative Frobenius error against float64 (bench.check_correctness's fp16 bound)


def _problem(cin: int, cout: int, hw: int, batch: int, dev):
    g = torch.Generator(device="cpu").manual_seed(cin * 7 + cout + hw)
    x = torch.randn(batch, cin, hw, hw, generator=g).half().to(dev).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 1, 1, generator=g) / cin ** 0.5).half().to(dev)
    scale = (0.5 + torch.rand(cout, generator=g)).to(dev)
    shift = (0.2 * torch.randn(cout, generator=g)).to(dev)
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double()) * scale.double()[:, None, None]
                     + shift.double()[:, None, None])
    return x, w, scale, shift, ref


def _rel(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _timer(dev):
    """fn -> (median ms, IQR ms, method): CUDA-graph replays on a GPU; one wall-clock call on the CPU (the
    dry run's interpreter: plumbing, not a measurement)."""
    from bench.timing import time_cuda

    def cuda(fn):
        t = time_cuda(fn, cuda_graph=True, rep_ms=60.0)
        return t.median_s * 1e3, (t.q75_s - t.q25_s) * 1e3, t.method

    def cpu(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, 0.0, "one call, wall clock (dry run)"
    return cuda if dev.type == "cuda" else cpu


def probe_layer(name, cin, cout, hw, batch, dev, deadline: float) -> list[dict]:
    from bench.check_correctness import Geometry, _tma_candidates, config_label
    from bench.check_forcing import forced_config
    from fusedconv.kernels import pack_weight
    from fusedconv.kernels.conv_bn_act import conv_bn_act

    x, w, scale, shift, ref = _problem(cin, cout, hw, batch, dev)
    wp = pack_weight(w)
    base = {"layer": name, "shape": f"{cin}->{cout} 1x1 @{hw}x{hw}", "batch": batch,
            "bytes": 2 * (x.numel() + w.numel() + batch * cout * hw * hw)}
    rows = []
    timer = _timer(dev)

    def record(provider, fn, **extra):
        row = {**base, "provider": provider, **extra}
        try:
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            row["rel_error"] = _rel(out, ref)
            row["ok"] = bool(torch.isfinite(out).all()) and row["rel_error"] <= TOLERANCE
            median, iqr, method = timer(fn)
            row.update(time_ms=median, iqr_ms=iqr, timer=method)
        except Exception as exc:  # a config that fails to compile or launch is a failed config
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
        rows.append(row)

    wf = (w.float() * scale[:, None, None, None]).half().contiguous(memory_format=torch.channels_last)
    bias = shift.half()
    if dev.type == "cuda":
        record("cudnn", lambda: torch.cudnn_convolution_relu(x, wf, bias, [1, 1], [0, 0], [1, 1], 1))
    # the GPU check's candidate list: every TMA 1x1 config the launcher's pruning keeps for this launch
    for cfg in _tma_candidates(Geometry(name, cin, hw, hw, cout, 1, 1), batch, x.dtype, dev):
        if time.time() > deadline:
            break

        def run(cfg=cfg):
            with forced_config(cfg, False, "tma1x1"):
                return conv_bn_act(x, wp, scale, shift, activation="relu", tma=True, stream_k=False, cudnn=False)
        record("tma", run, config=config_label(cfg), persistent=bool(cfg.kwargs.get("PERSISTENT")))
    if time.time() < deadline:  # last: its autotuning over the pointer kernel's configs is the slowest part
        record("pointer", lambda: conv_bn_act(x, wp, scale, shift, activation="relu", tma=False, cudnn=False))
    return rows


def write_report(results: dict, path_md: str) -> None:
    env = results.get("environment", {})
    lines = [f"# TMA 1x1 configs (persistent included) on ResNet-50's 1x1 convs — {env.get('device_name', '?')} — "
             f"{results['date']}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, cuDNN {env.get('cudnn')}, commit "
             f"{env.get('git_commit')}; `{results['command']}`", "",
             "fp16 channels_last, ReLU, no residual; CUDA-graph medians in µs; `x cuDNN` = cuDNN's time / this "
             "one's (> 1: faster than cuDNN); error: relative vs float64.", "",
             "| layer | batch | cuDNN µs | pointer µs | best one-tile TMA µs (config) | "
             "best persistent µs (config) | "
             "best Triton x cuDNN | % of copy roofline (best) | failed configs |",
             "|---|---|---|---|---|---|---|---|---|"]
    copy = results.get("ceilings", {}).get("copy_tb_s")
    by = {}
    for r in results.get("rows", []):
        by.setdefault((r["layer"], r["batch"]), []).append(r)

    def best(rows):
        ok = [r for r in rows if r.get("ok") and r.get("time_ms")]
        return min(ok, key=lambda r: r["time_ms"]) if ok else None

    def us(r, cfg=False):
        if r is None:
            return "n/a"
        return f"{r['time_ms'] * 1e3:.1f}" + (f" ({r['config']})" if cfg else "")
    ratios = []
    for (layer, batch), rows in by.items():
        cud = best([r for r in rows if r["provider"] == "cudnn"])
        ptr = best([r for r in rows if r["provider"] == "pointer"])
        one = best([r for r in rows if r["provider"] == "tma" and not r.get("persistent")])
        per = best([r for r in rows if r["provider"] == "tma" and r.get("persistent")])
        tri = best([r for r in (ptr, one, per) if r])
        ratio = cud["time_ms"] / tri["time_ms"] if cud and tri else None
        if ratio:
            ratios.append(ratio)
        roof = (f"{100 * tri['bytes'] / (tri['time_ms'] * 1e-3) / (copy * 1e12):.0f}" if tri and copy else "n/a")
        failed = [f"{r.get('config', r['provider'])}: {r.get('error') or 'rel %.2g' % r.get('rel_error', -1)}"
                  for r in rows if not r.get("ok")]
        lines.append(f"| {layer} | {batch} | {us(cud)} | {us(ptr)} | {us(one, True)} | {us(per, True)} | "
                     f"{ratio:.2f} | {roof} | {'; '.join(failed) or 'none'} |" if ratio else
                     f"| {layer} | {batch} | {us(cud)} | {us(ptr)} | {us(one, True)} | {us(per, True)} | n/a | "
                     f"{roof} | {'; '.join(failed) or 'none'} |")
    if ratios:
        geo = 1.0
        for r in ratios:
            geo *= r
        lines += ["", f"Geometric mean of best Triton x cuDNN over {len(ratios)} (layer, batch) rows: "
                      f"{geo ** (1 / len(ratios)):.2f}."]
    lines += ["", "Notes: " + "; ".join(results.get("notes", []) or ["none"])]
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tma_1x1_persistent_probe", description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=200.0, help="time box of the whole probe (seconds)")
    p.add_argument("--batches", default="32,1", help="batches, in order (default 32,1)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<gpu>/<date>-tma1x1.json)")
    p.add_argument("--report", default=None, help="only rewrite the markdown report of this JSON")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU under TRITON_INTERPRET=1: one tiny layer, batch 2, the plumbing only (--out needed)")
    args = p.parse_args(argv)
    if args.report:
        write_report(json.load(open(args.report)), os.path.splitext(args.report)[0] + ".md")
        return 0
    if args.dry_run and not args.out:
        p.error("--dry-run needs --out (its rows are not results)")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench.tma_1x1_persistent_probe: error: expected a CUDA device, found none "
                         "(--dry-run runs the plumbing on the CPU)")
    from bench import env as bench_env
    from bench import gpu_check

    dev = torch.device("cpu" if args.dry_run else "cuda")
    start = time.time()
    env = bench_env.environment(dev, ["python", "-m", "bench.tma_1x1_persistent_probe"]
                                + list(sys.argv[1:] if argv is None else argv))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", env["device_slug"],
                                   env["date"] + "-tma1x1.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    command = env.get("command") or "python -m bench.tma_1x1_persistent_probe"
    results = {"environment": env, "date": env["date"],
               "command": command if isinstance(command, str) else " ".join(command),
               "rows": [], "notes": []}

    def save():
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        write_report(results, os.path.splitext(out)[0] + ".md")

    if not args.dry_run:
        results["ceilings"] = gpu_check.measure_ceilings(dev)
    deadline = start + args.budget_s
    for batch in ((2,) if args.dry_run else (int(b) for b in args.batches.split(","))):
        for name, cin, cout, hw in DRY_LAYERS if args.dry_run else LAYERS:
            if time.time() > deadline:
                results["notes"].append(f"time box reached before {name} b{batch}")
                save()
                print(f"wrote {out}")
                return 0
            results["rows"] += probe_layer(name, cin, cout, hw, batch, dev, deadline)
            save()
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
