"""bench/zoo_compile.py: the torch.compile sweep of the zoo — a converted model that compiles once is measured
against the original, one that compiles again is told apart from a model that recompiles on its own, and the
report is written."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import zoo_compile  # noqa: E402
from bench.zoo_models import ZooModel  # noqa: E402


class _CountsCalls(nn.Module):
    """A wrapper whose forward changes an int attribute on every call: Dynamo guards on it and compiles again."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_converted_home_model_compiles_once_and_matches():
    res = zoo_compile.run_model(ZooModel("home:functional_bn"), size=16, batch=2)
    assert res["compiles_once"] is True and res["err32"] < 1e-5 and res["findings"] == []


def test_a_converted_model_that_compiles_again_is_a_finding_unless_the_original_does_too(monkeypatch):
    import fusedconv

    convert = fusedconv.convert
    monkeypatch.setattr(zoo_compile.fusedconv, "convert", lambda m: _CountsCalls(convert(m)))
    res = zoo_compile.run_model(ZooModel("home:functional_bn"), size=16, batch=2)
    assert res["compiles_once"] is False and "recompile" in res["recompile"]
    assert zoo_compile._ROOT not in res["recompile"]  # the guard's source file, named from the checkout's root
    assert res["original_compiles_once"] is True and len(res["findings"]) == 1

    build = ZooModel.build

    def counting_build(self, size):
        return _CountsCalls(build(self, size))

    monkeypatch.setattr(ZooModel, "build", counting_build, raising=True)
    res = zoo_compile.run_model(ZooModel("home:functional_bn"), size=16, batch=2)
    assert res["compiles_once"] is False and res["original_compiles_once"] is False and res["findings"] == []


def test_main_writes_the_report(tmp_path):
    md, js = tmp_path / "zc.md", tmp_path / "zc.json"
    assert zoo_compile.main(["--models", "home:functional_bn,home:shared_bn", "--size", "16", "--threads", "1",
                             "--md", str(md), "--json", str(js)]) == 0
    text = md.read_text()
    assert "2 models: 2 compile once" in text and "| home:shared_bn | True |" in text
    assert "python -m bench.zoo_compile" in text
    assert [r["compiles_once"] for r in json.loads(js.read_text())["results"]] == [True, True]
    torch._dynamo.reset()


def test_portable_drops_this_machines_directories():
    installed = os.path.join(sys.prefix, "lib", "python3.11", "site-packages", "timm", "models", "levit.py")
    ours = os.path.join(zoo_compile._ROOT, "fusedconv", "graph", "flat.py")
    assert zoo_compile.portable(f"filename: '{installed}', then {ours}:12") == \
        "filename: 'timm/models/levit.py', then fusedconv/graph/flat.py:12"


def test_bad_arguments_are_named(capsys):
    import pytest

    with pytest.raises(SystemExit):
        zoo_compile.main(["--models", "home:functional_bn", "--batch", "0"])
    assert "--size / --batch / --threads: expected size >= 8 and the others >= 1, got 64 / 0 / 2" in \
        capsys.readouterr().err


class _Breaks(nn.Module):
    """A wrapper whose forward has a graph break: fine for torch.compile, a failure under fullgraph=True."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.inner(x)


def test_fullgraph_counts_a_graph_break_on_the_converted_side_as_a_finding(monkeypatch):
    import fusedconv

    convert = fusedconv.convert
    monkeypatch.setattr(zoo_compile.fusedconv, "convert", lambda m: _Breaks(convert(m)))
    res = zoo_compile.run_model(ZooModel("home:functional_bn"), size=16, batch=2)
    assert res["compiles_once"] is True  # a graph break alone is no recompile
    res = zoo_compile.run_model(ZooModel("home:functional_bn"), size=16, batch=2, fullgraph=True)
    assert res["compiles_once"] is False and res["original_compiles_once"] is True and len(res["findings"]) == 1
    assert "graph_break" in res["recompile"] or "graph break" in res["recompile"].lower()
