"""Per-call overhead of FusedConv2d on CPU: a call on a tiny tensor against the bare op it ends up running.

Two routes of the eager CPU path (fusedconv/cpu.py), each against its own bare call with the same arguments:
- NCHW float32 -> `F.conv2d(x, folded_weight, bias, ...)` (identity activation, so nothing else runs);
- channels_last float32 -> `torch.ops.mkldnn._convolution_pointwise.default(x, packed_weight, bias, ...)`.
The tensor is tiny (1x4x8x8, 3x3 conv; the oneDNN route forced for it, `cpu.small_conv_macs = 0`, where by default
a conv this small stays on F.conv2d) so the conv itself costs a few microseconds and the difference is the
Python work per call (the module call's checks, signature lookup, cache check, dispatch); a third row times an
nn.Identity call, the part of it no module can avoid. Each route's overhead is also split in two by timing
`module.forward(x)` in the same rounds: `module_call_us` (the module call against a call of its forward:
FusedConv2d.__call__'s hook / compile / patch checks, less forward's own frame and prelude, which a lone
`module(x)` skips by running the eager path itself) and `forward_path_us` (FusedConv2d.forward plus the eager
path's tracing / weight / signature checks). Timed in interleaved rounds (module, bare,
module, bare, ...) with `timeit`, on one torch thread whatever the suite's thread count (with two threads on a
shared machine each tiny conv waits on its second thread, and that wait, not Python, dominates); the overhead is
the median of the per-round differences, in microseconds.

Op: `--op real` (default) times the module against its real bare op. `--op null` swaps that op for a no-op
Python function (it returns its first argument) on both sides for the duration of the run: the module's hot path
then calls the no-op exactly where it calls the op (fusedconv.cpu's `_conv2d` / `_pointwise`) and the bare side
calls the same no-op with the same arguments, so the difference is the Python work alone, without the several
microseconds of run-to-run jitter a real conv adds to each side on a shared machine. The spread of the per-round
differences is reported as their interquartile range (`overhead_p25_us`, `overhead_p75_us`).

Clock: the calling thread's CPU time (`time.thread_time`) by default, wall time with `--clock wall`. Both time
the same single-threaded calls; on a shared machine the thread's CPU time leaves out the time other processes
held the core, which otherwise lands at random on either side of a round and swamps a few-microsecond difference
(cache and frequency effects of a busy machine remain in both).

Run alone: `python -m bench.bench_overhead [--rounds N] [--clock thread|wall] [--op real|null] [--json PATH]`;
`python -m bench --suite overhead`
records it too (thread CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import timeit

import torch
import torch.nn.functional as F

TARGET_US = 3.0  # the goal for the NCHW route (issue: <= 3 us over a bare F.conv2d)


def _median(values):
    return _quantile(values, 0.5)


def _quantile(values, q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]); q = 0.5 is the usual median."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def _interleaved_split(calls: dict, rounds: int, number: int, timer) -> tuple[dict, dict, dict, dict]:
    """Each callable timed in turn, round after round; microseconds per call. Returns the median of each, the
    median per-round difference of each to the last one (the bare call), and to the next one in `calls`
    (consecutive differences split a call into its layers), and the (25th, 75th) percentiles of the per-round
    differences to the last one."""
    names = list(calls)
    times = {n: [] for n in names}
    to_last = {n: [] for n in names[:-1]}
    to_next = {n: [] for n in names[:-1]}
    for _ in range(rounds):
        now = {n: timeit.timeit(calls[n], number=number, timer=timer) / number * 1e6 for n in names}
        for n in names:
            times[n].append(now[n])
        for a, b in zip(names, names[1:]):
            to_last[a].append(now[a] - now[names[-1]])
            to_next[a].append(now[a] - now[b])
    return ({n: _median(v) for n, v in times.items()}, {n: _median(v) for n, v in to_last.items()},
            {n: _median(v) for n, v in to_next.items()},
            {n: (_quantile(v, 0.25), _quantile(v, 0.75)) for n, v in to_last.items()})


OPS = ("real", "null")


def _null_op(x, *args):
    # Stands in for the conv on both sides in `--op null`: what remains of a call is its Python work.
    return x


def run(quick: bool = False, rounds: int | None = None, clock: str = "thread", op: str = "real") -> list[dict]:
    """One row per route: module and bare medians and the overhead (us), with the setup that was timed."""
    if clock not in CLOCKS:
        raise ValueError(f"clock: expected one of {tuple(CLOCKS)}, got {clock!r}")
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    rounds = rounds or (15 if quick else 41)
    number = 500 if quick else 2000
    from fusedconv import cpu

    threads, small = torch.get_num_threads(), cpu.small_conv_macs
    torch.set_num_threads(1)
    # The channels_last row times the oneDNN route, which a conv this small would not take by default.
    cpu.small_conv_macs = 0
    try:
        return [dict(row, clock=clock, op=op) for row in _run(rounds, number, CLOCKS[clock], op == "null")]
    finally:
        torch.set_num_threads(threads)
        cpu.small_conv_macs = small


def _run(rounds: int, number: int, timer, null_op: bool) -> list[dict]:
    from fusedconv import cpu
    from fusedconv.modules import FusedConv2d

    torch.manual_seed(0)
    module = FusedConv2d(torch.randn(4, 4, 3, 3), torch.rand(4) + 0.5, torch.randn(4), padding=1)
    rows = []
    with torch.no_grad():
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(1, 4, 8, 8).contiguous(memory_format=fmt)
            module(x)  # first call: validation, routing, fold (and packing) happen here, not in the timing
            state = module._cpu_state
            route = state.routes[next(reversed(state.routes))]
            if route == cpu.ONEDNN:
                packed, bias = state.packed, state.bias

                # The C++ callable the module's hot path calls (cpu._pointwise): the OpOverload, or worse the
                # packet, would add its own Python frames to the bare side and hide part of the overhead.
                op = cpu._pointwise

                def bare(x=x, packed=packed, bias=bias, op=op):
                    return op(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
                bare_name = "mkldnn._convolution_pointwise"
            else:
                weight, bias = state.weight, state.bias

                def bare(x=x, weight=weight, bias=bias):
                    return F.conv2d(x, weight, bias, (1, 1), (1, 1), (1, 1), 1)
                bare_name = "F.conv2d"
            if null_op:
                if route == cpu.ONEDNN:
                    def bare(x=x, packed=packed, bias=bias, op=_null_op):
                        return op(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
                else:
                    def bare(x=x, weight=weight, bias=bias, op=_null_op):
                        return op(x, weight, bias, (1, 1), (1, 1), (1, 1), 1)
                bare_name = "no-op (for " + bare_name + ")"
            call = (lambda x=x: module(x))
            forward = (lambda x=x, f=module.forward: f(x))  # the same, without the module call
            saved = cpu._conv2d, cpu._pointwise
            if null_op:
                cpu._conv2d = cpu._pointwise = _null_op
            try:
                for _ in range(3):
                    call(), forward(), bare()
                med, to_bare, to_next, spread = _interleaved_split(
                    {"module": call, "forward": forward, "bare": bare}, rounds, number, timer)
            finally:
                cpu._conv2d, cpu._pointwise = saved
            # overhead splits into module_call (the module call against its forward) and forward_path
            # (FusedConv2d.forward and the eager CPU path's checks around the bare op); all three are medians
            # of per-round differences, so the parts add up to the overhead only approximately.
            rows.append({"layout": layout, "route": route, "bare": bare_name, "shape": "1x4x8x8 k3 p1",
                         "threads": torch.get_num_threads(), "rounds": rounds, "calls_per_round": number,
                         "module_us": med["module"], "bare_us": med["bare"], "overhead_us": to_bare["module"],
                         "overhead_p25_us": spread["module"][0], "overhead_p75_us": spread["module"][1],
                         "module_call_us": to_next["module"], "forward_path_us": to_next["forward"]})
        # The floor under any module: nn.Module.__call__ itself (an nn.Identity call against returning x).
        identity, x = torch.nn.Identity(), torch.randn(1, 4, 8, 8)
        med, to_bare, _, spread = _interleaved_split({"module": lambda: identity(x), "bare": lambda: x},
                                                     rounds, number, timer)
        rows.append({"layout": "-", "route": "nn.Identity", "bare": "x", "shape": "1x4x8x8",
                     "threads": torch.get_num_threads(), "rounds": rounds, "calls_per_round": number,
                     "module_us": med["module"], "bare_us": med["bare"], "overhead_us": to_bare["module"],
                     "overhead_p25_us": spread["module"][0], "overhead_p75_us": spread["module"][1]})
    return rows


def _recorded_run(args, command: list[str]) -> tuple[list[dict], dict]:
    """run() with the environment and the other processes' CPU use before and during it (bench/env.py)."""
    from bench import env

    cpus = os.cpu_count()
    busy_before, note_before = env.busy_at_start(cpus, env.load_average())
    during = env.OtherCPUUse()
    rows = run(rounds=args.rounds, clock=args.clock, op=args.op)
    busy_during = during.cores()
    notes = [n for n in (note_before, env.busy_note(busy_during, cpus, "during the run",
                                                   what="cores kept busy by other processes,")) if n]
    # The command as typed (`python -m ...`), not sys.argv[0]'s absolute path on the machine that ran it.
    record = {"environment": env.environment(torch.device("cpu"), command), "other_cores_busy_before": busy_before,
              "other_cores_busy_during": busy_during, "busy_notes": notes, "rows": rows}
    return rows, record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 41)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="thread",
                   help="thread: the calling thread's CPU time (default); wall: elapsed time")
    p.add_argument("--op", choices=OPS, default="real",
                   help="real: against the bare op (default); null: the op swapped for a no-op on both sides")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows, the environment and how busy the machine was to PATH")
    args = p.parse_args(argv)
    command = ["python", "-m", "bench.bench_overhead", *(sys.argv[1:] if argv is None else argv)]
    rows, record = (_recorded_run(args, command) if args.json
                    else (run(rounds=args.rounds, clock=args.clock, op=args.op), None))
    if record is not None:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    for r in rows:
        split = ""
        if "module_call_us" in r:
            split = (f" = module call {r['module_call_us']:5.2f} + forward path {r['forward_path_us']:5.2f}")
        print(f"{r['layout']:<13} {r['route']:<7} module {r['module_us']:7.2f} us  bare {r['bare']} "
              f"{r['bare_us']:7.2f} us  overhead {r['overhead_us']:6.2f} us "
              f"(IQR {r['overhead_p25_us']:.2f}-{r['overhead_p75_us']:.2f}){split} (target <= {TARGET_US:g} us, "
              f"median of {r['rounds']} interleaved rounds x {r['calls_per_round']} calls, {r['clock']} clock, "
              f"{r['op']} op)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
