"""The GEMM-route probe (bench/cpu_gemm_probe.py) times what it claims to time.

No timing is asserted: this checks that the GEMM stand-in for a 1x1 conv computes what the oneDNN call it replaces
computes (plain, with relu / relu6, written into a residual), in the channels_last layout oneDNN answers in; that
the recorder sees every 1x1 stride-1 conv of one forward once, with its input; and that the probe's swapped forward
matches the model's and leaves the eager path's oneDNN calls unpatched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cpu_gemm_probe  # noqa: E402
from bench.models import build  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu  # noqa: E402

needs_onednn = pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise conv")


@needs_onednn
@pytest.mark.parametrize("act", [None, ("relu", 0.0), ("relu6", 0.0)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemm_call_matches_the_onednn_call(act, with_residual):
    torch.manual_seed(0)
    x = torch.randn(1, 12, 5, 7).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(20, 12, 1, 1), torch.randn(20)
    residual = torch.randn(1, 20, 5, 7).contiguous(memory_format=torch.channels_last)
    reference = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double())
    if with_residual:
        reference = reference + residual.double()
    if act is not None:
        reference = reference.clamp(0.0, 6.0) if act[0] == "relu6" else reference.relu()
    gemm = cpu_gemm_probe._gemm_call(weight, bias, act, tuple(x.shape))
    with torch.no_grad():
        out = gemm(x, residual.clone() if with_residual else None)
    assert out.shape == (1, 20, 5, 7)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out._base is None  # writable in place as a later residual, like the oneDNN output it stands in for
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_gemm_call_refuses_an_activation_it_does_not_cover():
    gemm = cpu_gemm_probe._gemm_call(torch.randn(4, 3, 1, 1), torch.randn(4), ("silu", 0.0), (1, 3, 2, 2))
    with pytest.raises(ValueError, match="silu"):
        gemm(torch.randn(1, 3, 2, 2).contiguous(memory_format=torch.channels_last))


@needs_onednn
@pytest.mark.usefixtures("onednn_small_convs")
def test_probe_records_each_one_by_one_conv_and_restores_the_eager_path():
    before = (cpu._pointwise, cpu._pointwise_binary_inplace)
    torch.manual_seed(0)
    model = build("torchvision:mobilenet_v2")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        converted = fusedconv.convert(model)
        converted(x), converted(x)
        recorded = cpu_gemm_probe._one_by_one_calls(converted, x)
    assert (cpu._pointwise, cpu._pointwise_binary_inplace) == before
    one_by_one = [m for m in converted.modules() if isinstance(m, fusedconv.FusedConv2d)
                  and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1) and m.groups == 1]
    # Every 1x1 stride-1 dense conv of mobilenet_v2 once, plain or (the residual projections) in place.
    assert sorted(id(leaf) for leaf, *_ in recorded) == sorted(id(m) for m in one_by_one)
    assert {kind for *_, kind, _, _ in recorded} == {"u", "i"}
    for leaf, _, kind, xi, ri in recorded:
        assert xi.shape[1] == leaf.in_channels
        assert (ri is not None) == (kind == "i")

    row = cpu_gemm_probe.probe("torchvision:mobilenet_v2", rounds=4, calls=2, size=64)
    assert (cpu._pointwise, cpu._pointwise_binary_inplace) == before
    assert row["layers"] == len(one_by_one)
    assert row["gemm_calls_per_swapped_forward"] == len(one_by_one)
    assert row["forward_rel_err"] < 1e-5
    assert all(r["gemm_rel_err"] < 1e-5 for r in row["alone"])
    # Every variant ran inside the forward, on the same layers, and the report shows each.
    assert all(t > 0 for t in row["in_model_layers_ms_per_forward"].values())
    assert set(row["forward_ratio_over_onednn"]) == {"gemm", "gemm_faster_alone"}
    assert row["gemm_calls_per_forward"] == {"onednn": 0, "gemm": len(one_by_one),
                                             "gemm_faster_alone": row["faster_alone"]}
    assert row["faster_alone"] == sum(r["gemm_us"] < cpu_gemm_probe.FASTER_ALONE * r["onednn_us"]
                                      for r in row["alone"])
    report = cpu_gemm_probe.markdown([], [row], "env")
    assert report.count("\n| 1x") == row["layers"] and "the GEMM where it ran faster alone" in report
