"""Timing a callable: `torch.utils.benchmark` on CPU, `triton.testing.do_bench` (or CUDA events) on GPU.

Both report the median and the interquartile range of per-call times after a warm-up, never a single run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from bench import metrics


@dataclass
class Timing:
    median_s: float
    q25_s: float
    q75_s: float
    runs: int
    method: str

    @property
    def iqr_s(self) -> float:
        return self.q75_s - self.q25_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["iqr_s"] = self.iqr_s
        return d


def time_cpu(fn, *, min_run_time: float = 0.2, warmup: int = 2) -> Timing:
    """Median / IQR of `fn()` on CPU with torch.utils.benchmark's blocked autorange."""
    from torch.utils import benchmark

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)  # seconds per call, one entry per measured block
    if len(times) < 3:
        # A call slower than min_run_time gives a single block; take a few more so the spread means something.
        with torch.no_grad():
            times += [timer.timeit(1).median for _ in range(3 - len(times))]
    return Timing(metrics.median(times), metrics.quantile(times, 0.25), metrics.quantile(times, 0.75), len(times),
                  "torch.utils.benchmark.blocked_autorange")


def time_cpu_interleaved(fns: dict, *, min_run_time: float = 0.2, rounds: int = 4, warmup: int = 2) -> dict:
    """Median / IQR per callable, measured in interleaved rounds (A B C A B C ...).

    On a shared machine the background load drifts; interleaving spreads that drift over every provider instead
    of penalising whichever happened to run during a busy second. Each round is one torch.utils.benchmark
    blocked autorange per callable; the statistics are over all blocks of all rounds. `min_run_time` is the
    total over all callables and rounds.
    """
    from torch.utils import benchmark

    per_round = min_run_time / max(len(fns), 1) / rounds
    times = {name: [] for name in fns}
    runs = dict.fromkeys(fns, 0)
    with torch.no_grad():
        timers = {}
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        for _ in range(rounds):
            for name, timer in timers.items():
                m = timer.blocked_autorange(min_run_time=per_round)
                times[name] += list(m.times)
                runs[name] += len(m.times) * m.number_per_run
    return {name: Timing(metrics.median(t), metrics.quantile(t, 0.25), metrics.quantile(t, 0.75), runs[name],
                         f"torch.utils.benchmark blocked_autorange, {rounds} interleaved rounds")
            for name, t in times.items()}


def time_cuda(fn, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, cuda_graph: bool = False) -> Timing:
    """Median / IQR of `fn()` on the current CUDA device (do_bench when Triton is there, else CUDA events).

    With `cuda_graph=True` the calls are replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`), so a
    single layer's time is the GPU's, not the Python launch overhead's: a ResNet layer at batch 32 runs in
    5-20 us, less than one eager launch of any provider. Falls back to plain do_bench if capture fails.
    """
    with torch.no_grad():
        fn()  # first call: lazy initialisation, autotuning, compilation — not timed
        torch.cuda.synchronize()
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if cuda_graph and do_bench is not None:
            try:
                from triton.testing import do_bench_cudagraph

                med, q25, q75 = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
                return Timing(med / 1e3, q25 / 1e3, q75 / 1e3, _estimated_runs(fn, rep_ms),
                              "triton.testing.do_bench_cudagraph")
            except Exception:  # capture unsupported by this provider: time it eagerly, say so in `method`
                torch.cuda.synchronize()
        if do_bench is not None:
            # do_bench clears the L2 cache before every call, so these are cold-cache times.
            med, q25, q75 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
            runs = _estimated_runs(fn, rep_ms)
            return Timing(med / 1e3, q25 / 1e3, q75 / 1e3, runs, "triton.testing.do_bench")
        return _time_cuda_events(fn, warmup_ms, rep_ms)


def _estimated_runs(fn, rep_ms: float) -> int:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return max(1, int(rep_ms / max(start.elapsed_time(end), 1e-3)))


def _time_cuda_events(fn, warmup_ms: float, rep_ms: float) -> Timing:
    per_call_ms = max(rep_ms / _estimated_runs(fn, rep_ms), 1e-3)
    for _ in range(max(1, math.ceil(warmup_ms / per_call_ms))):
        fn()
    n = max(5, math.ceil(rep_ms / per_call_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    return Timing(metrics.median(times), metrics.quantile(times, 0.25), metrics.quantile(times, 0.75), n,
                  "cuda events")


def time_fn(fn, device: torch.device, *, quick: bool = False, cpu_min_run_time: float | None = None,
            cuda_graph: bool = False) -> Timing:
    if device.type == "cuda":
        with torch.cuda.device(device):
            return time_cuda(fn, rep_ms=40.0 if quick else 100.0, cuda_graph=cuda_graph)
    return time_cpu(fn, min_run_time=cpu_min_run_time if cpu_min_run_time is not None else (0.05 if quick else 0.2))
