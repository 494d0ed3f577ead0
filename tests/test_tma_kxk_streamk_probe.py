"""bench/tma_kxk_streamk_probe.py: the slice arithmetic it classifies bad tiles with (the kernel's own split,
checked against conv_streamk.streamk_slice's formula) and its report, on CPU."""

from __future__ import annotations

import json

from bench import tma_kxk_streamk_probe as probe


def test_slice_starts_balance_and_cover_every_iteration():
    starts = probe.slice_starts(9216, 252)
    sizes = [b - a for a, b in zip(starts, starts[1:])]
    assert starts[0] == 0 and starts[-1] == 9216
    assert set(sizes) == {36, 37} and sizes.count(37) == 9216 % 252 and sizes[0] == 37


def test_contributors_counts_the_programs_whose_slices_touch_a_tile():
    # 4 tiles x 3 K steps over 5 programs: slices [0,3) [3,6) [6,8) [8,10) [10,12) -> tile 2 = [6, 9): two
    starts = probe.slice_starts(12, 5)
    assert starts == [0, 3, 6, 8, 10, 12]
    assert [probe.contributors(t, 3, starts) for t in range(4)] == [1, 1, 2, 2]


def test_report_lists_errors_races_and_the_layers_table(tmp_path):
    results = {
        "environment": {"device_name": "GPU X", "torch": "t", "triton": "3.6.0", "cudnn": 1, "git_commit": "abc"},
        "date": "2026-12-04", "command": "python -m bench.tma_kxk_streamk_probe",
        "streamk": [{"config": "8x8px x128x64 w4/s4", "programs": 252, "rel_errors": [0.019, 0.016, 0.018],
                     "bit_identical_reruns": False, "tiles": 256, "tiles_by_contributors": {"1": 116, "2": 140},
                     "bad_tiles_by_contributors": {"1": 18, "2": 27}},
                    {"config": "8x16px x128x64 w4/s3", "programs": 132, "error": "CompileTimeAssertionFailure: x"}],
        "ceilings": {"copy_tb_s": 4.2, "fp16_matmul_tflops": 659.0},
        "layers": [{"layer": "conv1", "batch": 32, "provider": p, "status": "ok", "time_ms": t, "backend": "b",
                    "pct_roofline_measured": 12.5} for p, t in (("eager", 0.2), ("cudnn_relu", 0.08),
                                                                ("fusedconv", 0.1), ("fusedconv_triton", 0.1))],
        "notes": ["a note"]}
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(results))
    assert probe.main(["--report", str(path)]) == 0
    md = (tmp_path / "probe.md").read_text()
    assert "| 8x8px x128x64 w4/s4 | 252 | 0.019, 0.016, 0.018 | False | 45 / 256 |" in md
    assert "CompileTimeAssertionFailure: x" in md
    assert "| conv1 | 32 | 0.2000 | n/a | 0.0800 | 0.1000 (b) | 0.1000 | 0.80 | 12 |" in md
    assert "a note" in md
