"""Operator counts per forward on CPU (torch.profiler), the model as written against the converted one: which
convolution each layer reaches (oneDNN's fused op, ATen's reference `_slow_conv2d_forward`, ...), the BatchNorms
left, and the layout copies.

Each model is built as the model benchmarks build it (bench/models.py: random weights, randomized BN
statistics), converted with `fusedconv.convert` (the default: NCHW input, channels_last inside the layout
boundary, the whole-model flat forward), and profiled over `--runs` forwards after a warm-up, batch 1, float32,
NCHW input; counts are per forward. The rows are the operators whose name says convolution, batch norm, copy,
layout, upsampling or concatenation, with the eager and the converted count; the report also gives the converted
model's error against eager.

`python -m bench.cpu_profile [--models SPECS] [--size N] [--runs N] [--md PATH] [--json PATH]`.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from bench import env

MODELS = ("torchvision:mobilenet_v2", "torchvision:resnet50", "timm:repvgg_a0", "smp:Unet:resnet34")
_WORDS = ("conv", "batch_norm", "copy", "contiguous", "clone", "to_dense", "reorder", "upsample", "cat")


def op_counts(model, x: torch.Tensor, runs: int = 2) -> Counter:
    """Operator counts per forward (internal ops included: the conv algorithm each call reached)."""
    with torch.no_grad():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    counts = Counter(e.name for e in prof.events())
    return Counter({k: v // runs for k, v in counts.items()})


def run(models=MODELS, size: int = 224, runs: int = 2) -> list[dict]:
    import copy

    import fusedconv
    from bench.models import build
    from fusedconv.modules import FusedConv2d

    rows = []
    for spec in models:
        model = build(spec).eval()
        x = torch.randn(1, 3, size, size)
        converted = fusedconv.convert(copy.deepcopy(model))
        with torch.no_grad():
            ref, out = model(x), converted(x)
        err = float((out - ref).abs().max() / ref.abs().max())
        eager, fused = op_counts(model, x, runs), op_counts(converted, x, runs)
        names = sorted(n for n in set(eager) | set(fused) if any(w in n for w in _WORDS))
        rows.append({"model": spec, "size": size, "fused_layers": sum(isinstance(m, FusedConv2d)
                                                                       for m in converted.modules()),
                     "max_rel_error": err, "ops": {n: [eager.get(n, 0), fused.get(n, 0)] for n in names}})
    return rows


def markdown(rows: list[dict], environment: dict) -> str:
    lines = ["# Operator counts per forward on CPU: eager vs fusedconv.convert (default)", "",
             f"{environment['device_name']}, {environment['torch_threads']} torch thread(s), torch "
             f"{environment['torch']}, fusedconv {environment['fusedconv']}; batch 1, float32, NCHW input; "
             f"`{environment['command']}`; {environment['timestamp_utc']}", ""]
    for r in rows:
        lines += [f"## {r['model']} ({r['size']}x{r['size']}, {r['fused_layers']} fused layers, max rel error "
                  f"{r['max_rel_error']:.1e})", "", "| operator | eager | fusedconv |", "|---|---|---|"]
        lines += [f"| `{n}` | {e} | {f} |" for n, (e, f) in r["ops"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model specs (bench.models)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runs", type=int, default=2, help="profiled forwards per model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as configured)")
    p.add_argument("--md", default=None, metavar="PATH")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    for name in ("size", "runs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    env.set_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    rows = run(models, args.size, args.runs)
    environment = env.write_rows(args.json, "bench.cpu_profile", argv, rows)
    text = markdown(rows, environment)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
