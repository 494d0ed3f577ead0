"""Public API: `convert(model)` returns an equivalent model whose Conv -> BN (-> act) (-> + residual) chains
run as single FusedConv2d modules.

Steps: copy (unless inplace) -> structural re-parameterization (`fusedconv.reparam`) -> data-flow pass
(`fusedconv.graph.dataflow`: torch.fx per module scope, plain nn.Sequential chains without tracing) ->
optional self-check on example inputs.

The self-check tolerances and the output comparison are `fusedconv.comparison`'s (shared with the graph-level
`convert_exported` and the CPU layout boundary).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# SELF_CHECK_TOLERANCE and compare_outputs are re-exported: they were defined here and users import them from here.
from fusedconv.comparison import SELF_CHECK_TOLERANCE, compare_outputs  # noqa: F401
from fusedconv.comparison import snapshot_outputs as _snapshot
from fusedconv.cpu_boundary import install as install_layout_boundary
from fusedconv.frozen import FrozenModel
from fusedconv.fused_layers import FusedConv3d
from fusedconv.graph.dataflow import fuse_dataflow
from fusedconv.graph.flat import flatten as flatten_model
from fusedconv.graph.reach import arm
from fusedconv.graph.owned_input import install as install_owned_inputs
from fusedconv.graph.inspected import inspecting
from fusedconv.graph.reparam_convert import fuse_reparameterized
from fusedconv.tied import retie, share_copies, tied_groups, tracking_copies
from fusedconv.graph.tracing import proxy_leak_guard
from fusedconv.model_copy import check_eager, check_eval_root, check_initialized, copy_model
from fusedconv.modules import FusedConv2d
from fusedconv.random_state import kept_random_states, set_random_states
# (named apart: convert's own `reparameterize` flag would shadow it)
from fusedconv.reparam import reparameterize as reparameterize_model
from fusedconv.report import ConversionReport


def _check_model(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, FrozenModel):
        raise TypeError(f"{name}: expected a model to convert, got a FrozenModel (already converted and frozen)")
    check_eager(model, name)
    check_eval_root(model, name)


def _as_args(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs: expected a tensor or a tuple of positional arguments, "
                    f"got {type(example_inputs).__name__}")


def _reparameterize(model: nn.Module, example_inputs, report: ConversionReport) -> nn.Module:
    with proxy_leak_guard(model, report.notes):
        model, rep = reparameterize_model(model, inplace=True, example_inputs=example_inputs, return_report=True)
    report.extend(rep)
    return model


def _layout_boundary_pays(model: nn.Module) -> bool:
    """Whether to give the converted model the CPU layout boundary (channels_last inside for NCHW input). The
    switch pays for FusedConv2d's oneDNN route; where almost every conv stays unfused (dpn68's BN -> ReLU -> conv
    blocks: 1 fused of 72) it would only move the unfused layers to another layout, measured 3 % slower than the
    original (`python -m bench.zoo_speed`). So: at least one 2-D conv in ten fused, or one 3-D conv in ten (the
    channels_last_3d route of FusedConv3d, fusedconv/cpu_conv3d.py)."""
    fused2 = plain2 = fused3 = plain3 = 0
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            fused2 += 1
        elif isinstance(m, nn.Conv2d):
            plain2 += 1
        elif isinstance(m, FusedConv3d):
            fused3 += 1
        elif isinstance(m, nn.Conv3d):
            plain3 += 1
    return (fused2 > 0 and 10 * fused2 >= fused2 + plain2) or (fused3 > 0 and 10 * fused3 >= fused3 + plain3)


def convert(model: nn.Module, *, inplace: bool = False, example_inputs=None, reparameterize: bool = True,
            return_report: bool = False, tolerance: float | None = None, flatten: bool = True,
            freeze: bool = False):
    """Fuse every provable Conv2d -> BatchNorm (-> activation) (-> + residual -> activation) chain of an
    eval-mode `model` (modules put back in training mode inside it, such as test-time adaptation's BatchNorms, are
    left as they are; modules its forward reads into rather than only calls keep their chains; tied tensors stay
    tied: fusedconv/tied.py, fusedconv/graph/inspected.py).

    Returns a new model (the input is never modified) unless `inplace=True`. A rewritten block stays the same
    object, an instance of its own class whose forward runs the fused code for the call patterns it was traced
    with (guarded) and its own forward, exactly, for any other call (`report.guards` lists the assumptions).
    `reparameterize=True` first merges multi-branch blocks (RepVGG, ...) with `fusedconv.reparameterize`.
    With `example_inputs` (a tensor or a tuple of positional arguments) both models are run and the maximum
    relative error is stored in `report.max_rel_error`; a RuntimeError is raised when it exceeds the output
    dtype's tolerance (`SELF_CHECK_TOLERANCE`, or `tolerance` if given).
    With `return_report=True` returns `(model, report)`: each chain fused or skipped with the reason.
    `flatten=True` then gives the converted model's root one straight-line forward through its containers and
    rewritten blocks (`fusedconv.graph.flat`: guarded like every rewrite; calls it does not cover, and any call
    while torch.compile / export / fx / jit trace, run the converted model's own forward). The model returned (a new
    one, with a flat forward whose calls run no user code) is then armed (`fusedconv.graph.reach`): until some code
    reaches into it — its submodules, parameters or buffers through any attribute or method (`model.layer1`,
    `parameters()`, `state_dict()`, `modules()`, `.to()`, `.eval()`), a copy or pickle of it, a forward with
    gradients on, under a tracer, compiler or torch function mode — no edit of it can have happened, and its forward
    checks only what lies outside its modules, as `freeze=True` does; after the first reach it checks every module
    and tensor on every call again, for good, and so sees every edit.

    `freeze=True` returns the converted model frozen (`fusedconv.frozen.FrozenModel`), like torch.jit.freeze: it
    holds its own copy, which nothing can reach, and computes the function the model computed at convert time;
    each forward then checks only what lies outside that copy (call pattern, gradient mode, hooks and patches at
    class or global level), not its modules and tensors. Later edits of `model` are not seen; `.to()` and
    `.train()` on the frozen model raise. Cannot be combined with `inplace=True`.

    The self-check compares every output leaf, so models whose outputs pass through discrete post-processing
    (detection NMS / top-k / score thresholds) can fail it on near-tied scores even though the network itself
    matches to ~1e-7; check such models on their feature maps instead.
    """
    _check_model(model)
    args = _as_args(example_inputs)
    if not isinstance(flatten, bool):
        raise TypeError(f"flatten: expected True or False, got {flatten!r}")
    if not isinstance(freeze, bool):
        raise TypeError(f"freeze: expected True or False, got {freeze!r}")
    if freeze and inplace:
        raise ValueError("freeze: a frozen model holds its own copy of the converted model; freeze=True cannot be "
                         "combined with inplace=True")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance: expected a non-negative number or None, got {tolerance!r}")
    report = ConversionReport()
    # The user's random generators are left as found, and the self-check's two forwards draw the same numbers
    # (fusedconv/random_state.py).
    with torch.no_grad(), kept_random_states() as random_states:
        ref = _snapshot(model(*args)) if args is not None else None
        check_initialized(model)  # (after the example forward, which initializes lazy modules)
        original = model
        if not inplace:
            model = copy_model(model)
        tied = tied_groups(model)
        if reparameterize:
            try:
                model = _reparameterize(model, args, report)
            except Exception as e:  # noqa: BLE001 - a reparam failure must not make convert unusable
                if inplace:
                    raise
                report.notes.append(f"reparameterization failed and was skipped ({type(e).__name__}: {e})")
                model = copy_model(original)
        with inspecting(model), tracking_copies():  # (modules the code reads into, not only calls, stay as they are)
            model = fuse_dataflow(model, report)
            fuse_reparameterized(model, report)
            share_copies(model)
        retie(model, tied, report.notes)  # (before the guards below record which tensors the model holds)
        # Sequentials whose blocks may write an identity residual into an input no one else holds.
        install_owned_inputs(model)
        if flatten:
            _flatten(model, report)
        if _layout_boundary_pays(model):
            # CPU: NCHW float32 input runs channels_last inside the model, converted once at its boundary.
            install_layout_boundary(model)
        if freeze:
            model = FrozenModel(model, _private=True)  # the copy made above: no one else holds it
        if ref is not None:
            set_random_states(random_states)
            err, tol = compare_outputs(model(*args), *ref)
            tol = tol if tolerance is None else float(tolerance)
            report.max_rel_error = err
            if err > tol:
                raise RuntimeError(f"convert: the converted model's outputs differ from the original's by "
                                   f"{err:.3e} (max |diff| / max |original|), above the tolerance {tol:g}; "
                                   f"please report this as a bug.\n{report}")
    if flatten and not inplace and not freeze:
        # Last: the copy made above, which no one else holds a part of (fusedconv/graph/reach.py).
        arm(model)
    return (model, report) if return_report else model


def _flatten(model: nn.Module, report: ConversionReport) -> None:
    """The whole-model forward (graph/flat.py); a failure to build it leaves the converted model as it is."""
    try:
        done = flatten_model(model, report.notes)
    except Exception as e:  # noqa: BLE001 - an optional speed-up must never make convert unusable
        report.notes.append(f"flat forward: not built ({type(e).__name__}: {e})")
        return
    if done:
        table = model.__dict__["_fusedconv_guards"]
        report.add_guards("", table.original.__name__, table.describe())
