"""bench/zoo_speed.py: per-round ratios, the slower flag, a model's row and the report."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("timm")


def test_ratio_summary_is_per_round():
    from bench.zoo_speed import ratio_summary
    # Round by round the first is twice the second, while their medians alone would say 1.5x.
    s = ratio_summary([2.0, 4.0, 8.0], [1.0, 2.0, 4.0])
    assert s == {"median": 2.0, "p25": 2.0, "p75": 2.0}
    s = ratio_summary([1.0, 3.0, 2.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert (s["p25"], s["median"], s["p75"]) == (2.0, 3.0, 4.0)
    with pytest.raises(ValueError, match="num / den"):
        ratio_summary([1.0], [1.0, 2.0])


def test_interleaved_alternates_order():
    from bench.zoo_speed import interleaved
    order = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, calls=2)
    assert order == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in times.values())


def test_one_model_timed_and_checked():
    from bench.zoo_models import ZooModel
    from bench.zoo_speed import run_model
    res = run_model(ZooModel("timm:test_resnet"), size=32, rounds=2, calls=1)
    assert res["timed"], res
    assert set(res["ms"]) == {"original", "fusedconv", "fx_fuse"}
    assert res["err_fusedconv"] <= 1e-4 and res["err_fx_fuse"] <= 1e-4
    assert res["slower_than_original"] == (res["vs_original"]["p25"] > 1.0)


def test_wrong_converted_model_is_not_timed(monkeypatch):
    import fusedconv
    from bench.zoo_models import ZooModel
    from bench.zoo_speed import run_model
    convert = fusedconv.convert

    def broken(model, **kwargs):  # a converted model whose output is off: must be reported, never timed
        out = convert(model, **kwargs)
        with torch.no_grad():
            next(p for p in out.parameters()).add_(1.0)
        return out

    monkeypatch.setattr(fusedconv, "convert", broken)
    res = run_model(ZooModel("timm:test_resnet"), size=32, rounds=1, calls=1)
    assert not res["timed"] and "differs" in res["error"]


def test_report_flags_slower_models():
    from bench.zoo_speed import render_markdown
    meta = {"date": "d", "machine": "m", "threads": 2, "versions": {"torch": "x"}, "command": "c"}
    row = {"model": "a", "timed": True, "input": [1, 3, 8, 8], "ms": {"original": 1.0, "fusedconv": 1.2},
           "vs_original": {"median": 1.2, "p25": 1.1, "p75": 1.3}, "slower_than_original": True,
           "slower_than_fx_fuse": False}
    text = render_markdown([row, {"model": "b", "timed": False, "error": "boom"}], meta)
    assert "slower than the original: 1 (a)" in text
    assert "| a | 1x3x8x8 | 1.00 | 1.20 | - | 1.20 (1.10-1.30) **slower** | - |" in text
    assert "not timed: boom" in text


def test_failed_model_traceback_names_no_machine_directories():
    import os

    from bench.zoo import ZooModel, with_timeout

    def fail():
        import torch.nn.functional as F
        import torch
        F.max_pool2d(torch.zeros(1, 1, 1, 1), 3)  # raises inside torch's own files

    row = with_timeout(ZooModel("home:shared_bn"), 60, fail)
    tb = row["traceback"]
    assert "max_pool2d" in tb and "torch/nn/functional.py" in tb
    assert "site-packages" not in tb and os.path.dirname(os.path.dirname(os.path.abspath(__file__))) not in tb
