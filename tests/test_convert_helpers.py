"""Assertions shared by the convert tests (no tests here): outputs match, BatchNorm gone, original untouched."""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import batch_norm_count, count_ops, max_rel_error  # noqa: E402

import fusedconv  # noqa: E402


def snapshot(model: nn.Module) -> tuple[dict, list]:
    """Copies of the state_dict and the (name, class) list of every module, to prove the model is untouched."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    return state, kinds


def assert_untouched(model: nn.Module, snap: tuple[dict, list]) -> None:
    state, kinds = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == kinds, "the original model's modules changed"
    now = model.state_dict()
    assert now.keys() == state.keys(), "the original model's state_dict keys changed"
    for k, v in state.items():
        assert torch.equal(now[k], v), f"the original model's {k} changed"


def output_error(out, ref) -> float:
    """max relative error over every floating tensor of two outputs of the same structure."""
    a, spec_a = tree_flatten(out)
    b, spec_b = tree_flatten(ref)
    assert spec_a == spec_b, f"output structure differs: {spec_a} vs {spec_b}"
    err = 0.0
    for o, r in zip(a, b):
        if isinstance(r, torch.Tensor):
            assert o.shape == r.shape, f"output shape differs: {tuple(o.shape)} vs {tuple(r.shape)}"
            if r.is_floating_point():
                err = max(err, max_rel_error(o, r) if r.numel() else 0.0)
            else:
                assert torch.equal(o, r)
        else:
            assert o == r
    return err


@torch.no_grad()
def check_convert(model: nn.Module, *inputs, tol: float = 1e-5, bn_left: int = 0, **kwargs):
    """Convert `model` and assert: outputs within `tol`, `bn_left` batch norms still executing, original
    untouched. Returns (converted, report)."""
    model.eval()
    snap = snapshot(model)
    ref = model(*inputs)
    converted, report = fusedconv.convert(model, return_report=True, **kwargs)
    assert_untouched(model, snap)
    out = converted(*inputs)  # the first call also computes the fallback's folded weights
    err = output_error(out, ref)
    assert err < tol, f"max relative error {err:.3e} >= {tol:g}\n{report}"
    left = batch_norm_count(count_ops(converted, *inputs))
    assert left == bn_left, f"{left} batch_norm ops still execute (expected {bn_left})\n{report}"
    assert_untouched(model, snap)
    return converted, report


@torch.no_grad()
def check_convert_live(model: nn.Module, *inputs, bn_left: int = 0, **kwargs):
    """check_convert for a model whose output depends on every layer (BN statistics measured on an example,
    `randomize_bn(model, seed, example)`), where float32 rounding shows: the converted model computes the same
    function in float64 (< 1e-10) and in float32 stays within 1e-5 of float64, or within twice the original's own
    float32 error where that is larger. Returns (converted float32 model, report)."""
    model.eval()
    model64 = copy.deepcopy(model).double()
    inputs64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    ref64 = model64(*inputs64)
    err64 = output_error(fusedconv.convert(model64, **kwargs)(*inputs64), ref64)
    assert err64 < 1e-10, f"float64: max relative error {err64:.3e}"
    own = output_error(model(*inputs), ref64)
    converted, report = check_convert(model, *inputs, tol=float("inf"), bn_left=bn_left, **kwargs)
    err32 = output_error(converted(*inputs), ref64)
    assert err32 <= max(2 * own, 1e-5), f"float32: {err32:.3e} against float64, the original's own {own:.3e}\n{report}"
    return converted, report


def fused(report) -> list:
    """The report's fused Conv -> BN (-> act) rows (re-parameterization rows are another pass's)."""
    return [r for r in report.fused if r.kind == "conv_bn_act"]


def skipped(report) -> list:
    return [r for r in report.skipped if r.kind == "conv_bn_act"]
