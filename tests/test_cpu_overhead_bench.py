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


def test_unknown_clock_is_refused():
    with pytest.raises(ValueError, match="clock: expected one of"):
        bench_overhead.run(quick=True, rounds=1, clock="cycles")
