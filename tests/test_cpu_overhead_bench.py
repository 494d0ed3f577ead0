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
        assert r["clock"] == clock and r["rounds"] == 1 and r["threads"] == 1 and r["op"] == "real"
        assert r["module_us"] > 0 and r["bare_us"] > 0
        assert r["overhead_p25_us"] <= r["overhead_us"] <= r["overhead_p75_us"]
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

    med, to_last, to_next, spread = bench_overhead._interleaved_split(
        {n: timed(n) for n in cost}, rounds=3, number=10, timer=lambda: clock[0])
    assert med == pytest.approx({"a": 5.0, "b": 3.0, "c": 1.0})
    assert to_last == pytest.approx({"a": 4.0, "b": 2.0})
    assert to_next == pytest.approx({"a": 2.0, "b": 2.0})
    assert spread["a"] == pytest.approx((4.0, 4.0)) and spread["b"] == pytest.approx((2.0, 2.0))


def test_quantiles_interpolate_between_sorted_values():
    values = [4.0, 1.0, 3.0, 2.0]
    assert bench_overhead._median(values) == pytest.approx(2.5)
    assert bench_overhead._quantile(values, 0.25) == pytest.approx(1.75)
    assert bench_overhead._quantile(values, 0.75) == pytest.approx(3.25)
    assert bench_overhead._quantile([7.0], 0.25) == 7.0


def test_null_op_mode_swaps_the_op_on_both_sides_and_restores_it():
    """`op="null"`: the module's hot path and the bare side both call the no-op (so the module's output is its
    input, which a real conv would not return), and fusedconv.cpu's ops are back afterwards."""
    before = cpu._conv2d, cpu._pointwise
    seen = []
    real_null = bench_overhead._null_op

    def recording(x, *args):
        seen.append(len(args))
        return real_null(x, *args)

    bench_overhead._null_op = recording
    try:
        rows = bench_overhead.run(quick=True, rounds=1, op="null")
    finally:
        bench_overhead._null_op = real_null
    assert (cpu._conv2d, cpu._pointwise) == before
    assert {r["op"] for r in rows} == {"null"}
    routed = [r for r in rows if r["layout"] != "-"]
    assert all(r["bare"].startswith("no-op (for ") for r in routed)
    # Both sides of both routes called it: F.conv2d's 6 trailing arguments, oneDNN's 9.
    assert 6 in seen and (9 in seen or not cpu.available())


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op: expected one of"):
        bench_overhead.run(quick=True, rounds=1, op="fake")


def test_unknown_clock_is_refused():
    with pytest.raises(ValueError, match="clock: expected one of"):
        bench_overhead.run(quick=True, rounds=1, clock="cycles")


def test_json_record_holds_the_rows_the_environment_and_the_busy_notes(tmp_path, capsys):
    import json

    path = tmp_path / "overhead.json"
    assert bench_overhead.main(["--rounds", "1", "--op", "null", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert {r["layout"] for r in record["rows"]} == {"NCHW", "channels_last", "-"}
    assert all(r["op"] == "null" for r in record["rows"])
    assert record["environment"]["torch"] and "busy_notes" in record
    assert record["environment"]["command"].startswith("python -m bench.bench_overhead --rounds 1")
    assert "overhead" in capsys.readouterr().out
