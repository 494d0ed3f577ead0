"""Which backend each launch ran ("triton pointer", "triton tma", "cudnn", ...), recorded only while asked.

The launcher calls `record(name)` after it has decided; outside a `recording()` block that is one global
check. Reports attribute the records to layers (fusedconv.report.layer_backends runs a model under hooks).
"""

from __future__ import annotations

import contextlib

#: Launcher candidate name -> the backend name reports show.
LABELS = {"pointer": "triton pointer", "tma": "triton tma", "cudnn": "cudnn", "depthwise": "triton depthwise"}

_log: list | None = None


def record(name: str) -> None:
    """Note that a launch ran `name` (a key of LABELS, or a label itself) when a recording is active."""
    if _log is not None:
        _log.append(LABELS.get(name, name))


def active() -> bool:
    """Whether a recording is on (a launch may skip working out a `refine` label otherwise)."""
    return _log is not None


def refine(label: str) -> None:
    """Replace the latest record with a more precise `label` once the launch knows it (the TMA 1x1 kernel: which
    of its configs the autotuner ran, "triton tma persistent" for a persistent one), when a recording is active."""
    if _log:
        _log[-1] = label


@contextlib.contextmanager
def recording():
    """Collect the backend of every launch in the block into the yielded list (in launch order)."""
    global _log
    previous, _log = _log, []
    try:
        yield _log
    finally:
        _log = previous
