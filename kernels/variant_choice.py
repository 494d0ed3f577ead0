"""Per-shape choice between kernel families that compute the same conv: the pointer implicit GEMM and, where
eligible on sm_90, a TMA-descriptor kernel — autotuning across kernels, not only across one kernel's configs.

Triton's autotuner picks configs of one kernel; which kernel family is faster for a layer (TMA bulk copies vs
the pointer kernel's cp.async gathers, the pointer path's split-K / stream-K schedules) is only known by
running both. `choose(key, candidates)` does that once per launch signature: each candidate launch runs once
(its own autotuner tunes then), then each is timed on the device (`device_time_ms`) and the fastest name is
cached. Outputs are identical in meaning (every candidate writes the whole output), so timing the real call's
launches is harmless — and checkable: given the `output` tensor the candidates write, each candidate's result
is compared with the first's (the pointer kernel's) before it may be timed, and one that disagrees beyond its
dtype's rounding (a kernel that is wrong on this GPU / driver / triton, which no CPU test can see) is dropped
for good with a warning, so a faster but wrong variant can never be chosen silently.

No timing while torch traces the launcher or a CUDA graph captures (nothing may synchronise there): the
first candidate (the pointer kernel) runs until an eager call has made the choice.

Choices survive the process: `export_choices()` / `import_choices(entries, source)` turn them into JSON-able
entries keyed by a portable form of the launch signature (dtypes by name, the device by its type: the table
is kept per GPU model and triton version by `fusedconv.tuning`) and back. Import validates every entry —
a malformed entry or an unknown candidate name is an error naming the source and the entry, never silently
used — and a loaded choice is taken without timing, as long as that candidate is offered for the launch.
(The rule's schedule — data-parallel, split-K, stream-K — needs no persisting: it is a pure function of the
shape and the SM count, `schedule.choose_schedule`. Where it leaves the GPU short and a stream-K schedule
would fill it, that schedule is one more candidate, "streamk" (the pointer stream-K kernel on
`schedule.filling_streamk` programs, also a function of the shape and SM count), timed and persisted like
the others. Both families run the rule's schedule: a stream-K layer's "tma" candidate is the
TMA stream-K kernel, so a saved "tma" choice means the TMA kernel under the layer's schedule; split-K layers
offer no "tma" candidate, and a saved choice naming one is timed anew as any choice not offered.)
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

_choices: dict = {}
# Choices loaded from a saved table: portable key -> candidate name (see `portable_key`).
_loaded: dict = {}

#: Candidate names a choice may hold: `choose` refuses others, so a new kernel family registers its name here
#: and a saved table naming it loads.
CANDIDATE_NAMES = {"pointer", "tma", "cudnn", "streamk"}


def can_time(device: torch.device) -> bool:
    """Whether a launch on `device` may be timed now (eager CUDA, not tracing, not capturing a graph)."""
    from fusedconv.kernels.epilogue import _tracing

    if device.type != "cuda" or _tracing():
        return False
    try:
        return not torch.cuda.is_current_stream_capturing()
    except (RuntimeError, AssertionError):  # no driver
        return False


#: Largest relative difference (max |a - b| / max |first|) two correct kernels' outputs may show: both
#: accumulate in fp32 and differ only in summation order and the final rounding (TF32 inputs for float32).
AGREEMENT_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-2, torch.float64: 1e-9}


def disagreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf where the non-finite entries differ), computed in float64."""
    o, r = out.double(), ref.double()
    if not torch.equal(torch.isfinite(o), torch.isfinite(r)):
        return float("inf")
    finite = torch.isfinite(r)
    o, r = o[finite], r[finite]
    if r.numel() == 0:
        return 0.0
    return float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))


def choose(key, candidates: dict, device: torch.device, output: torch.Tensor | None = None) -> str:
    """Name of the fastest candidate for `key` ({name: zero-argument launch}); the first name until timed.

    With `output` (the tensor every candidate writes), a candidate whose result disagrees with the first
    candidate's is dropped (warned once) instead of timed."""
    unknown = set(candidates) - CANDIDATE_NAMES
    if unknown:
        raise ValueError(f"candidates: unknown kernel family {sorted(unknown)}; register it in "
                         f"variant_choice.CANDIDATE_NAMES (known: {sorted(CANDIDATE_NAMES)})")
    name = _choices.get(key)
    if name is not None:
        return name
    if _loaded:
        name = _loaded.get(portable_key(key))
        if name in candidates:  # a saved choice: no timing (one no longer offered here is timed anew)
            _choices[key] = name
            return name
    first = next(iter(candidates))
    if len(candidates) == 1 or not can_time(device):
        return first
    times, reference = {}, None
    for cand, launch in candidates.items():
        launch()  # compile and autotune outside the timing
        if output is not None:
            if reference is None:
                reference = output.clone()
            else:
                err = disagreement(output, reference)
                if not err <= AGREEMENT_TOL.get(output.dtype, 1e-2):
                    warnings.warn(f"fusedconv: the {cand!r} kernel disagrees with the {first!r} kernel on this "
                                  f"device (relative difference {err:.3g}) for launch {key!r}; it is not used",
                                  RuntimeWarning, stacklevel=3)
                    continue
        times[cand] = device_time_ms(launch, device)
    name = min(times, key=times.get)
    _choices[key] = name
    return name


