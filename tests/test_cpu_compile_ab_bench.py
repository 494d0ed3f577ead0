"""bench/cpu_compile_ab.py: the paired A/B against torch.compile + freezing — every variant checked and timed in
alternating order, the per-round ratios and their verdict computed from the rounds, the report written."""

from __future__ import annotations

import os
import sys

import pytest
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(monkeypatch):
    from fusedconv import model_specs
    monkeypatch.setattr(model_specs, "build_model", lambda spec: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()))


def test_rounds_alternate_and_ratios_come_from_them(monkeypatch):
    from bench import cpu_compile_ab
    _tiny(monkeypatch)
    order = []
    real = cpu_compile_ab._build

    def spying_build(spec, variants):
        built, model = real(spec, variants)
        return {n: (lambda x, n=n, f=f: order.append(n) or f(x)) for n, f in built.items()}, model

    monkeypatch.setattr(cpu_compile_ab, "_build", spying_build)
    row = cpu_compile_ab.measure("tiny", ("eager", "fusedconv"), size=16, rounds=4, calls=1)
    timed = order[6:]  # after 3 warm-up calls each
    assert timed == ["eager", "fusedconv", "fusedconv", "eager"] * 2
    assert all(e < 1e-5 for e in row["max_rel_err_vs_fp64"].values())
    per_round = [a / b for a, b in zip(row["times_ms"]["fusedconv"], row["times_ms"]["eager"])]
    ratio = row["ratios"]["fusedconv / eager"]
    assert ratio["p25"] <= ratio["median"] <= ratio["p75"]
    assert min(per_round) <= ratio["median"] <= max(per_round)
    assert ratio["verdict"] == ("ahead" if ratio["p75"] < 1 else "behind" if ratio["p25"] > 1 else "level")


def test_main_writes_the_report(monkeypatch, tmp_path):
    from bench import cpu_compile_ab
    _tiny(monkeypatch)
    md, js = tmp_path / "ab.md", tmp_path / "ab.json"
    rows = cpu_compile_ab.main(["--models", "tiny", "--variants", "eager,fusedconv", "--size", "16", "--rounds", "2",
                                "--calls", "1", "--threads", "1", "--md", str(md), "--json", str(js)])
    assert len(rows) == 1 and set(rows[0]["ms"]) == {"eager", "fusedconv"}
    text = md.read_text()
    assert "| tiny |" in text and "fusedconv / eager" in text and "python -m bench.cpu_compile_ab" in text
    assert js.read_text().startswith("{")


def test_frozen_variant_is_checked_and_paired_with_the_others(monkeypatch):
    from bench import cpu_compile_ab
    _tiny(monkeypatch)
    row = cpu_compile_ab.measure("tiny", ("eager", "fusedconv", "fusedconv_frozen"), size=16, rounds=2, calls=1)
    assert row["max_rel_err_vs_fp64"]["fusedconv_frozen"] < 1e-5
    assert set(row["ratios"]) == {"fusedconv / eager", "fusedconv / fusedconv_frozen", "fusedconv_frozen / eager"}
    per_round = [a / b for a, b in zip(row["times_ms"]["fusedconv_frozen"], row["times_ms"]["eager"])]
    assert min(per_round) <= row["ratios"]["fusedconv_frozen / eager"]["median"] <= max(per_round)


def test_fusedconv_required():
    from bench import cpu_compile_ab
    with pytest.raises(SystemExit):
        cpu_compile_ab.main(["--variants", "eager,compile_freeze"])


def test_autocast_runs_every_variant_in_the_region(monkeypatch, tmp_path):
    import torch

    from bench import cpu_compile_ab
    _tiny(monkeypatch)
    seen = []
    real = cpu_compile_ab._build

    def spying_build(spec, variants):
        built, model = real(spec, variants)
        return {n: (lambda x, f=f: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                               else None) or f(x)) for n, f in built.items()}, model

    monkeypatch.setattr(cpu_compile_ab, "_build", spying_build)
    md = tmp_path / "ab.md"
    rows = cpu_compile_ab.main(["--models", "tiny", "--variants", "eager,fusedconv", "--size", "16", "--rounds", "2",
                                "--calls", "1", "--threads", "1", "--autocast", "bfloat16", "--md", str(md)])
    assert seen and set(seen) == {torch.bfloat16}  # warm-up and timed calls alike
    assert rows[0]["autocast"] == "bfloat16" and all(e < 2e-2 for e in rows[0]["max_rel_err_vs_fp64"].values())
    assert "inside torch.autocast('cpu', bfloat16)" in md.read_text()


