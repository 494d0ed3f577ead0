"""A conv after a nearest 2x upsampling computed at the source resolution (fusedconv/graph/flat_upsample_conv.py),
against the same converted model running the graph's own calls (upsample + cat written as one, then the conv).

Each row is one U-Net decoder step, `conv3x3-BN-ReLU(cat([upsample2x(x), skip]))` (or without the skip), in a
small model converted by `fusedconv.convert`, fed channels_last float32 input (the layout a converted model's
boundary gives its layers), timed in interleaved rounds (bench/timing.py):
- `eager`: the step as written;
- `graph_calls`: the converted step with the source-resolution path switched off;
- `source_resolution`: the converted step as convert makes it.
The default rows are the five decoder steps of smp's Unet(resnet34) at 224x224; `taken` says whether the path ran
(it runs only where the conv's module routed the upsampled input to oneDNN), `max_rel_error` is the converted
step's error against the step in float64.

`python -m bench.bench_upsample_conv [--threads N] [--batch N] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import env

# (source channels, source side, skip channels (0: none), output channels): smp Unet(resnet34)'s decoder at 224.
LAYERS = [(512, 7, 256, 256), (256, 14, 128, 128), (128, 28, 64, 64), (64, 56, 64, 32), (32, 112, 0, 16)]


class DecoderStep(nn.Module):
    """One U-Net decoder step: nearest 2x upsampling, concatenation with the skip, conv-BN-ReLU."""

    def __init__(self, c_x: int, c_skip: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_x + c_skip, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return F.relu(self.bn(self.conv(x)))


class Decoder(nn.Module):
    """A decoder holding the step, as a U-Net holds its decoder blocks (convert flattens a model's forward through
    its blocks; a lone block is rewritten as a block)."""

    def __init__(self, c_x: int, c_skip: int, c_out: int):
        super().__init__()
        self.step = DecoderStep(c_x, c_skip, c_out)

    def forward(self, x, skip):
        return self.step(x, skip)


class LastDecoder(Decoder):
    """The same for the last step, which has no skip (called as smp's Unet calls it, with skip None)."""

    def forward(self, x):
        return self.step(x, None)


def run(layers=LAYERS, batch: int = 1, min_run_time: float = 1.0) -> list[dict]:
    from bench.timing import time_cpu_interleaved
    import fusedconv
    from fusedconv.graph import flat_upsample_conv

    at_source = flat_upsample_conv._at_source_resolution
    taken = []

    def counted(state, items):
        y = at_source(state, items)
        taken.append(y is not None)
        return y

    def off(state, items):
        return None

    rows = []
    try:
        for c_x, side, c_skip, c_out in layers:
            torch.manual_seed(0)
            step = (Decoder if c_skip else LastDecoder)(c_x, c_skip, c_out).eval()
            with torch.no_grad():
                bn = step.step.bn
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
            x = torch.randn(batch, c_x, side, side).contiguous(memory_format=torch.channels_last)
            skip = (torch.randn(batch, c_skip, 2 * side, 2 * side).contiguous(memory_format=torch.channels_last)
                    if c_skip else None)
            args = (x, skip) if c_skip else (x,)
            converted = fusedconv.convert(copy.deepcopy(step))

            def with_path(fn):
                def call():
                    flat_upsample_conv._at_source_resolution = fn
                    return converted(*args)
                return call

            fns = {"eager": lambda: step(*args), "graph_calls": with_path(off),
                   "source_resolution": with_path(counted)}
            with torch.no_grad():
                fns["source_resolution"]()  # the first call decides the layout boundary and routes the conv
                taken.clear()
                out = fns["source_resolution"]()
                ok = taken == [True]
                ref = copy.deepcopy(step).double()(*(a.double() for a in args))
                err = float((out.double() - ref).abs().max() / ref.abs().max())
                timings = time_cpu_interleaved(fns, min_run_time=min_run_time)
            row = {"layer": f"up({c_x}@{side}x{side})" + (f" + {c_skip}" if c_skip else "")
                   + f" -> {c_out} 3x3 at {2 * side}x{2 * side}",
                   "batch": batch, "taken": ok, "max_rel_error": err, "threads": torch.get_num_threads()}
            row.update({f"{name}_ms": t.median_s * 1e3 for name, t in timings.items()})
            row["source_resolution_over_graph_calls"] = row["source_resolution_ms"] / row["graph_calls_ms"]
            rows.append(row)
    finally:
        flat_upsample_conv._at_source_resolution = at_source
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_upsample_conv", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as configured)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows and the environment to PATH")
    args = p.parse_args(argv)
    env.set_threads(args.threads)
    if args.batch < 1:
        raise SystemExit(f"--batch: expected a positive integer, got {args.batch}")
    rows = run(batch=args.batch)
    for r in rows:
        times = "  ".join(f"{n[:-3]} {v:6.3f}" for n, v in r.items() if n.endswith("_ms"))
        print(f"{r['layer']:<42} {times} ms  source / graph {r['source_resolution_over_graph_calls']:.3f}  "
              f"(taken {r['taken']}, rel err {r['max_rel_error']:.1e}, {r['threads']} threads)")
    if args.json:
        env.write_rows(args.json, "bench.bench_upsample_conv", argv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
