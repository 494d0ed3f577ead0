"""Guard terms for tensors a fold read that stay in the model: a functional `F.batch_norm`'s statistics and affine.

A block calling `F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, ...)` keeps those
tensors as its own parameters / buffers after convert (its state_dict keeps them), while the fused conv holds
scale and shift folded from their values at convert time. An in-place edit of them afterwards (an optimizer step,
`load_state_dict`, `.mul_()`), or a new tensor put in their place, would leave the fused call computing the old
BN: silently (0.10 and 0.24 relative error in float64 on bench/zoo_models.py's `home:functional_bn` with its
`var` or `gamma` scaled by 1.5). So the block's guard checks on every call that each such tensor is still the
object convert folded, with the same version counter and data pointer (`folded_unchanged`); otherwise the call
takes the block's exact fallback, which runs its own forward and reads them as they are now. (The fused conv keeps
its stale fold; convert the model again to fuse the new values.)

A snapshot copies with the model: under copy.deepcopy (and pickling) it snapshots the copy's tensor, provided the
tensor it was taken from had not been edited (else the copy's guard never holds: its fused conv carries the stale
fold too).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from fusedconv.graph.inlined_containers import _path_term
from fusedconv.graph.model_code import MISSING
from fusedconv.graph.patterns import Guard


class FoldedTensor:
    """A tensor attribute `attr` of its owner as convert folded it: the object, its version counter and data
    pointer (`valid` False: a snapshot that never holds, module doc)."""

    __slots__ = ("attr", "tensor", "version", "data_ptr", "valid")

    def __init__(self, attr: str, tensor: torch.Tensor, valid: bool = True):
        self.attr, self.tensor, self.valid = attr, tensor, valid
        self.version, self.data_ptr = tensor._version, tensor.data_ptr()

    def unchanged(self, tensor) -> bool:
        return (self.valid and tensor is self.tensor and tensor._version == self.version
                and tensor.data_ptr() == self.data_ptr)

    def __deepcopy__(self, memo):
        return FoldedTensor(self.attr, copy.deepcopy(self.tensor, memo), self.unchanged(self.tensor))

    def __reduce__(self):
        return FoldedTensor, (self.attr, self.tensor, self.unchanged(self.tensor))


def folded_unchanged(owner: nn.Module, snap: FoldedTensor) -> bool:
    """`owner`'s attribute `snap.attr` (a parameter, buffer or plain attribute) is the tensor `snap` holds, unedited."""
    d = owner.__dict__
    t = d["_parameters"].get(snap.attr, MISSING)
    if t is MISSING:
        t = d["_buffers"].get(snap.attr, MISSING)
    if t is MISSING:
        t = d.get(snap.attr, MISSING)
    return snap.unchanged(t)


def folded_source_terms(g: Guard, block: nn.Module, targets: tuple, expect: list) -> None:
    """Add to `g` a term per dotted attribute path in `targets` (None entries skipped) under `block` (module doc):
    the path to its owner by identity, then `folded_unchanged`."""
    for target in targets:
        if target is None:
            continue
        owner_path, _, attr = target.rpartition(".")
        if owner_path:
            path_term = _path_term(block, owner_path, expect) + " and "
            owner, owner_expr = block.get_submodule(owner_path), f"e[{len(expect) - 1}]"
        else:
            path_term, owner, owner_expr = "", block, "self"
        expect.append(FoldedTensor(attr, getattr(owner, attr)))
        g.check(f"{path_term}folded_unchanged({owner_expr}, e[{len(expect) - 1}])",
                f"self.{target} as convert folded it", describe=False)
