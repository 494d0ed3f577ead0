"""The benchmark's "machine was busy" note counts other processes' work, never the benchmark's own.

The old end-of-run check compared the 1-minute load average with the core count, and a 2-thread run on an idle
2-core machine put the load there by itself. bench/env.py's OtherCPUUse subtracts this process tree's CPU time
from the machine's; these tests check the arithmetic with fixed readings and that a busy child process of the
benchmark (as Inductor's compile workers are) is counted as the benchmark's own.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import env as bench_env  # noqa: E402

linux_proc = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")


def test_note_fires_only_above_half_the_cores():
    assert bench_env.busy_note(1.0, 2, "during the run") is None
    assert bench_env.busy_note(None, 2, "during the run") is None
    note = bench_env.busy_note(1.2, 2, "during the run", what="cores kept busy by other processes, on average,")
    assert note is not None and "during the run" in note and "1.2 on 2 logical cores" in note


def test_other_use_is_machine_time_less_own_time(monkeypatch):
    readings = {"clock": 100.0, "machine": 1000.0, "own": 50.0}
    monkeypatch.setattr(bench_env.time, "monotonic", lambda: readings["clock"])
    monkeypatch.setattr(bench_env, "_machine_busy_seconds", lambda: readings["machine"])
    monkeypatch.setattr(bench_env, "_own_cpu_seconds", lambda: readings["own"])
    use = bench_env.OtherCPUUse()
    # 10 s: the machine was busy 24 core-seconds, 20 of them this benchmark's -> others kept 0.4 cores busy.
    readings.update(clock=110.0, machine=1024.0, own=70.0)
    assert use.cores() == pytest.approx(0.4)
    # An idle machine under a 2-thread benchmark: all the busy time is its own -> 0, not "2 cores busy".
    readings.update(clock=120.0, machine=1040.0, own=90.0)
    assert use.cores() == pytest.approx(0.0)
    monkeypatch.setattr(bench_env, "_machine_busy_seconds", lambda: None)
    assert use.cores() is None


@linux_proc
def test_a_live_child_process_counts_as_the_benchmarks_own():
    before = bench_env._own_cpu_seconds()
    # The child burns 0.3 s of its own CPU time, then waits for us (alive, not reaped: getrusage cannot see it).
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time\nwhile time.process_time() < 0.3: pass\nprint('ok', flush=True)\n"
                              "sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        used = bench_env._own_cpu_seconds() - before
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert used >= 0.3 - 0.02  # clock ticks are 10 ms


@linux_proc
def test_machine_busy_seconds_grow_with_work():
    first = bench_env._machine_busy_seconds()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:
        pass
    assert bench_env._machine_busy_seconds() - first >= 0.2 - 0.02


def test_start_note_counts_others_over_a_window_not_the_load_average(monkeypatch):
    readings = {"clock": 100.0, "machine": 1000.0, "own": 50.0}
    monkeypatch.setattr(bench_env.time, "monotonic", lambda: readings["clock"])
    monkeypatch.setattr(bench_env, "_machine_busy_seconds", lambda: readings["machine"])
    monkeypatch.setattr(bench_env, "_own_cpu_seconds", lambda: readings["own"])

    def sleep(seconds, busy):  # the window passes: the machine was busy `busy` core-seconds, none of them ours
        readings.update(clock=readings["clock"] + seconds, machine=readings["machine"] + busy)

    # A previous run just ended: load average 1.9 on 2 cores, but nothing else runs now -> no note.
    monkeypatch.setattr(bench_env.time, "sleep", lambda s: sleep(s, 0.05 * s))
    cores, note = bench_env.busy_at_start(2, 1.9)
    assert cores == pytest.approx(0.05) and note is None
    # Another process keeps 1.5 cores busy -> the note, with that number.
    monkeypatch.setattr(bench_env.time, "sleep", lambda s: sleep(s, 1.5 * s))
    cores, note = bench_env.busy_at_start(2, 0.0)
    assert cores == pytest.approx(1.5) and note is not None and "1.5 on 2 logical cores" in note
    # No /proc/stat: the load average decides.
    monkeypatch.setattr(bench_env, "_machine_busy_seconds", lambda: None)
    cores, note = bench_env.busy_at_start(2, 1.9)
    assert cores is None and note is not None and "load average 1.9" in note
