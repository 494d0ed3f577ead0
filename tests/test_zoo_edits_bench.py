"""bench/zoo_edits.py: the edit sweep finds an edit the converted model skips, and passes one that it sees."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_convert_edits import AddBlock, SharedActBlock  # noqa: E402
from util import randomize_bn  # noqa: E402

from bench import zoo_edits  # noqa: E402
from fusedconv.graph import inlined_containers, scope_rewrite  # noqa: E402


def _convert(model):
    return zoo_edits.fusedconv.convert(model, reparameterize=False)  # (else the identity add merges into the conv)


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), AddBlock(4)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return randomize_bn(net, example=x).double(), x.double()


def test_the_sweep_passes_a_converted_model_that_sees_every_edit():
    model, x = _model()
    res = zoo_edits.sweep_model(model, x, convert=_convert)
    assert res["silent"] == [] and res["ok"] == res["edits"] - res["skipped"] - len(res["loud"])
    names = [n for n, _ in zoo_edits.edits(_convert(model))]
    assert "forward hook on 3.bn" in names and "3.bn replaced" in names and "module appended to <root>" not in names


def test_the_sweep_reports_an_edit_the_rewritten_graph_skips(monkeypatch):
    # The guard terms for the children whose calls the rewritten graph dropped, taken out: a hook on the BN's
    # stand-in is skipped by the fused graph and the sweep must say so.
    monkeypatch.setattr(scope_rewrite, "called_module_terms", lambda *a, **k: None)
    model, x = _model()
    res = zoo_edits.sweep_model(model, x, convert=_convert)
    silent = [name for name, _ in res["silent"]]
    assert "forward hook on 3.bn" in silent
    text = zoo_edits.render({"toy": res}, {"date": "d", "machine": "m", "torch": "t", "command": "c"})
    assert "forward hook on 3.bn" in text and "| toy |" in text


def _shared_act_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        SharedActBlock(nn.LeakyReLU(0.1), 4)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return randomize_bn(net, example=x).double(), x.double()


def test_the_settings_sweep_passes_settings_the_guards_compare():
    model, x = _shared_act_model()
    names = [n for n, _ in zoo_edits.edits(_convert(model), only_settings=True)]
    assert "3.act.negative_slope = 0.15000000000000002" in names and not any("hook" in n for n in names)
    res = zoo_edits.sweep_model(model, x, convert=_convert, only_settings=True)
    assert res["silent"] == [] and res["ok"] >= 1


def test_the_settings_sweep_reports_a_setting_the_fused_layers_ignore(monkeypatch):
    # The settings of the activation whose calls the fused convs took over, left out of the guard: its slope
    # edited after convert is ignored by the fused graph and the sweep must say so.
    monkeypatch.setattr(inlined_containers, "module_settings", lambda module: ())
    model, x = _shared_act_model()
    res = zoo_edits.sweep_model(model, x, convert=_convert, only_settings=True)
    assert [name for name, _ in res["silent"]] == ["3.act.negative_slope = 0.15000000000000002"]


def test_the_tensor_sweep_passes_in_place_edits_the_version_counters_show():
    model, x = _model()
    names = [n for n, _ in zoo_edits.tensor_edits(_convert(model))]
    assert "0.weight *= 1.5" in names and "3.conv.shift *= 1.5" in names
    res = zoo_edits.sweep_model(model, x, convert=_convert, only_settings=True, tensors=True)
    assert res["silent"] == [] and res["ok"] >= len(names)


def test_the_tensor_sweep_reports_edits_a_fused_layer_does_not_see(monkeypatch):
    # The fused layers' snapshot of their tensors made blind (always the same): an in-place edit of a fused weight
    # is not seen on the CPU route and the sweep must say so.
    from fusedconv import cpu
    monkeypatch.setattr(cpu, "_snapshot", lambda weight, scale, shift: (0,))
    model, x = _model()
    res = zoo_edits.sweep_model(model, x, convert=_convert, only_settings=True, tensors=True)
    assert "0.weight *= 1.5" in [name for name, _ in res["silent"]]
