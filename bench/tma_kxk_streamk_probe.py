"""`python -m bench.tma_kxk_streamk_probe`: the follow-up to a GPU check that found TMA KxK stream-K configs
failing, plus the ResNet-50 layers instrument when the check's time box left it out. CUDA only.

Part 1 forces each listed KxK stream-K config (tile, num_stages, num_warps) through the library's launcher
(`bench.check_forcing.forced_config`) on ResNet-50's layer3 3x3 (256 -> 256, 14x14, batch 32, fp16, identity,
scale 1, shift 0: the raw conv) at the program counts the check saw failing, three launches each, against a
float64 conv. Per run: the relative error of each launch, whether the three are bit-identical (a race shows
as run-to-run differences), how many output tiles hold an element off by more than 2 % of the output's largest
value, and those tiles by how many programs contributed to them (one contributor: the tile never went
through the stream-K fix-up). Part 2 (`--layers-s`) runs the GPU check's layers part (b) for that many
seconds. Writes `--out` JSON as it goes and a markdown report beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

#: (BLOCK_H, BLOCK_W, BLOCK_N, num_stages, num_warps); BLOCK_K 64 (16-bit)
CONFIGS = ((8, 16, 128, 3, 4), (8, 8, 128, 4, 4), (8, 16, 128, 1, 4), (8, 16, 128, 2, 4), (8, 8, 128, 1, 4),
           (8, 16, 128, 3, 8), (8, 16, 64, 4, 4))


def contributors(t: int, k_tile: int, starts: list[int]) -> int:
    """How many programs' slices (program p: [starts[p], starts[p + 1])) hold K iterations of tile t."""
    lo, hi = t * k_tile, (t + 1) * k_tile
    return sum(1 for p in range(len(starts) - 1) if starts[p] < hi and starts[p + 1] > lo)


def slice_starts(total: int, programs: int) -> list[int]:
    """`conv_streamk.streamk_slice`'s split: the first total % P programs get one iteration more."""
    base, extra = divmod(total, programs)
    return [p * base + min(p, extra) for p in range(programs + 1)]


