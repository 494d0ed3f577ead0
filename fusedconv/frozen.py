"""`convert(model, freeze=True)`: the converted model as a frozen function, like torch.jit.freeze or Inductor's
freezing, without their compile step.

A converted model checks on every forward that nothing it depends on changed since convert: on CPU at batch 1 the
whole-model flat forward's two checks (graph/flat.py: every module on its paths, their hooks and the attributes
their code read; graph/flat_fused.py: each fused layer's tensors against the snapshot it folded) read about a
thousand objects that the previous forward pushed out of the caches, ~0.5 ms of mobilenet_v2's ~8 ms. (A model
convert returns skips them too until code first reaches into it, graph/reach.py; a frozen model never needs them.)

A FrozenModel holds its own copy of the converted model, out of reach: not a submodule (no parameters, buffers,
state_dict entries or hooks can be reached through it), so no module of that copy can be edited, hooked or
replaced, and its per-forward checks keep only what lies outside it — the call pattern of the arguments, no
tracer or compiler running, no global hooks, gradient mode, the fast path switch, and the class-level terms (a
class's forward or method patched, a class attribute changed). It computes the function the model computed when
it was frozen: later edits of the model it was made from are not seen (that is what freezing means), and moving
or casting it (`.to()`, `.half()`, `.cuda()`) or switching it to training raises instead of doing nothing.
"""
from __future__ import annotations

import torch.nn as nn

from fusedconv import cpu_boundary
from fusedconv.graph.flat import flat_check
from fusedconv.graph.owned_input import _fx_tracing
from fusedconv.model_copy import copy_model, modules_in_training
from fusedconv.scripting import refuse_script


class FrozenModel(nn.Module):
    """A converted model frozen by `fusedconv.convert(model, freeze=True)` (module doc). Call it like the model."""

    wraps_converted_model = True  # runs the converted model in `_model` (cpu_boundary.layout_used looks there)
    __prepare_scriptable__ = refuse_script  # (fusedconv/scripting.py)

    def __init__(self, converted: nn.Module, *, _private: bool = False):
        """Freezes a copy of `converted` (an eval-mode model, normally one fusedconv.convert returned); `_private`
        (convert's own call) says `converted` is already a copy no one else holds."""
        super().__init__()
        if not isinstance(converted, nn.Module):
            raise TypeError(f"converted: expected a torch.nn.Module, got {type(converted).__name__}")
        training = modules_in_training(converted)
        if training:
            raise ValueError(f"converted: expected a model in eval mode, got {len(training)} module(s) in training "
                             f"mode, e.g. {training[0]!r}")
        if not _private:
            converted = copy_model(converted, "converted")
        # In __dict__, not _modules: the copy is no submodule (nothing reaches its modules or tensors).
        self.__dict__["_model"] = converted
        self.__dict__["_model_class"] = type(converted).__name__
        self.training = False
        for p in converted.parameters():
            p.requires_grad_(False)  # constants (torch.jit.trace inlines them as such)
        check = flat_check(converted)
        if check is not None:
            check.freeze()
        boundary = converted.__dict__.get(cpu_boundary.ATTRIBUTE)
        if boundary is not None:
            boundary.frozen = True  # no module of the copy can change: its layout decisions hold for good

    def forward(self, *args, **kwargs):
        if _fx_tracing():
            raise RuntimeError("FrozenModel: torch.fx cannot trace a frozen model (its arguments are *args and it "
                               "has no submodules to record); trace fusedconv.convert(model) instead")
        return self._model(*args, **kwargs)

    def train(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise TypeError(f"FrozenModel.train: mode expected True or False, got {mode!r}")
        if mode:
            raise RuntimeError("FrozenModel.train: a frozen model runs in eval mode only; train the original "
                               "model and convert it again")
        return super().train(False)

    def _apply(self, fn, recurse=True):
        raise RuntimeError("FrozenModel: a frozen model's tensors are constants and cannot be moved or cast "
                           "(.to(), .cuda(), .half(), ...); do that to the model before fusedconv.convert(model, "
                           "freeze=True)")

    def extra_repr(self) -> str:
        return f"{self._model_class}, frozen"
