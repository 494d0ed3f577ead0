"""Benchmark entry for the per-call cost of guarded rewrites: converted torchvision resnet50 and mobilenet_v2,
and timm repvgg_a0 re-parameterized (`repvgg_a0:reparam`) and converted (`repvgg_a0`, whose blocks carry the
re-parameterization's guards as the base of convert's), each timed with its guards (the normal converted model) and with every guarded block's dispatch replaced by a
direct call of its first specialization (the same fused code, no guard check), interleaved in one run; plus
the guard expressions alone timed per forward (`guard_check_us`), which machine load cannot hide.

    python bench/bench_guards.py [--device cpu|cuda] [--quick] [--batch 1] [--rounds 7] [--threads 1]

`run(device, quick)` returns one dict per model (the bench suite collects these).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn as nn

import fusedconv
from fusedconv.graph.specialize import guard_table


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


def _direct(table):
    """A dispatch that skips the guards and runs the first specialization (valid for the bench's calls,
    which are the traced pattern)."""
    entry = table.entries[0]
    fn = entry.fn if entry.fn is not None else table.original.forward
    return lambda self, *args: fn(self, *args)


@contextlib.contextmanager
def unguarded(model: nn.Module):
    """Within the block, every guarded block of `model` runs its first specialization without checking."""
    tables = [t for t in (guard_table(m) for m in model.modules()) if t is not None]
    saved = [t.dispatch for t in tables]
    for t in tables:
        t.dispatch = _direct(t)
    try:
        yield len(tables)
    finally:
        for t, d in zip(tables, saved):
            t.dispatch = d


def guard_check_us(model: nn.Module, x: torch.Tensor, iters: int = 20000) -> float:
    """Microseconds per forward spent evaluating the guards of every guarded block once (each block's first
    specialization's expression, on a tensor argument as in these models): the cost the guards add, measured
    apart from the convolutions so that machine load does not hide it."""
    total = 0.0
    for m in model.modules():
        table = guard_table(m)
        if table is None:
            continue
        args = ", ".join(f"a{i}" for i in range(len(table.params)))
        src = (f"def check(self{', ' if args else ''}{args}):\n    d = self.__dict__\n    m = d['_modules']\n"
               f"    return {table.entries[0].guard}\n")
        namespace = dict(table.dispatch.__globals__)
        exec(compile(src, "<guard>", "exec"), namespace)  # noqa: S102
        check = namespace["check"]
        call_args = [x] * len(table.params)
        assert check(m, *call_args)
        t0 = time.perf_counter()
        for _ in range(iters):
            check(m, *call_args)
        total += (time.perf_counter() - t0) / iters * 1e6
    return total


MODELS = ("resnet50", "mobilenet_v2", "repvgg_a0:reparam", "repvgg_a0")


def _build(name: str, device: str) -> nn.Module:
    """The rewritten model the bench times: converted, or only re-parameterized for a `:reparam` name."""
    torch.manual_seed(0)
    arch, _, stage = name.partition(":")
    if arch.startswith("repvgg"):
        import timm

        model = timm.create_model(arch, pretrained=False).eval().to(device)
    else:
        import torchvision

        model = getattr(torchvision.models, arch)().eval().to(device)
    return fusedconv.reparameterize(model) if stage == "reparam" else fusedconv.convert(model)


def run(device: str = "cpu", quick: bool = False, batch: int = 1, rounds: int | None = None,
        models: tuple = MODELS) -> list[dict]:
    rounds = rounds or (3 if quick else 7)
    iters, warmup = (10, 3) if quick else (30, 5)
    rows = []
    for name in models:
        converted = _build(name, device)
        x = torch.randn(batch, 3, 224, 224, device=device)
        with torch.no_grad():
            ref = converted(x)
        guarded, direct = [], []
        for _ in range(rounds):  # interleaved: both see the same machine load
            guarded.append(_time_ms(converted, x, iters, warmup))
            with unguarded(converted) as n_guarded:
                direct.append(_time_ms(converted, x, iters, warmup))
                with torch.no_grad():
                    same = torch.equal(converted(x), ref)
        guarded.sort()
        direct.sort()
        check_us = guard_check_us(converted, x)
        g, d = guarded[len(guarded) // 2], direct[len(direct) // 2]
        rows.append({"model": name, "device": device, "batch": batch, "guarded_blocks": n_guarded,
                     "guarded_ms": round(g, 3), "unguarded_ms": round(d, 3),
                     "overhead_pct": round(100 * (g - d) / d, 2), "guard_check_us": round(check_us, 2),
                     "guard_check_pct_of_unguarded": round(100 * check_us / (d * 1e3), 4),
                     "spread_pct": round(100 * (max(direct) - min(direct)) / d, 2),
                     "same_output": same, "threads": torch.get_num_threads()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in run(args.device, args.quick, args.batch, args.rounds, tuple(args.models.split(","))):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
