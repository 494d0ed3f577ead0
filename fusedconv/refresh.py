"""`fusedconv.refresh(model)`: recompute every fused layer's derived state after writes PyTorch cannot see.

A fused layer caches what it derives from its tensors (the folded weight and bias, the oneDNN-packed weight and the
routes of the CPU path, the autocast copies) and checks on every call that the tensors are unchanged: the same
objects, with the same version counters and data pointers. That sees every edit PyTorch records — in-place ops
under torch.no_grad(), `load_state_dict`, assigning a new tensor, `.data = t`. It cannot see a write through a
`.data` alias (`layer.weight.data.copy_(w)`, `p.data.mul_(decay)`): `.data` is a new tensor over the same memory
with a version counter of its own, so the memory changes and nothing that could be checked does. The next forward
would then reuse the derived state of the old values. After such writes call `fusedconv.refresh(model)`, or edit
without `.data` (`with torch.no_grad(): p.copy_(w)`), which every forward sees.
"""
from __future__ import annotations

import torch.nn as nn

from fusedconv.frozen import FrozenModel
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.modules import FusedConv2d


def refresh(model: nn.Module) -> int:
    """Drop and rebuild the derived state of every fused layer in `model` (module doc); returns how many layers
    were refreshed. Raises TypeError for a FrozenModel, which computes the function of convert time by design."""
    if isinstance(model, FrozenModel):
        raise TypeError("model: a fusedconv.FrozenModel computes the function the model computed when it was "
                        "frozen and sees no edits; edit the original model and call fusedconv.convert(model, "
                        "freeze=True) again")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if isinstance(module, (FusedConv2d, FusedAffineLayer)):
            module.refresh()
            count += 1
    return count
