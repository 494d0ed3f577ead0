"""fusedconv.comparison: the rules every self-check applies (tolerance per dtype, structure, error measure)."""

from __future__ import annotations

import pytest
import torch

from fusedconv.comparison import SELF_CHECK_TOLERANCE, compare_outputs, max_rel_error, snapshot_outputs


def test_compare_outputs_measures_relative_error_against_the_snapshot():
    ref = {"a": torch.randn(2, 3, dtype=torch.float64), "n": 7}
    out = {"a": ref["a"] * (1 + 1e-6), "n": 7}
    snap = snapshot_outputs(ref)
    ref["a"].zero_()  # a later in-place change of the reference must not change the snapshot
    err, tol = compare_outputs(out, *snap)
    expected = float((out["a"] - snap[0][0]).abs().max() / snap[0][0].abs().max())
    assert err == pytest.approx(expected) and 0 < err < 1e-5
    assert tol == SELF_CHECK_TOLERANCE[torch.float64]


def test_compare_outputs_refuses_other_structures_shapes_and_values():
    ref = snapshot_outputs((torch.ones(2), 3))
    with pytest.raises(RuntimeError, match="structure"):
        compare_outputs((torch.ones(2),), *ref)
    with pytest.raises(RuntimeError, match="shape"):
        compare_outputs((torch.ones(3), 3), *ref)
    with pytest.raises(RuntimeError, match="leaf 1 differs"):
        compare_outputs((torch.ones(2), 4), *ref)
    err, _ = compare_outputs((torch.tensor([1.0, float("nan")]), 3), *ref)
    assert err == float("inf")


def test_tolerance_is_the_loosest_floating_output_dtype():
    ref = snapshot_outputs((torch.ones(2, dtype=torch.float16), torch.ones(2)))
    _, tol = compare_outputs((torch.ones(2, dtype=torch.float16), torch.ones(2)), *ref)
    assert tol == SELF_CHECK_TOLERANCE[torch.float16] > SELF_CHECK_TOLERANCE[torch.float32]


def test_max_rel_error_over_nested_outputs():
    ref = [torch.tensor([1.0, -4.0]), {"x": torch.tensor([2.0])}]
    out = [torch.tensor([1.0, -4.0]), {"x": torch.tensor([2.5])}]
    assert max_rel_error(out, ref) == pytest.approx(0.5 / 2.0)
    assert max_rel_error([torch.tensor([float("inf"), -4.0]), ref[1]], ref) == float("inf")
    with pytest.raises(ValueError, match="outputs: expected 2 tensors"):
        max_rel_error(out[:1], ref)
