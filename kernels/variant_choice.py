"""Per-shape choice between kernel families that compute the same conv: the pointer implicit GEMM and, where
eligible on sm_90, a TMA-descriptor kernel — autotuning across kernels, not only across one kernel's configs.

Triton's autotuner picks configs of one kernel; which kernel family is faster for a layer (TMA bulk copies vs
the pointer kernel's cp.async gathers, the pointer path's split-K / stream-K schedules) is only known by
running both. `choose(key, candidates)` does that once per launch signature: each candidate launch runs once
(its own autotuner tunes then), then both are timed with `triton.testing.do_bench` and the fastest name is
cached. Outputs are identical in meaning (every candidate writes the whole output), so timing the real call's
launches is harmless.

No timing while torch traces the launcher or a CUDA graph captures (nothing may synchronise there): the
first candidate (the pointer kernel) runs until an eager call has made the choice.
"""

from __future__ import annotations

import torch

_choices: dict = {}


def can_time(device: torch.device) -> bool:
    """Whether a launch on `device` may be timed now (eager CUDA, not tracing, not capturing a graph)."""
    from fusedconv.kernels.epilogue import _tracing

    if device.type != "cuda" or _tracing():
        return False
    try:
        return not torch.cuda.is_current_stream_capturing()
    except (RuntimeError, AssertionError):  # no driver
        return False


def choose(key, candidates: dict, device: torch.device) -> str:
    """Name of the fastest candidate for `key` ({name: zero-argument launch}); the first name until timed."""
    name = _choices.get(key)
    if name is not None:
        return name
    first = next(iter(candidates))
    if len(candidates) == 1 or not can_time(device):
        return first
    import triton.testing

    times = {}
    for cand, launch in candidates.items():
        launch()  # compile and autotune outside the timing
        times[cand] = triton.testing.do_bench(launch, warmup=5, rep=20)
    name = min(times, key=times.get)
    _choices[key] = name
    return name


def chosen() -> dict:
    """Every choice made so far ({launch signature: name}), for reports."""
    return dict(_choices)
