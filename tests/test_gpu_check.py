"""The GPU check (bench/gpu_check.py, bench/check_correctness.py) without a GPU: the CPU dry run of the whole
command, and the correctness checker's verdicts on a right, a slightly wrong and a partly unwritten kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")
pytest.importorskip("torchvision")

import fusedconv.kernels as fk  # noqa: E402
from bench import check_correctness as cc  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_every_part(tmp_path):
    """`python -m bench --gpu-check --dry-run`: the command a GPU machine runs first, on the CPU interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench", "--gpu-check", "--dry-run", "--out", str(tmp_path)],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    (device_dir,) = list(tmp_path.iterdir())
    stems = sorted(p.name for p in device_dir.iterdir())
    assert len(stems) == 2 and all("-check-dry." in s for s in stems), stems
    results = json.loads((device_dir / stems[0]).read_text())
    assert results["dry_run"] is True and results["environment"]["triton"]
    assert {k: v["status"] for k, v in results["parts"].items()} == {
        "correctness": "done", "layers": "done", "models": "done"}
    sec = results["correctness"]
    assert sec["items_done"] == sec["items_total"] > 0 and not sec["not_run"]
    assert sec["rows"] and all(r["ok"] for r in sec["rows"]), [r for r in sec["rows"] if not r["ok"]]
    # every GEMM candidate is checked under both schedules: the data-parallel and the stream-K kernel
    assert {"gemm", "streamk", "depthwise"} <= {r["kernel"] for r in sec["rows"]} <= {
        "gemm", "streamk", "depthwise", "tma1x1", "tmakxk", "tma1x1_streamk", "tmakxk_streamk"}
    # stream-K runs each config at several program counts (the rule's, planned for a few pretend SMs)
    assert len({r["programs"] for r in sec["rows"] if r["kernel"] == "streamk"}) >= 2
    fused = [r for r in results["layers"] if r["provider"] == "fusedconv"]
    assert fused and all(r["status"] == "ok" for r in fused), fused
    (model,) = results["models"]
    assert model["status"] == "ok" and model["max_rel_error_vs_eager"] < 1e-4
    md = (device_dir / stems[1]).read_text()
    assert "(a) Correctness" in md and "(b) ResNet-50 layers" in md and "(c) Models" in md


def test_reference_is_conv_bn_act_modules_in_float64():
    g = cc.Geometry("g", 6, 7, 5, 4, 3, 3, (2, 1), (1, 1), activation="silu", residual=True)
    x, w, (gamma, beta, mean, var), res = cc._inputs(g, 2, torch.float32, torch.device("cpu"), seed=3)
    conv = nn.Conv2d(6, 4, 3, stride=(2, 1), padding=1, bias=False).double()
    bn = nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        conv.weight.copy_(w.double())
        bn.weight.copy_(gamma.double()), bn.bias.copy_(beta.double())
        bn.running_mean.copy_(mean.double()), bn.running_var.copy_(var.double())
        expected = nn.SiLU()(bn(conv(x.double())) + res.double())
    torch.testing.assert_close(cc.reference(g, x, w, (gamma, beta, mean, var), res), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fault, passes", [(None, True), ("scaled", False), ("unwritten", False), ("raises", False)])
def test_checker_verdicts(monkeypatch, fault, passes):
    """A kernel stand-in computing the right function passes; 1% off, a NaN corner or an exception fails."""
    def stand_in(x, weight, scale, shift, stream_k=None, tma=None, **kw):
        assert stream_k is False and tma is False  # the data-parallel check pins the pointer kernel
        y = fk.conv_bn_act_ref(x, weight, scale, shift, **kw)
        if fault == "scaled":
            y = y * 1.01
        elif fault == "unwritten":
            y = y.clone()
            y[0, 0, 0, 0] = float("nan")
        elif fault == "raises":
            raise RuntimeError("launch failed")
        return y

    monkeypatch.setattr(fk, "conv_bn_act", stand_in)
    g = cc.Geometry("g", 5, 6, 6, 7, 3, 3, padding=(1, 1), activation="relu6", residual=True)
    configs = cc.candidate_configs(g, 1, "float32", torch.device("cpu"))
    assert configs
    rows = cc.check_item(g, 1, "float32", torch.device("cpu"), configs[:1])
    assert len(rows) == 1 and rows[0]["ok"] is passes, rows
    if fault == "raises":
        assert "launch failed" in rows[0]["error"]


def test_stream_k_schedule_checks_stream_k_candidates(monkeypatch):
    """schedule="stream-K" runs the stream-K candidates (tiles that fit its workspace slots) through the
    launcher with stream_k=True and labels the rows with that kernel (so failures deny-list it, not the GEMM)."""
    seen = []

    def stand_in(x, weight, scale, shift, stream_k=None, tma=None, **kw):
        seen.append((stream_k, tma))
        return fk.conv_bn_act_ref(x, weight, scale, shift, **kw)

    monkeypatch.setattr(fk, "conv_bn_act", stand_in)
    g = cc.Geometry("g", 256, 14, 14, 256, 3, 3, padding=(1, 1))
    configs = cc.candidate_configs(g, 2, "float32", torch.device("cpu"), "stream-K")
    assert configs and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= fk.configs.STREAMK_MAX_TILE for c in configs)
    gemm = cc.candidate_configs(g, 2, "float32", torch.device("cpu"))
    assert {cc.config_label(c) for c in configs} <= {cc.config_label(c) for c in gemm}
    rows = cc.check_item(g, 1, "float32", torch.device("cpu"), configs[:2], schedule="stream-K")
    assert seen == [(True, False)] * 2 and all(r["ok"] and r["kernel"] == "streamk" for r in rows), rows
    assert cc.SCHEDULES == ("data-parallel", "stream-K", "tma")


