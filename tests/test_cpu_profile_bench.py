"""bench/cpu_profile.py: per-forward operator counts of the model as written and converted, the rows the convs,
norms, copies and layout ops, and a report naming the environment."""

from __future__ import annotations

import json

import pytest

from bench import cpu_profile
from fusedconv import cpu


@pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN convolution ops")
def test_counts_show_the_convs_each_model_reaches(tmp_path):
    pytest.importorskip("torchvision")
    md, js = tmp_path / "p.md", tmp_path / "p.json"
    assert cpu_profile.main(["--models", "torchvision:resnet18", "--size", "64", "--runs", "1",
                             "--md", str(md), "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())["rows"]
    ops = row["ops"]
    assert row["fused_layers"] == 20 and row["max_rel_error"] < 1e-4
    eager_bn, fused_bn = ops["aten::batch_norm"]
    assert eager_bn == 20 and fused_bn == 0
    # Every converted conv is one oneDNN call (with its add and ReLU); eager runs ATen's conv for each.
    onednn = ops.get("mkldnn::_convolution_pointwise", [0, 0])[1] + ops.get("mkldnn::_convolution_pointwise_",
                                                                             [0, 0])[1]
    assert ops["aten::conv2d"][0] == 20 and onednn + ops.get("aten::conv2d", [0, 0])[1] == 20
    assert all(not any(w in n for w in ("relu", "linear")) for n in ops)  # only the operators the doc names
    text = md.read_text()
    assert "## torchvision:resnet18 (64x64, 20 fused layers" in text and "| `aten::batch_norm` | 20 | 0 |" in text
    assert "python -m bench.cpu_profile --models torchvision:resnet18" in text


def test_arguments_are_checked():
    for bad in (["--size", "0"], ["--runs", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit, match=bad[0]):
            cpu_profile.main(bad)
