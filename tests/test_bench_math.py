"""The benchmark harness's arithmetic: FLOP and byte counts, device peaks, roofline %, statistics, summaries.

FLOP counts are checked against PyTorch's own FlopCounterMode on real convolutions and against the GEMM
formula for 1x1 convs; output sizes against F.conv2d. No timing is asserted anywhere.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root holds bench/

from bench import layers as layer_suite  # noqa: E402
from bench import metrics, report  # noqa: E402
from bench.metrics import ConvShape  # noqa: E402
from bench.shapes import LayerCase, layer_cases, representative  # noqa: E402

SHAPES = [
    ConvShape(64, 256, 56, 56, 1, 1),                            # 1x1: a GEMM
    ConvShape(3, 64, 224, 224, 7, 7, stride=2, padding=3),       # ResNet stem
    ConvShape(128, 128, 28, 28, 3, 3, stride=2, padding=1),
    ConvShape(96, 96, 56, 56, 3, 3, padding=1, groups=96),       # depthwise
    ConvShape(32, 64, 15, 17, 3, 5, padding=2, dilation=2, groups=4),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label())
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_flops_match_pytorch_flop_counter(shape, batch):
    x = torch.zeros(batch, shape.cin, shape.h, shape.w, device="meta")
    w = torch.zeros(shape.cout, shape.cin // shape.groups, shape.kh, shape.kw, device="meta")
    with FlopCounterMode(display=False) as counter:
        y = F.conv2d(x, w, None, shape.stride, shape.padding, shape.dilation, shape.groups)
    assert tuple(y.shape[2:]) == shape.out_hw
    assert metrics.conv_flops(shape, batch) == counter.get_total_flops()


def test_one_by_one_conv_is_a_gemm():
    # (N*H*W, Cin) @ (Cin, Cout): 2 * M * N * K flops.
    s = ConvShape(64, 256, 56, 56, 1, 1)
    m, n, k = 8 * 56 * 56, 256, 64
    assert metrics.conv_flops(s, 8) == 2 * m * n * k


def test_conv_bytes_by_hand():
    s = ConvShape(64, 256, 56, 56, 1, 1)
    x, w, out = 2 * 64 * 56 * 56, 256 * 64, 2 * 256 * 56 * 56
    scale_shift = 2 * 256 * 4  # fp32 scale and shift whatever the conv dtype
    assert metrics.conv_bytes(s, 2, "float16") == 2 * (x + w + out) + scale_shift
    assert metrics.conv_bytes(s, 2, torch.float32) == 4 * (x + w + out) + scale_shift
    assert metrics.conv_bytes(s, 2, "bfloat16", residual=True) == 2 * (x + w + 2 * out) + scale_shift
    dw = ConvShape(32, 32, 10, 10, 3, 3, stride=2, padding=1, groups=32)  # 5x5 output, 1 input channel per group
    assert metrics.conv_bytes(dw, 1, "float32") == 4 * (32 * 100 + 32 * 9 + 32 * 25) + 2 * 32 * 4


def test_intensity_tflops_and_bandwidth():
    assert metrics.arithmetic_intensity(1000, 10) == 100
    assert metrics.tflops(2e12, 0.5) == pytest.approx(4.0)
    assert metrics.gb_s(3e9, 1.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="seconds"):
        metrics.tflops(1.0, 0.0)
    with pytest.raises(ValueError, match="nbytes"):
        metrics.arithmetic_intensity(1.0, 0)


def test_roofline_memory_and_compute_bound():
    # 100 TFLOP/s and 1 TB/s: the ridge is at 100 FLOP/byte.
    assert metrics.roofline_tflops(10, 100.0, 1.0) == pytest.approx(10.0)
    assert metrics.roofline_tflops(1000, 100.0, 1.0) == pytest.approx(100.0)
    # Memory bound: 1e12 flops over 1e11 bytes (I = 10) in 0.2 s = 5 TFLOP/s of a 10 TFLOP/s roof.
    assert metrics.roofline_percent(1e12, 1e11, 0.2, 100.0, 1.0) == pytest.approx(50.0)
    # Compute bound: I = 1000, 1e12 flops in 0.04 s = 25 TFLOP/s of 100.
    assert metrics.roofline_percent(1e12, 1e9, 0.04, 100.0, 1.0) == pytest.approx(25.0)
    assert metrics.roofline_percent(1e12, 1e9, 0.04, None, None) is None


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", None),
    ("NVIDIA H100 NVL", None),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM"),
    ("NVIDIA A100 80GB PCIe", None),
    ("Tesla T4", None),
])
def test_peak_table_matches_only_known_form_factors(name, key):
    assert metrics.peak_key(name) == key


def test_peak_values_and_tf32():
    assert metrics.peak_tflops("H100 SXM", torch.float16) == 989.0
    assert metrics.peak_tflops("H100 SXM", "float32", tf32=True) == 494.0
    assert metrics.peak_tflops("H100 SXM", "float32", tf32=False) == 67.0
    assert metrics.peak_tb_s("H200") == 4.8
    assert metrics.peak_tflops(None, "float16") is None
    assert metrics.peak_tb_s(None) is None
    with pytest.raises(ValueError, match="dtype"):
        metrics.peak_tflops("H100 SXM", "int8")


def test_statistics_match_the_standard_library():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 10, 11):
        values = torch.rand(n, generator=g).tolist()
        assert metrics.median(values) == pytest.approx(statistics.median(values))
        q = statistics.quantiles(values, n=4, method="inclusive") if n > 1 else [values[0]] * 3
        assert metrics.quantile(values, 0.25) == pytest.approx(q[0])
        assert metrics.quantile(values, 0.75) == pytest.approx(q[2])
        assert metrics.iqr(values) == pytest.approx(q[2] - q[0])
    assert metrics.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert metrics.geomean([]) is None
    assert metrics.speedup(3.0, 1.5) == 2.0
    with pytest.raises(ValueError, match="values"):
        metrics.geomean([1.0, 0.0])
    with pytest.raises(ValueError, match="q"):
        metrics.quantile([1.0], 1.5)


def test_conv_shape_rejects_bad_geometry_naming_the_argument():
    with pytest.raises(ValueError, match="groups"):
        ConvShape(10, 16, 8, 8, 3, 3, groups=3)
    with pytest.raises(ValueError, match="stride"):
        ConvShape(8, 8, 8, 8, 3, 3, stride=0)
    with pytest.raises(ValueError, match="kernel 9x9"):
        ConvShape(8, 8, 4, 4, 9, 9)


@pytest.mark.parametrize("net", ["resnet50", "mobilenet_v2", "repvgg_a0"])
def test_layer_cases_cover_the_network(net):
    from bench.shapes import build_net

    cases = layer_cases(net)
    model = build_net(net)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if net == "repvgg_a0":
        convs = [n for n in convs if n.endswith("conv_kxk.conv")]  # the deployed 3x3 of each block
    assert sum(c.count for c in cases) == len(convs)
    assert len({c.key for c in cases}) == len(cases)
    if net == "mobilenet_v2":
        assert any(c.shape.depthwise for c in cases)
        assert any(c.residual and c.activation == "identity" for c in cases)
    if net == "resnet50":
        assert {c.activation for c in cases if c.residual} == {"relu"}
    assert 1 <= len(representative(cases)) <= 3


def test_layer_providers_agree_with_eager_on_cpu():
    # A real (tiny) run of the harness: every CPU provider is checked against eager before it is timed.
    case = LayerCase("test", "block", ConvShape(8, 16, 9, 9, 3, 3, padding=1), "relu6", residual=True)
    rows = layer_suite.run_case(case, 2, torch.float32, "channels_last", ["eager", "folded", "cudnn_relu",
                                                                            "fusedconv"],
                                torch.device("cpu"), quick=True, peak_key=None, tf32=False, compile_ok=True,
                                compile_mode="default", cpu_min_run_time=0.002)
    by = {r["provider"]: r for r in rows}
    assert by["cudnn_relu"]["status"].startswith("n/a")
    for p in ("eager", "folded", "fusedconv"):
        assert by[p]["status"] == "ok", by[p]
        assert by[p]["max_rel_error_vs_eager"] < 1e-5
        assert by[p]["flops"] == metrics.conv_flops(case.shape, 2)
    assert by["fusedconv"]["speedup_vs_eager"] == pytest.approx(by["eager"]["time_ms"] / by["fusedconv"]["time_ms"])


def _fake_rows():
    rows = []
    for layer, (t_eager, t_fc) in enumerate([(2.0, 1.0), (8.0, 1.0)]):
        for provider, t in (("eager", t_eager), ("fusedconv", t_fc)):
            rows.append({"net": "n", "layer": f"l{layer}", "shape": "s", "batch": 1, "dtype": "float32",
                         "layout": "NCHW", "provider": provider, "status": "ok", "time_ms": t, "iqr_ms": 0.1,
                         "intensity": 10.0 * (layer + 1), "tflops": 0.1, "gb_s": 1.0})
        layer_suite._add_speedups(rows[-2:])
    return rows


def test_summary_is_the_geometric_mean_of_per_layer_speedups():
    summary = layer_suite.summarize(_fake_rows())
    assert len(summary) == 1
    assert summary[0]["vs"] == "eager"
    assert summary[0]["geomean_speedup"] == pytest.approx(math.sqrt(2.0 * 8.0))
    assert summary[0]["layers"] == 2


def test_report_files_from_synthetic_results(tmp_path):
    from bench import env

    rows = _fake_rows()
    results = {"environment": env.environment(torch.device("cpu"), ["python", "-m", "bench"]), "quick": True,
               "layers": rows, "layers_summary": layer_suite.summarize(rows), "peak": None, "notes": ["a note"],
               "models": [{"model": "m", "batch": 1, "dtype": "float32", "provider": "eager", "status": "ok",
                           "latency_ms": 2.0, "iqr_ms": 0.1, "throughput_per_s": 500.0, "speedup_vs_eager": 1.0},
                          {"model": "m", "batch": 1, "dtype": "float32", "provider": "jit",
                           "status": "n/a: broken"}]}
    pngs = report.plots(results, str(tmp_path), "r")
    assert sorted(os.path.basename(p) for p in pngs) == ["r-layers.png", "r-models.png", "r-roofline.png"]
    assert all(os.path.getsize(p) > 1000 for p in pngs)
    md = report.markdown(results, pngs)
    assert "4.00x (2)" in md  # geomean of 2x and 8x
    assert "n/a: broken" in md and "a note" in md
    report.write_json(results, str(tmp_path / "r.json"))
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["layers_summary"][0]["geomean_speedup"] == pytest.approx(4.0)
    assert back["environment"]["torch"] == torch.__version__
