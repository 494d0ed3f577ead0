"""A copy of a model that behaves as the model does: `copy.deepcopy`, then checked and mended where deepcopy is known
to lose state.

`convert`, `reparameterize` and `FrozenModel` work on a copy (the input is never modified), so the copy must
compute what the original computes. `copy.deepcopy` does not always give that: torch.fx's GraphModule rebuilds
itself in `__deepcopy__` through its `__init__`, and torchvision's feature extractors (`create_feature_extractor`,
a DualGraphModule) come back in training mode, every submodule with them, from an eval-mode original; converting
one left its BatchNorms unfolded ("training mode") and the returned model normalised with batch statistics,
giving other outputs and updating its running statistics on every call. The same rebuild drops the root's forward
and backward hooks (GraphModule copies only its state-dict hooks). So after the deepcopy the two module trees are
walked in step: the copy must have the same module names in the same order, each module's training flag is set
back to the original's (through `Module.train`, parent first, so a module that switches behaviour on it — a
DualGraphModule picks its eval graph — does so), and hooks the copy lost are copied from the original as deepcopy
would have copied them (the same memo, so a hook bound to a module binds to that module's copy).

`check_eval_root` refuses a model not put in eval mode, `check_eager` a TorchScript model (compiled code: nothing
the passes can trace or rewrite, and its attribute protocol breaks their reads), and `check_initialized` a model
with lazy modules not yet initialized (a copy of one would draw its own weights on its first call).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.parameter import is_lazy

# The hook tables of nn.Module, read from the module's __dict__ (absent ones are skipped).
_HOOK_ATTRS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def copy_model(model: nn.Module, name: str = "model") -> nn.Module:
    """`copy.deepcopy(model)` with the original's training flags and hooks on every module (module doc). Raises
    RuntimeError, naming `name`, when the copy's module tree differs from the original's."""
    memo: dict = {}
    try:
        dup = copy.deepcopy(model, memo)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        # torch.nn.utils.prune and the hook-based weight_norm keep a weight computed with autograd, which deepcopy
        # refuses until a forward under no_grad recomputes it as a plain tensor.
        raise RuntimeError(f"{name}: copy.deepcopy({name}) failed ({first}); run one forward pass under "
                           "torch.no_grad() first (pruned or weight-normed layers hold a computed weight until then; "
                           "example_inputs= runs it), or convert in place (inplace=True)") from e
    originals = list(model.named_modules(remove_duplicate=False))
    copies = list(dup.named_modules(remove_duplicate=False))
    if [n for n, _ in originals] != [n for n, _ in copies]:
        raise RuntimeError(f"{name}: copy.deepcopy({name}) gives a model with other submodules than {name} has "
                           f"({len(copies)} vs {len(originals)} modules); convert it in place (inplace=True)")
    for (_, orig), (_, new) in zip(originals, copies):
        if new.training != orig.training:
            new.train(orig.training)
        for attr in _HOOK_ATTRS:
            hooks = orig.__dict__.get(attr)
            if hooks and not set(hooks) <= set(new.__dict__.get(attr) or ()):  # keyed by the hooks' handle ids
                new.__dict__[attr] = copy.deepcopy(hooks, memo)
        if orig.__dict__.get("_backward_hooks"):
            new.__dict__["_is_full_backward_hook"] = orig.__dict__.get("_is_full_backward_hook")
    return dup


def check_initialized(model: nn.Module, name: str = "model") -> None:
    """Raise when `model` still has lazy (uninitialized) parameters or buffers (nn.LazyConv2d, LazyBatchNorm2d before
    their first forward): there is no function to preserve yet, and a copy would draw its own weights on its
    first call."""
    lazy = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if is_lazy(t)]
    if lazy:
        raise ValueError(f"{name}: expected initialized parameters, got {len(lazy)} uninitialized (lazy) "
                         f"parameter(s) or buffer(s), e.g. {lazy[0]!r}; run one forward pass first (or pass "
                         "example_inputs=, which runs it)")


def modules_in_training(model: nn.Module) -> list[str]:
    """The names of `model`'s modules in training mode ("<root>" for the root); plain nn.Module() containers (fx's
    GraphModule creates them for nested targets) have no behaviour that depends on the flag and are left out."""
    return [n or "<root>" for n, m in model.named_modules() if m.training and type(m) is not nn.Module]


def check_eval_root(model: nn.Module, name: str = "model") -> None:
    """Raise a RuntimeError unless `model` itself is in eval mode. A model in eval mode may hold modules its owner
    put back in training mode (test-time adaptation: BatchNorms normalizing by the batch; Monte Carlo dropout):
    the rewrites leave those as they are (a BatchNorm in training mode is never folded), so only a model still in
    training mode as a whole, which `model.eval()` was not called on, is refused."""
    if model.training:
        training = modules_in_training(model)
        raise RuntimeError(f"{name}: expected a model in eval mode (call model.eval() first), got {len(training)} "
                           f"module(s) in training mode, e.g. {training[0]!r}; a BatchNorm in training mode "
                           "normalizes by the batch and cannot be folded")


def check_eager(model: nn.Module, name: str = "model") -> None:
    """Raise a TypeError naming the TorchScript route when `model` is a torch.jit.ScriptModule (scripted or traced)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{name}: expected an eager torch.nn.Module, got a TorchScript module "
                        f"({type(model).__name__}); convert TorchScript with "
                        "fusedconv.graph.exported.convert_torchscript(module, example_inputs), which returns an "
                        "ExportedProgram")