def test_tma_schedule_checks_tma_candidates_where_eligible(monkeypatch):
    """schedule="tma" runs the TMA kernels' candidates with tma=True on eligible geometries (rows labelled
    tma1x1 / tmakxk, so failures deny-list that kernel) and has no candidates where the launcher would fall
    back (stride-2 KxK, unaligned channel rows, groups); a stride-2 1x1 goes through the KxK descriptor kernel
    on the strided view."""
    seen = []

    def stand_in(x, weight, scale, shift, stream_k=None, tma=None, **kw):
        seen.append(tma)
        return fk.conv_bn_act_ref(x, weight, scale, shift, **kw)

    monkeypatch.setattr(fk, "conv_bn_act", stand_in)
    cpu = torch.device("cpu")
    for g, kernel in ((cc.Geometry("p", 32, 6, 6, 16, 1, 1), "tma1x1"),
                      (cc.Geometry("k", 16, 6, 6, 32, 3, 3, padding=(1, 1)), "tmakxk")):
        assert cc.tma_kernel(g, torch.float16, cpu) == kernel
        configs = cc.candidate_configs(g, 1, "float16", cpu, "tma")
        assert configs
        rows = cc.check_item(g, 1, "float16", cpu, configs[:1], schedule="tma")
        assert seen[-1] is True and rows[0]["ok"] and rows[0]["kernel"] == kernel, rows
    assert cc.tma_kernel(cc.Geometry("s2", 32, 6, 6, 16, 1, 1, stride=(2, 2)), torch.float16, cpu) == "tmakxk"
    for g in (cc.Geometry("s2", 32, 6, 6, 16, 3, 3, stride=(2, 2)), cc.Geometry("u", 12, 6, 6, 16, 3, 3),
              cc.Geometry("g", 32, 6, 6, 32, 3, 3, groups=2)):
        assert cc.tma_kernel(g, torch.float16, cpu) is None
        assert cc.candidate_configs(g, 1, "float16", cpu, "tma") == []


def test_candidate_configs_follow_pruning():
    """A tiny layer keeps only small tiles; a big 3x3 one keeps large tiles at the spatial warp cap (the 8-warp
    flattened-K miscompile rule); a big 1x1 keeps its 8-warp tiles; depthwise uses its own."""
    small = cc.candidate_configs(cc.Geometry("s", 16, 4, 4, 16, 1, 1), 1, "float16", torch.device("cpu"))
    big = cc.candidate_configs(cc.Geometry("b", 256, 56, 56, 256, 3, 3, padding=(1, 1)), 32, "float16",
                               torch.device("cpu"))
    assert max(c.kwargs["BLOCK_M"] for c in small) <= 16 < max(c.kwargs["BLOCK_M"] for c in big)
    assert max(c.num_warps for c in big) == fk.configs.SPATIAL_MAX_WARPS
    gemm = cc.candidate_configs(cc.Geometry("g", 256, 56, 56, 256, 1, 1), 32, "float16", torch.device("cpu"))
    assert any(c.num_warps == 8 for c in gemm)
    dw = cc.candidate_configs(cc.Geometry("d", 32, 8, 8, 32, 3, 3, padding=(1, 1), groups=32), 1, "float16",
                              torch.device("cpu"))
    assert dw and all("BLOCK_P" in c.kwargs for c in dw)
