"""The per-call overhead bench (bench/bench_overhead.py) runs and times what it says it times.

No timing is asserted (that is the bench's job); this checks that each row timed the route it names, against
the bare op of that route, with the clock it names, and that a wrong clock is refused with a clear error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import bench_overhead  # noqa: E402

from fusedconv import cpu  # noqa: E402


@pytest.mark.parametrize("clock", ["thread", "wall"])
def test_rows_name_the_route_the_bare_op_and_the_clock(clock):
    rows = bench_overhead.run(quick=True, rounds=1, clock=clock)
    by_layout = {r["layout"]: r for r in rows}
    assert set(by_layout) == {"NCHW", "channels_last", "-"}
    assert by_layout["NCHW"]["route"] == cpu.FOLDED and by_layout["NCHW"]["bare"] == "F.conv2d"
    expected_cl = cpu.ONEDNN if cpu.available() else cpu.FOLDED_CL
    assert by_layout["channels_last"]["route"] == expected_cl
    assert by_layout["-"]["route"] == "nn.Identity"
    for r in rows:
        assert r["clock"] == clock and r["rounds"] == 1 and r["threads"] == 1
        assert r["module_us"] > 0 and r["bare_us"] > 0
    for layout in ("NCHW", "channels_last"):  # each route's overhead is split into its two layers
        assert {"module_call_us", "forward_path_us"} <= set(by_layout[layout])


def test_split_differences_are_per_round_and_consecutive():
    """_interleaved_split's bookkeeping, with a fake clock: each call advances it by a known amount."""
    clock = [0.0]
    cost = {"a": 5e-6, "b": 3e-6, "c": 1e-6}

    def timed(name):
        def call():
            clock[0] += cost[name]
        return call

    med, to_last, to_next = bench_overhead._interleaved_split({n: timed(n) for n in cost}, rounds=3, number=10,
                                                              timer=lambda: clock[0])
    assert med == pytest.approx({"a": 5.0, "b": 3.0, "c": 1.0})
    assert to_last == pytest.approx({"a": 4.0, "b": 2.0})
    assert to_next == pytest.approx({"a": 2.0, "b": 2.0})


def test_unknown_clock_is_refused():
    with pytest.raises(ValueError, match="clock: expected one of"):
        bench_overhead.run(quick=True, rounds=1, clock="cycles")
