"""Benchmark entry for structural re-parameterization: timm RepVGG-A0 in its training form (multi-branch,
eval mode) vs after `fusedconv.reparameterize` vs after `fusedconv.convert` (reparameterize + fuse), plus
timm's own `reparameterize_model` for reference. Random weights, randomized BN statistics.

    python bench/bench_reparam.py [--device cpu|cuda] [--quick]

`run(device, quick)` returns one dict per variant (the bench suite collects these).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

import fusedconv
from fusedconv import fold


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics so that the merge has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if fold.is_batchnorm(m) and getattr(m, "running_mean", None) is not None:
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def _time_ms(model: nn.Module, x: torch.Tensor, iters: int, warmup: int) -> float:
    """Median milliseconds per forward (synchronised on CUDA)."""
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _convert(model: nn.Module) -> nn.Module:
    """convert() reparameterizes first once it calls reparameterize(); until then do it explicitly."""
    out, report = fusedconv.convert(model, return_report=True)
    if not any(r.kind == "reparam" for r in report.rows):
        out = fusedconv.convert(fusedconv.reparameterize(model))
    return out


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Time the RepVGG-A0 variants on `device`; `quick` uses a small input and few iterations (CI smoke)."""
    import timm
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    size, batch = (64, 1) if quick else (224, 8 if device == "cuda" else 1)
    iters, warmup = (3, 1) if quick else (30 if device == "cuda" else 10, 5)
    base = _randomize_bn(timm.create_model("repvgg_a0", pretrained=False)).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        ref = base(x).double()
    t0 = time.perf_counter()
    reparam = fusedconv.reparameterize(base)
    reparam_s = time.perf_counter() - t0
    variants = {
        "training_form": base,
        "fusedconv.reparameterize": reparam,
        "fusedconv.convert": _convert(base),
        "timm.reparameterize_model": reparameterize_model(base),
    }
    rows = []
    x_dev = x.to(device)
    for name, model in variants.items():
        model = model.to(device)
        with torch.no_grad():
            out = model(x_dev).double().cpu()
        err = float((out - ref).abs().max() / ref.abs().max())
        rows.append({
            "bench": "reparam", "model": "repvgg_a0", "variant": name, "device": device,
            "dtype": "float32", "batch": batch, "size": size,
            "ms": round(_time_ms(model, x_dev, iters, warmup), 3), "max_rel_error": err,
            "params": sum(p.numel() for p in model.parameters()),
        })
    rows[1]["reparameterize_seconds"] = round(reparam_s, 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.device, args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
