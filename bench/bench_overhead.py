"""Per-call overhead of FusedConv2d on CPU: a call on a tiny tensor against the bare op it ends up running.

Two routes of the eager CPU path (fusedconv/cpu.py), each against its own bare call with the same arguments:
- NCHW float32 -> `F.conv2d(x, folded_weight, bias, ...)` (identity activation, so nothing else runs);
- channels_last float32 -> `torch.ops.mkldnn._convolution_pointwise.default(x, packed_weight, bias, ...)`.
The tensor is tiny (1x4x8x8, 3x3 conv) so the conv itself costs a few microseconds and the difference is the
Python work per call (nn.Module.__call__, signature lookup, cache check, dispatch); a third row times an
nn.Identity call, the part of it no module can avoid. Each route's overhead is also split in two by timing
`module.forward(x)` in the same rounds: `module_call_us` (nn.Module.__call__ around forward) and
`forward_path_us` (FusedConv2d.forward plus the eager path's tracing / weight / signature checks). Timed in interleaved rounds (module, bare,
module, bare, ...) with `timeit`, on one torch thread whatever the suite's thread count (with two threads on a
shared machine each tiny conv waits on its second thread, and that wait, not Python, dominates); the overhead is
the median of the per-round differences, in microseconds.

Clock: the calling thread's CPU time (`time.thread_time`) by default, wall time with `--clock wall`. Both time
the same single-threaded calls; on a shared machine the thread's CPU time leaves out the time other processes
held the core, which otherwise lands at random on either side of a round and swamps a few-microsecond difference
(cache and frequency effects of a busy machine remain in both).

Run alone: `python -m bench.bench_overhead [--rounds N] [--clock thread|wall]`; `python -m bench --suite overhead`
records it too (thread CPU time).
"""

from __future__ import annotations

import argparse
import time
import timeit

import torch
import torch.nn.functional as F

TARGET_US = 3.0  # the goal for the NCHW route (issue: <= 3 us over a bare F.conv2d)


def _median(values):
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def _interleaved_us(module_call, bare_call, rounds: int, number: int, timer) -> tuple[float, float, float]:
    """(module median, bare median, median of per-round differences), microseconds per call."""
    med, to_bare, _ = _interleaved_split({"module": module_call, "bare": bare_call}, rounds, number, timer)
    return med["module"], med["bare"], to_bare["module"]


def _interleaved_split(calls: dict, rounds: int, number: int, timer) -> tuple[dict, dict, dict]:
    """Each callable timed in turn, round after round; microseconds per call. Returns the median of each, the
    median per-round difference of each to the last one (the bare call), and to the next one in `calls`
    (consecutive differences split a call into its layers)."""
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
            {n: _median(v) for n, v in to_next.items()})


def run(quick: bool = False, rounds: int | None = None, clock: str = "thread") -> list[dict]:
    """One row per route: module and bare medians and the overhead (us), with the setup that was timed."""
    if clock not in CLOCKS:
        raise ValueError(f"clock: expected one of {tuple(CLOCKS)}, got {clock!r}")
    rounds = rounds or (15 if quick else 41)
    number = 500 if quick else 2000
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [dict(row, clock=clock) for row in _run(rounds, number, CLOCKS[clock])]
    finally:
        torch.set_num_threads(threads)


def _run(rounds: int, number: int, timer) -> list[dict]:
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
            call = (lambda x=x: module(x))
            forward = (lambda x=x, f=module.forward: f(x))  # the same, without nn.Module.__call__
            for _ in range(3):
                call(), forward(), bare()
            med, to_bare, to_next = _interleaved_split({"module": call, "forward": forward, "bare": bare},
                                                       rounds, number, timer)
            # overhead splits into module_call (nn.Module.__call__ around forward) and forward_path
            # (FusedConv2d.forward and the eager CPU path's checks around the bare op); all three are medians
            # of per-round differences, so the parts add up to the overhead only approximately.
            rows.append({"layout": layout, "route": route, "bare": bare_name, "shape": "1x4x8x8 k3 p1",
                         "threads": torch.get_num_threads(), "rounds": rounds, "calls_per_round": number,
                         "module_us": med["module"], "bare_us": med["bare"], "overhead_us": to_bare["module"],
                         "module_call_us": to_next["module"], "forward_path_us": to_next["forward"]})
        # The floor under any module: nn.Module.__call__ itself (an nn.Identity call against returning x).
        identity, x = torch.nn.Identity(), torch.randn(1, 4, 8, 8)
        mod_us, bare_us, over_us = _interleaved_us(lambda: identity(x), lambda: x, rounds, number, timer)
        rows.append({"layout": "-", "route": "nn.Identity", "bare": "x", "shape": "1x4x8x8",
                     "threads": torch.get_num_threads(), "rounds": rounds, "calls_per_round": number,
                     "module_us": mod_us, "bare_us": bare_us, "overhead_us": over_us})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 41)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="thread",
                   help="thread: the calling thread's CPU time (default); wall: elapsed time")
    args = p.parse_args(argv)
    for r in run(rounds=args.rounds, clock=args.clock):
        split = ""
        if "module_call_us" in r:
            split = (f" = nn.Module.__call__ {r['module_call_us']:5.2f} + forward path {r['forward_path_us']:5.2f}")
        print(f"{r['layout']:<13} {r['route']:<7} module {r['module_us']:7.2f} us  bare {r['bare']} "
              f"{r['bare_us']:7.2f} us  overhead {r['overhead_us']:6.2f} us{split} (target <= {TARGET_US:g} us, "
              f"median of {r['rounds']} interleaved rounds x {r['calls_per_round']} calls, {r['clock']} clock)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
