"""variant_choice: the per-launch-signature choice between kernel families keeps the fastest candidate, and
never one whose output disagrees with the first (reference) candidate's. Runs on CPU: the launches are plain
functions writing into a tensor, the timer is replaced by fixed times."""

from __future__ import annotations

import pytest
import torch
import triton.testing

from fusedconv.kernels import variant_choice


@pytest.fixture
def timed(monkeypatch):
    """can_time -> True; do_bench returns the time attached to each launch function."""
    monkeypatch.setattr(variant_choice, "can_time", lambda device: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn.time)
    monkeypatch.setattr(variant_choice, "_choices", {})


def _launch(out, value, time):
    def launch():
        out.copy_(value)
    launch.time = time
    return launch


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_faster_agreeing_candidate_is_kept(timed, dtype):
    ref = torch.randn(4, 8, dtype=torch.float64)
    out = torch.empty(4, 8, dtype=dtype)
    close = ref * (1 + 1e-12)  # a reordered fp32 sum: agrees
    name = variant_choice.choose("k", {"pointer": _launch(out, ref, 2.0), "tma": _launch(out, close, 1.0)},
                                 torch.device("cpu"), output=out)
    assert name == "tma"
    assert variant_choice.chosen() == {"k": "tma"}


def test_a_faster_but_wrong_candidate_is_dropped_with_a_warning(timed):
    ref = torch.randn(4, 8, dtype=torch.float64)
    out = torch.empty(4, 8, dtype=torch.float16)
    wrong = ref.clone()
    wrong[0, 0] += 10.0
    with pytest.warns(RuntimeWarning, match=r"'tma' kernel disagrees with the 'pointer' kernel"):
        name = variant_choice.choose("k", {"pointer": _launch(out, ref, 2.0), "tma": _launch(out, wrong, 0.5)},
                                     torch.device("cpu"), output=out)
    assert name == "pointer"
    # the choice is cached: the wrong kernel is not retried on the next call
    assert variant_choice.choose("k", {}, torch.device("cpu")) == "pointer"


def test_nan_where_the_reference_is_finite_is_a_disagreement():
    ref = torch.ones(3)
    out = torch.tensor([1.0, float("nan"), 1.0])
    assert variant_choice.disagreement(out, ref) == float("inf")
    assert variant_choice.disagreement(ref.clone(), ref) == 0.0


def test_without_timing_the_first_candidate_runs(monkeypatch):
    monkeypatch.setattr(variant_choice, "_choices", {})
    monkeypatch.setattr(variant_choice, "can_time", lambda device: False)
    assert variant_choice.choose("k", {"pointer": None, "tma": None}, torch.device("cpu")) == "pointer"
