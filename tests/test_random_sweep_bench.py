"""bench/random_models.py and bench/random_sweep.py: the generated models are valid Python covering every block
kind, the sweep passes convert on some of them, and it reports a converted model that is wrong or skips an edit."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import random_models, random_sweep  # noqa: E402
from fusedconv.graph import specialize  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402


def test_generated_sources_compile_and_cover_every_kind():
    seen = set()
    for seed in range(200):
        gen = random_models.model_source(seed)
        compile(gen.source, f"<seed {seed}>", "exec")
        seen.update(gen.kinds)
    assert seen == set(random_models.KINDS)
    assert random_models.model_source(7).source == random_models.model_source(7).source  # reproducible


def test_a_generated_model_runs_on_its_calls():
    model, gen = random_models.build(3)
    model = model.double()
    with torch.no_grad():
        for args in random_models.calls(gen):
            model(*args)


@pytest.mark.parametrize("seed", [2, 16, 17, 23, 413])
def test_the_sweep_passes_convert(seed):
    """Seed 2 ties two convs' weight, seed 413 writes a value in place between a branch and its sum (both silently
    wrong before the fixes in tests/test_convert_shared_state.py)."""
    res = random_sweep.sweep_seed(seed)
    assert res["raised"] is None and res["convert_error"] < random_sweep.TOL
    assert res["silent"] == [] and res["edits"] > 0
    assert res["ok"] + len(res["loud"]) + res["skipped"] == res["edits"]


def test_conversions_re_arm_the_armed_copy_and_keep_the_function():
    """The value-preserving conversions among the paired edits leave an armed copy armed (graph/reach.py `rearm`),
    and its forwards after them, on states derived anew, stay the original's function."""
    res = random_sweep.sweep_seed(17)
    assert res["armed_edits"] == res["edits"] and res["rearmed"] == len(random_sweep.CONVERSIONS)
    assert res["silent"] == [] and res["ok"] + len(res["loud"]) + res["skipped"] == res["edits"]


@pytest.mark.parametrize("seed", [5, 14])
def test_the_float32_sweep_passes_convert_on_the_onednn_route(seed):
    """float32: the CPU fast path (oneDNN, the layout switch whose first call checks both layouts); seed 5 holds a
    buffer its forward counts calls in, which the check's extra forwards once advanced."""
    res = random_sweep.sweep_seed(seed, dtype=torch.float32)
    assert res["raised"] is None and res["convert_error"] < random_sweep.TOL32 and res["silent"] == []


def _wrong_shift(model):
    out = random_sweep.fusedconv.convert(model)
    layer = next(m for m in out.modules() if type(m) is FusedConv2d)
    with torch.no_grad():
        layer.shift.add_(0.5)
    layer.refresh()
    return out


def _first_specialization_always(monkeypatch):
    """Every guard table (its copies' too) runs its first specialization whatever the call or the edits."""
    compile_dispatch = specialize.GuardTable._compile

    def unguarded(table):
        compile_dispatch(table)
        fn = table.entries[0].fn
        if fn is not None:
            table.dispatch = lambda self, *args, **kwargs: fn(self, *args, **kwargs)

    monkeypatch.setattr(specialize.GuardTable, "_compile", unguarded)


def test_the_sweep_reports_a_wrong_conversion():
    res = random_sweep.sweep_seed(17, convert=_wrong_shift, edits=False)
    assert res["convert_error"] > 1e-3


def test_the_sweep_reports_edits_a_converted_model_skips(monkeypatch):
    _first_specialization_always(monkeypatch)
    found = [r for r in map(random_sweep.sweep_seed, range(10))
             if r["convert_error"] is not None and r["convert_error"] < random_sweep.TOL and r["silent"]]
    assert found
    monkeypatch.undo()
    text = random_sweep.render([random_sweep.sweep_seed(17)], {"date": "d", "machine": "m", "torch": "t",
                                                               "command": "c", "seconds": 1.0})
    assert "| 1 | 1 | 0 | 0 |" in text


class _Doubling(torch.nn.Module):
    def forward(self, x):
        return x * 2.0


def test_float32_differences_are_judged_against_float64_when_the_original_rounds_badly():
    """In float32 a difference above TOL32 counts unless, against the model run in float64, the converted model's
    error is within twice the original's own (the original rounding badly is not the converted model's fault)."""
    calls = [(torch.linspace(-1.0, 1.0, 8).view(1, 2, 2, 2),)]
    twin = random_sweep._twin64(_Doubling(), torch.float32)
    exact = 2.0 * calls[0][0]
    off = [exact + 0.01]  # an original 1 % off
    tol = random_sweep.TOL32
    assert twin is not None and random_sweep._twin64(_Doubling(), torch.float64) is None
    assert not random_sweep._beyond(0.005, tol, [exact], off, twin, calls)      # converted exact, original not
    assert not random_sweep._beyond(0.004, tol, [exact + 0.014], off, twin, calls)  # within 2x the original's
    assert random_sweep._beyond(0.04, tol, [exact + 0.05], off, twin, calls)    # beyond it
    assert random_sweep._beyond(0.005, tol, [exact], off, None, calls)          # float64: no twin, no excuse
    assert not random_sweep._beyond(tol / 2, tol, [exact + 0.05], off, None, calls)
