"""Public API: `convert(model)` returns an equivalent model whose Conv -> BN (-> act) chains run fused."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from fusedconv.graph.sequential import fuse_sequential_chains
from fusedconv.report import ConversionReport


def _check_model(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(f"{name}: expected a model in eval mode (call model.eval() first), got {len(training)} "
                           f"module(s) in training mode, e.g. {training[0]!r}")


def convert(model: nn.Module, *, inplace: bool = False, return_report: bool = False):
    """Fuse every provable Conv2d -> BatchNorm (-> activation) chain of an eval-mode `model`.

    Returns a new model (the input is left untouched) unless `inplace=True`. With `return_report=True` returns
    `(model, report)`, the report listing each chain as fused or skipped with the reason.
    """
    _check_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    with torch.no_grad():
        fuse_sequential_chains(model, report)
    return (model, report) if return_report else model
