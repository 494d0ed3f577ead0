"""Speed sweep of the model zoo on CPU: is a converted model ever slower than the model it replaces?

`python -m bench.zoo_speed [--models SPEC,SPEC|--set default|tiny] [--size 128] [--threads 2] [--rounds 9]
[--json PATH] [--md PATH]`

Per model of bench/zoo_models.py (random weights, BatchNorm statistics randomized, eval mode, batch 1, float32
NCHW input at `--size`, raised to the model's minimum): the original in eager mode, `fusedconv.convert(model)` (the
path a user gets by default) and, where the model traces, `torch.fx.experimental.optimization.fuse` (the in-PyTorch
Conv+BN fold). Each is checked against the original first (the convert self-check tolerance for float32), then
timed in interleaved rounds (original, converted, fx fuse, original, ...: a round calls each `--calls` times, wall
clock, under no_grad), `--threads` torch threads. Per model the result is the median over rounds of the per-round
ratio converted / original (and converted / fx fuse) with its 25th-75th percentiles: a round's ratio compares
calls a few milliseconds apart, so the machine's drift over a minute cancels out of it.

A model is listed as slower when the converted model lost in at least three rounds in four (the 25th
percentile of its per-round ratio above 1): a difference the rounds agree on, not a median moved by noise.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from bench.metrics import quantile
from bench.zoo import (add_input_arguments, add_sweep_arguments, environment, first_line, rel_error, selected_models,
                       parse_sweep_arguments, sweep, with_timeout)
from bench.zoo_models import ZooModel

VARIANTS = ("original", "fusedconv", "fx_fuse")


def ratio_summary(num: list[float], den: list[float]) -> dict:
    """Median and 25th / 75th percentiles of the per-round ratios num[i] / den[i]."""
    if len(num) != len(den) or not num:
        raise ValueError(f"num / den: expected two equally long non-empty lists, got {len(num)} and {len(den)}")
    r = [a / b for a, b in zip(num, den)]
    return {"median": quantile(r, 0.5), "p25": quantile(r, 0.25), "p75": quantile(r, 0.75)}


def interleaved(fns: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Milliseconds per call of each callable, one value per round; the callables take turns within a round
    (their order alternates between rounds, so none always runs right after the same other one)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            fn = fns[n]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[n].append((time.perf_counter() - t0) / calls * 1e3)
    return times


def run_model(entry: ZooModel, size: int = 128, rounds: int = 9, calls: int = 3, seed: int = 0) -> dict:
    """The sweep's measurement of one model: a dict of plain values (module docstring)."""
    import torch.fx.experimental.optimization as fx_opt

    import fusedconv
    from fusedconv.comparison import SELF_CHECK_TOLERANCE
    from fusedconv.model_specs import randomize_batchnorm

    res: dict = {"model": entry.spec, "timed": False}
    torch.manual_seed(seed)
    model = entry.build(size)
    randomize_batchnorm(model, seed)
    shape = entry.input_shape(size, 1)
    res["input"] = list(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    tol = SELF_CHECK_TOLERANCE[torch.float32]
    with torch.no_grad():
        ref = model(x)
        fns = {"original": lambda: model(x)}
        fused = fusedconv.convert(model)
        res["err_fusedconv"] = rel_error(fused(x), ref)
        if not res["err_fusedconv"] <= tol:
            res["error"] = f"converted output differs from the original's by {res['err_fusedconv']:.3e}"
            return res
        fns["fusedconv"] = lambda: fused(x)
        try:
            fx_fused = fx_opt.fuse(copy.deepcopy(model))
            res["err_fx_fuse"] = rel_error(fx_fused(x), ref)
        except Exception as e:  # noqa: BLE001 - many models do not trace symbolically: no fx column for them
            res["fx_fuse"] = "does not trace: " + first_line(e)
        else:
            if res["err_fx_fuse"] <= tol:
                fns["fx_fuse"] = lambda: fx_fused(x)
            else:
                res["fx_fuse"] = f"output differs by {res['err_fx_fuse']:.3e}"
        for fn in fns.values():  # warm-up: first calls pack weights, check layouts, fill caches
            fn(), fn()
        times = interleaved(fns, rounds, calls)
    res["timed"] = True
    res["ms"] = {n: statistics.median(t) for n, t in times.items()}
    res["vs_original"] = ratio_summary(times["fusedconv"], times["original"])
    if "fx_fuse" in times:
        res["vs_fx_fuse"] = ratio_summary(times["fusedconv"], times["fx_fuse"])
    res["slower_than_original"] = res["vs_original"]["p25"] > 1.0
    res["slower_than_fx_fuse"] = "vs_fx_fuse" in res and res["vs_fx_fuse"]["p25"] > 1.0
    return res


def run_one(entry: ZooModel, size: int, rounds: int, calls: int, timeout: int) -> dict:
    return with_timeout(entry, timeout, lambda: run_model(entry, size, rounds, calls), timed=False)


def _ratio(r: dict | None) -> str:
    return "-" if r is None else f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})"


