"""The 3-D layers bench entry on CPU with a tiny clip: its layers are r3d_18's own (read from the model), every
provider agrees with eager, and each row is timed; the suite's markdown shows them. No timing is asserted."""

from __future__ import annotations

import torch

from bench import bench_layers3d
from bench import env as bench_env
from bench.report import markdown


def test_r3d_18_layers_are_read_from_the_model():
    cases = bench_layers3d.r3d_18_layers((2, 16, 16))
    kinds = {(c["kernel"], c["residual"], c["activation"]) for c in cases}
    assert ((3, 7, 7), False, "relu") in kinds  # the stem
    assert ((3, 3, 3), True, "relu") in kinds  # a block's second conv, with the residual add
    assert ((1, 1, 1), False, "identity") in kinds  # a downsample
    assert sum(c["count"] for c in cases) == 20  # r3d_18 has 20 Conv3d modules


def test_every_provider_matches_eager_and_is_timed():
    torch.manual_seed(0)
    # The first six layers (the 7x7x7 stem, block convs with and without the residual, a strided 1x1x1 downsample
    # without activation): timing all fifteen took a minute of CI.
    cases = bench_layers3d.r3d_18_layers((2, 16, 16))[:6]
    assert {c["residual"] for c in cases} == {True, False} and {c["activation"] for c in cases} == {"relu", "identity"}
    rows = bench_layers3d.run("cpu", quick=True, clip=(2, 16, 16), max_layers=6)
    assert len(rows) == 6 * len(bench_layers3d.PROVIDERS)
    assert {r["provider"] for r in rows} == set(bench_layers3d.PROVIDERS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["max_rel_error_vs_eager"] < 1e-5 and r["median_ms"] > 0
    env = bench_env.environment(torch.device("cpu"), ["python", "-m", "bench", "--suite", "layers3d"])
    md = markdown({"environment": env, "quick": True, "layers3d": rows}, [])
    assert "## 3-D layers (r3d_18)" in md


def test_gpu_check_report_shows_the_3d_layer_rows():
    from bench import gpu_check_report

    rows = [{"layer": "layer1.0.conv2.0", "shape": "64->64 k3x3x3", "provider": p, "median_ms": 1.0,
             "speedup_vs_eager": 1.0, "max_rel_error_vs_eager": 0.0, "status": "ok"} for p in ("eager", "fusedconv")]
    lines = gpu_check_report._layers3d(rows)
    assert lines[0].startswith("## (d) r3d_18 Conv3d layers") and sum("layer1.0.conv2.0" in line for line in lines) == 2
    assert gpu_check_report._layers3d([]) == []
