"""Structural re-parameterization: merge training-time multi-branch blocks (RepVGG, ACNet, DBB, MobileOne, ...)
into one convolution per block, generically, from the data flow.

    model = fusedconv.reparameterize(model.eval())

Every module is examined at its own scope, children first: its forward is traced with torch.fx and each sum
of branches that read the same input through linear pieces only (conv, eval BatchNorm, average pool, identity,
numeric or learned scalar factors; DBB's 1x1 -> kxk with border-exact padding) is merged, in float64, into
one nn.Conv2d with bias when that is exact (same input, same output size, kernel centres and strides lined up,
compatible groups). A block with a merge stays the same object, a guarded instance of its own class
(`graph/reparam_scope.py`): each call pattern of its forward is traced and merged while its branches exist, its
state holds the merged conv (`reparam_conv`) instead of the branches, and a call its guards reject (a flag
flipped after reparameterize, a merged branch set back) raises `GuardMiss` naming what changed: the branches
are gone, so nothing could compute it (see that module for why this is an error rather than a hidden copy of
the branches). convert() then fuses the merged conv with the activation that follows like any other chain.
Sums that read the same input but cannot be merged are left alone and reported with the reason.

A module whose forward cannot be traced, and that has its own `reparameterize()`, `switch_to_deploy()` or
`fuse()` method, is handed to that method instead, and the report says so.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedconv.graph.reparam_graph import KIND
from fusedconv.graph.reparam_leaves import ReparamTracer
from fusedconv.graph.reparam_scope import reparameterize_scope
from fusedconv.graph.specialize import guard_table
from fusedconv.graph.tracing import visit_children
from fusedconv.model_copy import check_eager, check_eval_root, check_initialized, copy_model, modules_in_training
from fusedconv.modules import FusedConv2d
from fusedconv.random_state import kept_random_states, set_random_states
from fusedconv.report import ConversionReport

__all__ = ["reparameterize"]

FALLBACK_METHODS = ("reparameterize", "switch_to_deploy", "fuse")

# Relative error above which the example-input self-check is reported as a problem (per output dtype).
_SELF_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _own_forward_has_no_sums(module: nn.Module) -> bool:
    """Library modules whose own forward is known not to add branches (containers, layers, our own op)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict, FusedConv2d, _BatchNorm,
                           nn.modules.conv._ConvNd)):
        return True
    mod = type(module).__module__ or ""
    return mod.startswith("torch.nn.") or mod.startswith("torch.ao.nn.")


def _fallback_method(module: nn.Module):
    """The first of FALLBACK_METHODS the module's class defines and that can be called without arguments."""
    for name in FALLBACK_METHODS:
        fn = getattr(type(module), name, None)
        if not callable(fn):
            continue
        try:
            params = list(inspect.signature(fn).parameters.values())[1:]  # after self
        except (TypeError, ValueError):
            continue
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return name
    return None


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__


class _Walk:
    def __init__(self, report: ConversionReport):
        self.report = report
        self.done: dict[int, nn.Module] = {}

    def visit(self, module: nn.Module, scope: str) -> nn.Module:
        key = id(module)
        if key in self.done:  # a module shared between places: rewrite it once, keep it shared
            return self.done[key]
        result = self._visit(module, scope)
        self.done[key] = result
        return result

    def _visit(self, module: nn.Module, scope: str) -> nn.Module:
        if guard_table(module) is not None:  # rewritten before (re-parameterized or converted)
            return module
        if _own_forward_has_no_sums(module):
            visit_children(module, scope, self.visit)
            return module
        method = _fallback_method(module)
        if method is not None:
            # Its own re-parameterization expects its own children: decide before rewriting them.
            try:
                ReparamTracer().trace(module)
            except Exception as e:  # noqa: BLE001 - any tracing failure means "graph not visible"
                return self._fallback(module, scope, method, e)
        visit_children(module, scope, self.visit)
        return reparameterize_scope(module, scope, self.report)

    def _fallback(self, module: nn.Module, scope: str, method: str, err: BaseException) -> nn.Module:
        why = f"graph not traceable ({_short(err)})"
        training = modules_in_training(module)
        if training:  # its own method would fold a BN that normalizes by the batch
            where = scope if training[0] == "<root>" else ".".join(p for p in (scope, training[0]) if p)
            self.report.add(scope, (scope or "<root>",), KIND, "skipped",
                            f"{why}; its own {method}() not called: {where or '<root>'!r} is in training mode")
            return module
        try:
            result = getattr(module, method)()
        except Exception as e:  # noqa: BLE001
            self.report.add(scope, (scope or "<root>",), KIND, "skipped",
                            f"{why}; its own {method}() failed: {_short(e)}")
            return module
        new = result if isinstance(result, nn.Module) else module
        new.train(module.training)
        self.report.add(scope, (scope or "<root>",), KIND, "fused", f"{why}; used the block's own {method}()")
        return new


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_eager(model)
    check_eval_root(model)


def _as_inputs(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs: expected a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def reparameterize(model: nn.Module, *, inplace: bool = False, example_inputs=None, return_report: bool = False):
    """Merge the multi-branch sums of an eval-mode `model` into single convolutions where exactly equivalent.

    Returns the new model (blocks with merges stay the same objects, guarded: `report.guards` lists what each
    assumes), or `(model, report)` with `return_report=True`; report rows have kind "reparam".
    The input model is left untouched unless `inplace=True`. With `example_inputs` (a tensor or tuple of
    tensors) the result is compared to the original on them and the error is stored in `report.max_rel_error`.
    """
    _check_model(model)
    inputs = _as_inputs(example_inputs)
    report = ConversionReport()
    with torch.no_grad(), kept_random_states() as random_states:  # (as in convert)
        ref = [t.clone() for t in _tensors(model(*inputs))] if inputs else None
        check_initialized(model)  # (after the example forward, which initializes lazy modules)
        if not inplace:
            model = copy_model(model)
        model = _Walk(report).visit(model, "")
        if ref is not None:
            set_random_states(random_states)
            out = _tensors(model(*inputs))
            if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref)):
                raise RuntimeError("reparameterize: the re-parameterized model's outputs on example_inputs have "
                                   "different shapes from the original's; please report this as a bug")
            errs = [float((o.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30))
                    for o, r in zip(out, ref) if o.numel()]
            report.max_rel_error = max(errs, default=0.0)
            tol = max((_SELF_CHECK_TOL.get(r.dtype, 1e-4) for r in ref), default=1e-4)
            if report.max_rel_error > tol:
                report.notes.append(f"reparam: outputs on example_inputs differ by {report.max_rel_error:.2e} "
                                    f"relative (above {tol:g})")
    return (model, report) if return_report else model