def render_markdown(results: list[dict], meta: dict) -> str:
    timed = [r for r in results if r["timed"]]
    slower = [r["model"] for r in timed if r["slower_than_original"]]
    slower_fx = [r["model"] for r in timed if r["slower_than_fx_fuse"]]
    with_fx = [r for r in timed if "vs_fx_fuse" in r]
    ratios = sorted(r["vs_original"]["median"] for r in timed)
    lines = ["# Model-zoo speed sweep of fusedconv.convert on CPU", "",
             f"Date {meta['date']}; machine {meta['machine']}, {meta['threads']} thread(s); "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".", "",
             f"Command: `{meta['command']}`", "",
             "Batch 1, float32, NCHW input; ratios are converted / original (and converted / fx fuse) time per "
             "forward, the median of per-round ratios with their 25th-75th percentiles (below 1: the converted "
             "model is faster). Slower means the converted model lost in at least three rounds in four.", "",
             "## Summary", "",
             f"- models: {len(results)} listed, {len(timed)} timed"
             + (f", {len(results) - len(timed)} not timed (below)" if len(timed) < len(results) else ""),
             f"- converted / original, median over models: {quantile(ratios, 0.5):.2f} "
             f"(best {ratios[0]:.2f}, worst {ratios[-1]:.2f})" if ratios else "- nothing timed",
             f"- slower than the original: {len(slower)}" + (f" ({', '.join(slower)})" if slower else ""),
             f"- slower than fx fuse: {len(slower_fx)} of {len(with_fx)} models fx traces"
             + (f" ({', '.join(slower_fx)})" if slower_fx else ""), "",
             "## Models", "",
             "| model | input | original ms | fusedconv ms | fx fuse ms | fusedconv / original | fusedconv / fx fuse |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if not r["timed"]:
            lines.append(f"| {r['model']} | - | - | - | - | not timed: {r.get('error', '?')} | - |")
            continue
        ms = r["ms"]
        fx = f"{ms['fx_fuse']:.2f}" if "fx_fuse" in ms else "-"
        flag = " **slower**" if r["slower_than_original"] else ""
        flag_fx = " **slower**" if r["slower_than_fx_fuse"] else ""
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {ms['original']:.2f} | "
                     f"{ms['fusedconv']:.2f} | {fx} | {_ratio(r['vs_original'])}{flag} | "
                     f"{_ratio(r.get('vs_fx_fuse'))}{flag_fx} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.zoo_speed", description=__doc__.splitlines()[0])
    add_sweep_arguments(p)
    add_input_arguments(p, size=128, threads=2, batch=False)
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per model")
    p.add_argument("--calls", type=int, default=3, help="calls of each variant per round")
    args = parse_sweep_arguments(p, argv, ("rounds", "calls", "threads"))
    sweep(selected_models(args), lambda entry: run_one(entry, args.size, args.rounds, args.calls, args.timeout),
          _status_line, render_markdown, environment(argv, "bench.zoo_speed"), args.json, args.md)
    return 0


def _status_line(res: dict) -> str:
    if not res["timed"]:
        return f"{res['model']:45s} not timed: {res.get('error')}"
    return (f"{res['model']:45s} {res['ms']['original']:8.2f} ms -> {res['ms']['fusedconv']:8.2f} ms  "
            f"x{_ratio(res['vs_original'])}  vs fx {_ratio(res.get('vs_fx_fuse'))}"
            f"{'  SLOWER' if res['slower_than_original'] else ''}  {res['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
