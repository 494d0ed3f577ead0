"""bench/bench_cpu_taps.py: each row times every provider on one layer, records the route the FusedConv2d took and
its error against a float64 conv."""

from __future__ import annotations

import json

import torch

from bench import bench_cpu_taps


def test_rows_name_the_route_and_time_every_provider():
    rows = bench_cpu_taps.run(layers=[(4, 1, 3, 52), (4, 8, 3, 52)], min_run_time=0.05)
    assert rows[0]["route"] == "taps" and rows[1]["route"] != "taps"  # 8 output channels: not the tap route
    for r in rows:
        assert r["max_rel_error"] < 1e-5
        assert {"f.conv2d_nchw_ms", "f.conv2d_cl_ms", "fusedconv_ms", "taps_ms"} <= set(r)
        assert all(v > 0 for n, v in r.items() if n.endswith("_ms"))
        others = [v for n, v in r.items() if n.endswith("_ms") and n not in ("fusedconv_ms", "taps_ms")]
        assert r["best_other_over_fusedconv"] == min(others) / r["fusedconv_ms"]


def test_main_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cpu_taps, "LAYERS", [(4, 1, 3, 52)])
    monkeypatch.setattr(bench_cpu_taps.run, "__defaults__", ([(4, 1, 3, 52)], 0.05))
    out = tmp_path / "taps.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cpu_taps.main(["--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["rows"][0]["route"] == "taps"
    assert data["environment"]["command"].startswith("python -m bench.bench_cpu_taps")
