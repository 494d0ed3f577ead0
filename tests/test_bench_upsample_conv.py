"""bench/bench_upsample_conv.py: each row times the decoder step as written, converted without and with the
source-resolution path, says whether the path ran, and checks the converted step against float64."""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_upsample_conv
from fusedconv import cpu
from fusedconv.graph import flat_upsample_conv

pytestmark = pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN convolution ops")


def test_rows_time_every_variant_and_restore_the_path():
    at_source = flat_upsample_conv._at_source_resolution
    rows = bench_upsample_conv.run(layers=[(16, 6, 8, 8), (8, 6, 0, 4)], batch=2, min_run_time=0.05)
    assert flat_upsample_conv._at_source_resolution is at_source
    for r in rows:
        assert r["taken"] is True and r["max_rel_error"] < 1e-5
        assert all(r[f"{n}_ms"] > 0 for n in ("eager", "graph_calls", "source_resolution"))
        assert r["source_resolution_over_graph_calls"] == r["source_resolution_ms"] / r["graph_calls_ms"]
    assert rows[0]["layer"] == "up(16@6x6) + 8 -> 8 3x3 at 12x12"


def test_main_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_upsample_conv.run, "__defaults__", ([(16, 6, 8, 8)], 1, 0.05))
    out = tmp_path / "up.json"
    threads = torch.get_num_threads()
    try:
        assert bench_upsample_conv.main(["--threads", "1", "--batch", "2", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["rows"][0]["batch"] == 2 and data["rows"][0]["taken"] is True
    assert data["environment"]["command"].startswith("python -m bench.bench_upsample_conv")
    with pytest.raises(SystemExit, match="--batch"):
        bench_upsample_conv.main(["--batch", "0"])