#: Launches per timed sample, and samples per candidate (their median is the candidate's time).
TIMED_CALLS, TIMED_SAMPLES = 20, 5
#: Longest GPU sleep (ms) a sample may put in front of its launches (the host's enqueueing must fit in it).
MAX_SLEEP_MS = 200.0
_now = time.perf_counter  # the host clock (tests simulate a GPU against a fake one)
_cycles_per_ms: dict = {}


def device_time_ms(launch, device: torch.device) -> float:
    """Milliseconds the GPU spends on one `launch()`, without the host's time to issue it.

    Why not `triton.testing.do_bench`: it records events around each call, and a conv of 5-30 µs launched from
    Python (argument checks, the autotuner's dispatch, TMA descriptors built per call) can take longer to issue
    than to run, so its events may time the host — worst for the candidate with the most Python per launch. On
    the H200 (2026-12-04) choices timed that way kept cuDNN on ResNet-50's layer2.0.conv1 at batch 32, where,
    replayed from a CUDA graph, a persistent TMA config ran in 24.7 µs against cuDNN's 33.0 µs
    (bench/results/nvidia-h200/2026-12-04-tma1x1.md); consistent with host-bound timing, not yet shown to be
    its cause. Here each sample first puts a GPU sleep (`torch.cuda._sleep`) on the stream,
    long enough to cover the host's issuing of TIMED_CALLS launches, so the GPU then runs them back to back, as
    a CUDA-graph replay would: (end - start) / TIMED_CALLS is device time. A sample whose issuing outlasted its
    sleep is redone with twice the sleep (up to MAX_SLEEP_MS). No L2 flush: each candidate reruns on the same
    data, alike for all."""
    per_ms = _sleep_cycles_per_ms(device)
    start_host = _now()
    for _ in range(3):
        launch()
    issue_ms = (_now() - start_host) * 1e3 / 3  # host time to issue one launch
    sleep_ms = min(MAX_SLEEP_MS, 2.0 * issue_ms * TIMED_CALLS + 0.05)
    samples = []
    while len(samples) < TIMED_SAMPLES:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(sleep_ms * per_ms))
        begin = _now()
        start.record()
        for _ in range(TIMED_CALLS):
            launch()
        end.record()
        issued_ms = (_now() - begin) * 1e3
        end.synchronize()
        if issued_ms > 0.8 * sleep_ms and sleep_ms < MAX_SLEEP_MS:
            sleep_ms = min(MAX_SLEEP_MS, 2.0 * sleep_ms)  # the GPU may have waited for the host: not device time
            continue
        samples.append(start.elapsed_time(end) / TIMED_CALLS)
    return statistics.median(samples)


def _sleep_cycles_per_ms(device: torch.device) -> float:
    """`torch.cuda._sleep` cycles per millisecond on `device` (measured once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cycles_per_ms:
        cycles = 1_000_000
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _cycles_per_ms[index] = cycles / max(start.elapsed_time(end), 1e-3)
    return _cycles_per_ms[index]


def chosen() -> dict:
    """Every choice made so far ({launch signature: name}), for reports."""
    return dict(_choices)


def _portable(value):
    import torch as _torch

    if isinstance(value, _torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, _torch.device):
        return value.type
    if isinstance(value, (tuple, list)):
        return [_portable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"launch signature: cannot persist a {type(value).__name__} ({value!r})")


def portable_key(key) -> str:
    """The launch signature as a JSON string: dtypes by name, devices by type (stable across processes)."""
    import json

    return json.dumps(_portable(key), separators=(",", ":"))


def export_choices() -> list[dict]:
    """[{"key": portable key, "choice": name}] for every choice made or loaded (made ones win)."""
    merged = dict(_loaded)
    for key, name in _choices.items():
        try:
            merged[portable_key(key)] = name
        except TypeError:  # a signature that cannot be written (symbolic sizes): kept in memory only
            continue
    return [{"key": k, "choice": v} for k, v in sorted(merged.items())]


def validate_choices(entries, source: str) -> dict:
    """{portable key: name} from `export_choices` entries; raises ValueError naming `source` and the entry for
    anything that is not a list of {"key": JSON string of a list, "choice": a known candidate name}."""
    import json

    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'choices' must be a list of {{'key', 'choice'}} entries, "
                         f"got {type(entries).__name__}")
    out = {}
    for i, e in enumerate(entries):
        where = f"{source}: choices[{i}]"
        if not isinstance(e, dict) or set(e) != {"key", "choice"}:
            raise ValueError(f"{where}: expected an object with exactly 'key' and 'choice', got {e!r}")
        key, name = e["key"], e["choice"]
        if not isinstance(name, str) or name not in CANDIDATE_NAMES:
            raise ValueError(f"{where}: unknown candidate {name!r}; expected one of {sorted(CANDIDATE_NAMES)}")
        try:
            parsed = json.loads(key) if isinstance(key, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, list) or not parsed:
            raise ValueError(f"{where}: 'key' must be a launch signature written by export_choices "
                             f"(a JSON list), got {key!r}")
        out[key] = name
    return out


def import_choices(entries, source: str) -> int:
    """Validate `entries` (see `validate_choices`, all or nothing) and keep them as loaded choices; returns
    how many were new."""
    table = validate_choices(entries, source)
    added = sum(1 for k in table if k not in _loaded)
    _loaded.update(table)
    return added