def probe_streamk(deadline: float, rows: list, save) -> None:
    import triton
    import torch.nn.functional as F

    from bench.check_forcing import forced_config
    from fusedconv.kernels import pack_weight
    from fusedconv.kernels.conv_bn_act import conv_bn_act
    from fusedconv.kernels.conv_tma_kxk import _set_block_shapes

    dev = torch.device("cuda")
    torch.manual_seed(0)
    n, cin, cout, hw = 32, 256, 256, 14
    x = torch.randn(n, cin, hw, hw, device=dev).half().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 3, 3, device=dev) / 48).half()
    ref = F.conv2d(x.double(), w.double(), padding=1)
    scale, shift, wp = torch.ones(cout, device=dev), torch.zeros(cout, device=dev), pack_weight(w)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for bh, bw, bn, stages, warps in CONFIGS:
        cfg = triton.Config({"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8},
                            num_stages=stages, num_warps=warps, pre_hook=_set_block_shapes)
        for programs in (sms, 2 * sms - 12, 2 * sms):
            if time.time() > deadline:
                return
            row = {"config": f"{bh}x{bw}px x{bn}x64 w{warps}/s{stages}", "programs": programs}
            try:
                outs = []
                with forced_config(cfg, False, "tmakxk_streamk"):
                    for _ in range(3):
                        y = conv_bn_act(x, wp, scale, shift, padding=1, activation="identity", tma=True,
                                        stream_k=programs)
                        torch.cuda.synchronize()
                        outs.append(y.double())
                row["rel_errors"] = [float((o - ref).norm() / ref.norm()) for o in outs]
                row["bit_identical_reruns"] = all(torch.equal(outs[0], o) for o in outs[1:])
                bad = (outs[0] - ref).abs() > 0.02 * ref.abs().amax()
                th, tw, npn = -(-hw // bh), -(-hw // bw), cout // bn
                k_tile = 9 * (cin // 64)
                starts = slice_starts(n * th * tw * npn * k_tile, programs)
                all_tiles, bad_tiles = {}, {}
                for i in range(n):
                    for a in range(th):
                        for b in range(tw):
                            for c in range(npn):
                                t = ((i * th + a) * tw + b) * npn + c
                                k = contributors(t, k_tile, starts)
                                all_tiles[k] = all_tiles.get(k, 0) + 1
                                if bool(bad[i, c * bn:(c + 1) * bn, a * bh:(a + 1) * bh, b * bw:(b + 1) * bw].any()):
                                    bad_tiles[k] = bad_tiles.get(k, 0) + 1
                row.update(tiles=n * th * tw * npn, tiles_by_contributors=all_tiles,
                           bad_tiles_by_contributors=bad_tiles)
            except Exception as exc:  # e.g. a tile larger than the launcher's workspace slot (deny-listed)
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            rows.append(row)
            save()


def write_report(results: dict, path_md: str) -> None:
    env = results.get("environment", {})
    lines = [f"# TMA KxK stream-K probe and ResNet-50 layers — {env.get('device_name', '?')} — {results['date']}",
             "", f"torch {env.get('torch')}, triton {env.get('triton')}, cuDNN {env.get('cudnn')}, commit "
                 f"{env.get('git_commit')}; `{results['command']}`", "",
             "## Forced KxK stream-K configs, resnet50 layer3 3x3 (256->256, 14x14), batch 32, fp16", "",
             "| config | programs | rel error (3 launches) | identical reruns | bad tiles / tiles | bad tiles by "
             "contributors | all tiles by contributors |", "|---|---|---|---|---|---|---|"]
    for r in results.get("streamk", []):
        if "error" in r:
            lines.append(f"| {r['config']} | {r['programs']} | {r['error']} | | | | |")
            continue
        errs = ", ".join(f"{e:.2g}" for e in r["rel_errors"])
        lines.append(f"| {r['config']} | {r['programs']} | {errs} | {r['bit_identical_reruns']} | "
                     f"{sum(r['bad_tiles_by_contributors'].values())} / {r['tiles']} | "
                     f"{r['bad_tiles_by_contributors']} | {r['tiles_by_contributors']} |")
    layers = results.get("layers", [])
    if layers:
        ceil = results.get("ceilings", {})
        lines += ["", "## ResNet-50 layers, fp16 channels_last (CUDA-graph medians, ms; % of the measured roofline)",
                  "", f"Measured ceilings: copy {ceil.get('copy_tb_s', 0):.2f} TB/s, fp16 matmul "
                      f"{ceil.get('fp16_matmul_tflops', 0):.0f} TFLOP/s.", "",
                  "| layer | batch | eager | folded | cuDNN fused | fusedconv (backend) | Triton best | "
                  "cuDNN / Triton | Triton % roofline |", "|---|---|---|---|---|---|---|---|---|"]
        by = {}
        for r in layers:
            by.setdefault((r["layer"], r["batch"]), {})[r["provider"]] = r

        def ms(r):
            return f"{r['time_ms']:.4f}" if r and r.get("status") == "ok" else "n/a"
        for (layer, batch), p in by.items():
            tri, cud, fc = p.get("fusedconv_triton"), p.get("cudnn_relu"), p.get("fusedconv")
            ratio = (f"{cud['time_ms'] / tri['time_ms']:.2f}" if tri and cud and cud.get("status") == "ok"
                     and tri.get("status") == "ok" else "n/a")
            pct = f"{tri['pct_roofline_measured']:.0f}" if tri and tri.get("pct_roofline_measured") else "n/a"
            lines.append(f"| {layer} | {batch} | {ms(p.get('eager'))} | {ms(p.get('folded'))} | {ms(cud)} | "
                         f"{ms(fc)} ({(fc or {}).get('backend', '?')}) | {ms(tri)} | {ratio} | {pct} |")
    lines += ["", "Notes: " + "; ".join(results.get("notes", []) or ["none"])]
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tma_kxk_streamk_probe", description=__doc__.split("\n")[0])
    p.add_argument("--streamk-s", type=float, default=75.0, help="time box of part 1 (seconds)")
    p.add_argument("--layers-s", type=float, default=0.0, help="time box of the layers part (0: skip)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<gpu>/<date>-probe.json)")
    p.add_argument("--report", default=None, help="only rewrite the markdown report of this JSON")
    args = p.parse_args(argv)
    if args.report:
        write_report(json.load(open(args.report)), os.path.splitext(args.report)[0] + ".md")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench.tma_kxk_streamk_probe: error: expected a CUDA device, found none")
    from bench import env as bench_env
    from bench import gpu_check

    dev = torch.device("cuda")
    env = bench_env.environment(dev, ["python", "-m", "bench.tma_kxk_streamk_probe"] + list(argv or []))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", env["device_slug"],
                                   env["date"] + "-probe.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    results = {"environment": env, "date": env["date"], "command": " ".join(env.get("command", [])) or "probe",
               "streamk": [], "notes": []}

    def save():
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        write_report(results, os.path.splitext(out)[0] + ".md")

    probe_streamk(time.time() + args.streamk_s, results["streamk"], save)
    if args.layers_s > 0:
        results["ceilings"] = gpu_check.measure_ceilings(dev)
        gpu_check.run_layers(results, time.perf_counter() + args.layers_s, dev, False, save)
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
