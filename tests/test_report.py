"""ConversionReport: rows, fused/skipped views, to_dict, the printed table, merging another report; the
per-layer backend report (`layer_backends`)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fusedconv
from fusedconv.kernels import backend_log
from fusedconv.report import ConversionReport, ReportRow, layer_backends


def _report() -> ConversionReport:
    r = ConversionReport()
    r.add("layer1.0", ["conv2", "bn2", "add", "relu"], "conv_bn_act", "fused", "bn+add+relu")
    r.add("", ["conv", "bn"], "conv_bn_act", "skipped", "conv output is used 2 times")
    return r


def test_rows_and_views():
    r = _report()
    assert [row.status for row in r.rows] == ["fused", "skipped"]
    assert r.fused == [r.rows[0]] and r.skipped == [r.rows[1]]
    assert r.rows[0].nodes == ("conv2", "bn2", "add", "relu")
    assert r.max_rel_error is None


def test_bad_status_names_the_argument():
    with pytest.raises(ValueError, match="status: expected 'fused' or 'skipped', got 'maybe'"):
        ReportRow("", ("conv",), "conv_bn_act", "maybe")


def test_to_dict_is_json_serialisable():
    r = _report()
    r.max_rel_error = 3e-7
    r.notes.append("something was not traceable")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["fused"] == 1 and d["skipped"] == 1 and d["max_rel_error"] == 3e-7
    assert d["rows"][0]["nodes"] == ["conv2", "bn2", "add", "relu"]
    assert d["notes"] == ["something was not traceable"]


def test_table():
    r = _report()
    r.max_rel_error = 1.5e-7
    lines = str(r).splitlines()
    assert lines[0].split() == ["status", "kind", "where", "modules", "detail"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "conv2 -> bn2 -> add -> relu" in lines[2] and "layer1.0" in lines[2]
    assert "<root>" in lines[3] and "used 2 times" in lines[3]
    # Columns line up: every row starts its "modules" column where the header does.
    col = lines[0].index("modules")
    assert lines[2][col:].startswith("conv2") and lines[3][col:].startswith("conv")
    assert lines[-1] == "1 fused, 1 skipped, max relative error 1.50e-07"


def test_extend_merges_rows_and_notes():
    a, b = _report(), ConversionReport()
    b.add("blk", ["conv", "bn"], "reparam", "fused", "2 branches")
    b.notes.append("n")
    a.extend(b)
    assert len(a.rows) == 3 and a.notes == ["n"]


def test_convert_report_for_a_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.SiLU()).eval()
    _, report = fusedconv.convert(model, return_report=True)
    assert [(r.nodes, r.detail) for r in report.fused] == [(("0", "1", "2"), "bn+relu"), (("3", "4"), "silu")]
    assert "0 -> 1 -> 2" in str(report)


class _Launches(torch.nn.Module):
    """Stands in for a fused layer: its forward 'launches' the given backends (as the launcher records them)."""

    def __init__(self, *names):
        super().__init__()
        self.names = names

    def forward(self, x):
        for n in self.names:
            backend_log.record(n)
        return x + 1


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _Launches("cudnn")
        self.inner = torch.nn.Sequential(_Launches("pointer"), torch.nn.ReLU(), _Launches("tma", "pointer"))

    def forward(self, x):
        backend_log.record("depthwise")  # a launch of the block's own forward (not of a child)
        return self.inner(self.a(x))


def test_layer_backends_credits_each_launch_to_the_innermost_module_and_prints():
    model = _Block()
    backends = layer_backends(model, torch.zeros(2))
    assert backends == {"": "triton depthwise", "a": "cudnn", "inner.0": "triton pointer",
                        "inner.2": "triton tma + triton pointer"}
    assert not model._forward_hooks and not model.a._forward_pre_hooks  # hooks removed
    report = ConversionReport()
    report.backends = backends
    text = str(report)
    assert "backends after warm-up: 1 triton depthwise, 1 cudnn, 1 triton pointer, 1 triton tma + triton pointer" \
        in text and "  inner.2: triton tma + triton pointer" in text
    assert report.to_dict()["backends"] == backends
    assert layer_backends(torch.nn.ReLU(), torch.zeros(2)) == {}  # nothing launched (CPU fallback)