def test_compiled_converted_model_is_paired_with_the_compiled_original(monkeypatch):
    import torch

    import fusedconv
    from bench import cpu_compile_ab
    _tiny(monkeypatch)
    compiled = []

    import torch._inductor.config as inductor_config

    freezing_inside = []

    def fake_compile(model):  # records what is compiled; Inductor itself is not needed for the wiring
        compiled.append(model)

        def call(x):
            freezing_inside.append(inductor_config.freezing)  # (a compiled model compiles on its first call)
            return model(x)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    freezing_before = inductor_config.freezing
    row = cpu_compile_ab.measure("tiny", ("fusedconv", "compile_freeze", "fusedconv_compile_freeze"), size=16,
                                 rounds=2, calls=1)
    # Freezing on while the compiled variants run, and as it was afterwards (left on, it froze every later
    # torch.compile in the process, a test suite's float64 models among them).
    assert freezing_inside and all(freezing_inside) and inductor_config.freezing == freezing_before
    original, converted = compiled
    assert not any(isinstance(m, fusedconv.FusedConv2d) for m in original.modules())
    assert any(isinstance(m, fusedconv.FusedConv2d) for m in converted.modules())
    assert row["max_rel_err_vs_fp64"]["fusedconv_compile_freeze"] < 1e-5
    assert "fusedconv_compile_freeze / compile_freeze" in row["ratios"]
    per_round = [a / b for a, b in zip(row["times_ms"]["fusedconv_compile_freeze"], row["times_ms"]["compile_freeze"])]
    assert min(per_round) <= row["ratios"]["fusedconv_compile_freeze / compile_freeze"]["median"] <= max(per_round)


def test_video_models_get_their_clip(monkeypatch):
    # A video model is paired on its own clip shape (bench/models.py INPUT_SHAPES), not a (1, 3, size, size) image.
    from bench import cpu_compile_ab, models
    from fusedconv import model_specs
    monkeypatch.setattr(model_specs, "build_model", lambda spec: nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU()))
    monkeypatch.setitem(models.INPUT_SHAPES, "tiny_clip", (3, 2, 6, 6))
    row = cpu_compile_ab.measure("tiny_clip", ("eager", "fusedconv"), size=16, rounds=1, calls=1)
    assert row["input"] == [1, 3, 2, 6, 6]
    assert all(e < 1e-5 for e in row["max_rel_err_vs_fp64"].values())


def test_moved_and_reached_variants_record_whether_they_stay_armed(monkeypatch, tmp_path):
    from bench import cpu_compile_ab
    from fusedconv import model_specs

    def block(cin):
        return nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    # Two blocks: a model convert flattens and arms (fusedconv/graph/reach.py).
    monkeypatch.setattr(model_specs, "build_model", lambda spec: nn.Sequential(block(3), block(8)))
    md = tmp_path / "ab.md"
    rows = cpu_compile_ab.main(["--models", "tiny", "--variants", "fusedconv,fusedconv_moved,fusedconv_reached",
                                "--size", "16", "--rounds", "2", "--calls", "1", "--threads", "1", "--md", str(md)])
    row = rows[0]
    assert all(e < 1e-5 for e in row["max_rel_err_vs_fp64"].values())
    # `.to()` keeps the converted model armed, a reach does not.
    assert row["armed"] == {"fusedconv": True, "fusedconv_moved": True, "fusedconv_reached": False}
    assert set(row["ratios"]) == {"fusedconv / fusedconv_moved", "fusedconv / fusedconv_reached"}
    assert "fusedconv_moved yes" in md.read_text() and "fusedconv_reached no" in md.read_text()
