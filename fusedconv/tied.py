"""Tied tensors through convert: a parameter or buffer two modules hold (weight tying, one conv's weight assigned
to another) stays one tensor in the converted model.

A fused layer keeps its conv's weight under the conv's name, but as a tensor of its own (FusedConv2d copies what
it is built from). Where the original model held one tensor under two names, an in-place edit after convert (a
fine-tuning step, `load_state_dict`, `weight.mul_(...)`) would then reach one holder and not the other: the two
models would silently part. `tied_groups` records the names each shared tensor is held under before the rewrites;
`retie` makes the converted model hold one tensor under all of them again where it still holds them all with the
same values, and warns where a rewrite folded or merged one holder into another tensor (a BN before a conv, a
re-parameterized branch), which no tie can follow. The same holds within one layer: where a conv stays beside the
fused module built from it (the forward reads the conv's weight), `share_copies` gives the fused module the conv's
weight itself (`copied` records, while convert rewrites, what each fused weight was copied from).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
import torch.nn as nn

# While convert rewrites: id(a fused layer's weight) -> (that weight, the parameter it was copied from).
_copies: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fusedconv_weight_copies", default=None)


@contextlib.contextmanager
def tracking_copies():
    """Records, while the rewrites run, which parameter each fused layer's weight was copied from (`copied`)."""
    token = _copies.set({})
    try:
        yield
    finally:
        _copies.reset(token)


def copied(new: torch.Tensor, source) -> None:
    """A fused layer copied its weight `new` from `source` (recorded only inside `tracking_copies`)."""
    table = _copies.get()
    if table is not None and isinstance(source, nn.Parameter):
        table[id(new)] = (new, source)


def share_copies(model: nn.Module) -> None:
    """Give each fused layer whose weight was copied from a parameter the converted model still holds (a conv kept
    beside its fused layer because the forward reads its weight, a tied conv left unfused) that parameter itself,
    so an in-place edit reaches both uses (in place; only inside `tracking_copies`)."""
    table = _copies.get()
    if not table:
        return
    held = _holders(model)
    for module in model.modules():
        for name, t in list(module._parameters.items()):
            entry = table.get(id(t))
            if entry is None or entry[0] is not t:
                continue
            source = entry[1]
            if id(source) in held and source is not t and source.shape == t.shape and source.dtype == t.dtype \
                    and source.device == t.device and torch.equal(source, t):
                setattr(module, name, source)


def _holders(model: nn.Module) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for slot in ("_parameters", "_buffers"):
            for name, t in module.__dict__[slot].items():
                if isinstance(t, torch.Tensor):
                    found.setdefault(id(t), []).append(f"{prefix}.{name}" if prefix else name)
    return found


def tied_groups(model: nn.Module) -> list[list[str]]:
    """The names of every parameter or buffer that two modules of `model` hold (a module reached by two paths
    holding it alone is no tie: the rewrites see one module)."""
    groups = []
    for names in _holders(model).values():
        owners = {id(_owner(model, n)[0]) for n in names}
        if len(owners) > 1:  # held by two modules, not one module reached by two paths
            groups.append(sorted(set(names)))
    return groups


def _owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    path, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(path) if path else model), attr
    except AttributeError:
        return None, attr


def _held(model: nn.Module, name: str) -> torch.Tensor | None:
    module, attr = _owner(model, name)
    if module is None:
        return None
    for slot in ("_parameters", "_buffers"):
        t = module.__dict__[slot].get(attr)
        if isinstance(t, torch.Tensor):
            return t
    return None


def retie(model: nn.Module, groups: list[list[str]], notes: list[str]) -> None:
    """Make `model` hold one tensor under each group's names again (in place); warn for a group it cannot."""
    for names in groups:
        held = {n: _held(model, n) for n in names}
        present = {n: t for n, t in held.items() if t is not None}
        if len({id(t) for t in present.values()}) <= 1 and len(present) == len(names):
            continue
        same = len(present) == len(names) and all(
            t.shape == first.shape and t.dtype == first.dtype and t.device == first.device and torch.equal(t, first)
            for first in [next(iter(present.values()))] for t in present.values())
        if not same:
            gone = [n for n in names if n not in present]
            msg = (f"fusedconv: {', '.join(names)} were one tensor in the original model; convert folded or merged "
                   f"{'the layer holding ' + ', '.join(gone) if gone else 'one of its holders'} into a tensor of its "
                   "own, so an in-place edit of one of them after convert no longer reaches the others (edit the "
                   "original model and convert it again)")
            notes.append(msg[len("fusedconv: "):])
            warnings.warn(msg, UserWarning, stacklevel=3)
            continue
        # The tensor a module fusedconv did not build holds, where one does: its requires_grad and class stay.
        canonical = next((t for n, t in present.items()
                          if not type(_owner(model, n)[0]).__module__.startswith("fusedconv")),
                         next(iter(present.values())))
        for n, t in present.items():
            if t is not canonical:
                module, attr = _owner(model, n)
                slot = "_parameters" if attr in module._parameters else "_buffers"
                if slot == "_parameters" and not isinstance(canonical, nn.Parameter):
                    continue  # (a parameter and a buffer holding one tensor: left as the rewrite made them)
                setattr(module, attr, canonical)
