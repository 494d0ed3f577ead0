"""Latency of the original and the converted model as `fusedconv demo` measures it (median seconds per call)."""

from __future__ import annotations


def measure_latencies(fns: dict, device, *, min_run_time: float = 1.0, rounds: int = 4) -> dict:
    """Median seconds per call of each callable: do_bench / CUDA events on GPU; on CPU torch.utils.benchmark in
    interleaved rounds (A B A B ...) so that load from other processes affects both alike."""
    import torch

    with torch.inference_mode():
        for fn in fns.values():
            fn()
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return {name: _cuda_latency(fn, device, min_run_time) for name, fn in fns.items()}
        from torch.utils import benchmark

        timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                  for name, fn in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, timer in timers.items():
                times[name] += list(timer.blocked_autorange(min_run_time=min_run_time / rounds).times)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _cuda_latency(fn, device, min_run_time: float) -> float:
    import torch

    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=int(min_run_time * 1000), return_mode="median") / 1e3
    except ImportError:
        times = []
        for _ in range(50):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e) / 1e3)
        return sorted(times)[len(times) // 2]
