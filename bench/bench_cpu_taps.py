"""The CPU tap route (fusedconv/cpu_taps.py) against the convs it replaces, on the layers it is meant for.

Each row is one conv with 1-8 output channels (segmentation heads: the classes of a 3x3 conv at the decoder's last
resolution), batch 1, float32, timed in interleaved rounds (bench/timing.py) on the same input:
- `f.conv2d_nchw` / `f.conv2d_cl`: F.conv2d with bias on NCHW / channels_last input (the conv as written);
- `onednn_cl`: the oneDNN fused conv with a pre-packed weight on channels_last input (fusedconv's route for
  channels_last float32 without the tap route, and what Inductor's freezing emits);
- `fusedconv`: a FusedConv2d built from the conv on channels_last input (a converted model's layout), which takes
  the tap route where its rule says so (`route`), else its other routes;
- `taps`: the tap computation alone (`cpu_taps.conv_taps`), on every row.
Rows with 2, 3 and 8 output channels and a small map show where the rule (one output channel, cpu_taps.MAX_TAPS,
MIN_OUTPUT_PIXELS) leaves a conv on the other routes; `taps_ms` times the tap computation itself
(cpu_taps.conv_taps on the same input) for every row, so the rows the rule leaves alone show what it would cost.

`python -m bench.bench_cpu_taps [--threads N] [--json PATH]` (default: the current torch thread count).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import env

# (input channels, output channels, kernel, side): smp Unet's head at 224 (16 -> 1), 2 and 3 classes, FPN-like heads
# at 1/4 and 1/2 resolution, a 5x5 kernel, 8 classes and a 28x28 map.
LAYERS = [(16, 1, 3, 224), (16, 2, 3, 224), (16, 3, 3, 224), (128, 1, 3, 56), (32, 1, 3, 112), (64, 1, 5, 56),
          (16, 8, 3, 224), (64, 1, 3, 28)]


def run(layers=LAYERS, min_run_time: float = 1.0) -> list[dict]:
    from bench.timing import time_cpu_interleaved
    from fusedconv import cpu, cpu_taps
    from fusedconv.modules import FusedConv2d

    rows = []
    for c_in, c_out, k, side in layers:
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, k, padding=k // 2).eval()
        fused = FusedConv2d.from_modules(conv)
        x = torch.randn(1, c_in, side, side)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        w_cl = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        w, b = conv.weight.detach(), conv.bias.detach()
        pad = [k // 2, k // 2]
        taps = cpu_taps.tap_weight(w)
        fns = {"f.conv2d_nchw": lambda: F.conv2d(x, w, b, padding=pad),
               "f.conv2d_cl": lambda: F.conv2d(x_cl, w_cl, b, padding=pad),
               "fusedconv": lambda: fused(x_cl),
               "taps": lambda: cpu_taps.conv_taps(x_cl, taps, b, (k, k), pad, (1, 1), (side, side))}
        if cpu.available():
            packed = cpu.pack_weight(w, pad, [1, 1], [1, 1], 1, x.shape)
            fns["onednn_cl"] = lambda: cpu._pointwise(x_cl, packed, b, pad, [1, 1], [1, 1], 1, "none", [], "")
        with torch.no_grad():
            # The same function first: the tap route sums in another order (fp32 rounding only).
            ref = F.conv2d(x.double(), w.double(), b.double(), padding=pad)
            err = float((fused(x_cl).double() - ref).abs().max() / ref.abs().max())
            timings = time_cpu_interleaved(fns, min_run_time=min_run_time)
        (route,) = set(fused._cpu_state.routes.values())
        row = {"layer": f"{c_in}->{c_out} {k}x{k} at {side}x{side}", "route": route, "max_rel_error": err,
               "threads": torch.get_num_threads()}
        row.update({f"{name}_ms": t.median_s * 1e3 for name, t in timings.items()})
        best_other = min(v for n, v in row.items() if n.endswith("_ms") and n not in ("fusedconv_ms", "taps_ms"))
        row["best_other_over_fusedconv"] = best_other / row["fusedconv_ms"]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_cpu_taps", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as configured)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows and the environment to PATH")
    args = p.parse_args(argv)
    env.set_threads(args.threads)
    rows = run()
    for r in rows:
        times = "  ".join(f"{n[:-3]} {v:6.3f}" for n, v in r.items() if n.endswith("_ms"))
        print(f"{r['layer']:<24} route {r['route']:<22} {times} ms  best other / fusedconv "
              f"{r['best_other_over_fusedconv']:.2f}x  (rel err {r['max_rel_error']:.1e}, {r['threads']} threads)")
    if args.json:
        env.write_rows(args.json, "bench.bench_cpu_taps", argv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
