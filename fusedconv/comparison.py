"""The rules by which a converted model counts as "the same function" as its original.

One place for the self-check tolerances and the error measures, below both the public API (`convert`,
`convert_exported`) and the modules that check themselves (the CPU layout boundary), so every check in the
library applies the same rule and nothing below `convert` has to import it.

Self-check tolerances (max |converted - original| / max |original| over every floating output), per output
dtype: float64 1e-9, float32 1e-4, float16 1e-2, bfloat16 5e-2. Folding BN into the conv reorders a few
floating-point operations, so fp32 results typically differ by ~1e-6 relative; 1e-4 leaves room for GPU
kernels (different accumulation order) while still catching any real mistake, which shows up as O(1).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

SELF_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def snapshot_outputs(out):
    """The output's leaves, tensors cloned (a later in-place op in the model must not change the reference)."""
    leaves, spec = tree_flatten(out)
    return [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in leaves], spec


def compare_outputs(out, ref_leaves, ref_spec) -> tuple[float, float]:
    """(max relative error, tolerance) between a model output and a snapshot of the reference output.

    Raises RuntimeError when the structure, a shape or a non-floating value differs.
    """
    leaves, spec = tree_flatten(out)
    if spec != ref_spec or len(leaves) != len(ref_leaves):
        raise RuntimeError(f"convert: the converted model's output structure differs from the original's "
                           f"({spec} vs {ref_spec})")
    err, tol = 0.0, 0.0
    for i, (o, r) in enumerate(zip(leaves, ref_leaves)):
        if not isinstance(r, torch.Tensor):
            if o != r:
                raise RuntimeError(f"convert: output leaf {i} differs: {o!r} vs original {r!r}")
            continue
        if o.shape != r.shape:
            raise RuntimeError(f"convert: output {i} has shape {tuple(o.shape)}, the original's "
                               f"{tuple(r.shape)}")
        if not r.is_floating_point():
            if not torch.equal(o, r):
                raise RuntimeError(f"convert: output {i} ({r.dtype}) differs from the original's")
            continue
        tol = max(tol, SELF_CHECK_TOLERANCE.get(r.dtype, 1e-4))
        if r.numel():
            o64, r64 = o.detach().double(), r.double()
            e = float((o64 - r64).abs().max() / r64.abs().max().clamp_min(1e-30))
            if not (o64.isfinite() == r64.isfinite()).all():
                e = float("inf")
            err = max(err, e)
    return err, tol


def max_rel_error(out, ref) -> float:
    """max |out - ref| / max |ref| over every tensor of (possibly nested) outputs."""
    outs, refs = _flat_tensors(out), _flat_tensors(ref)
    if len(outs) != len(refs):
        raise ValueError(f"outputs: expected {len(refs)} tensors like the original, got {len(outs)}")
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = o.detach().double().cpu(), r.detach().double().cpu()
        if o.shape != r.shape:
            raise ValueError(f"outputs: expected shape {tuple(r.shape)} like the original, got {tuple(o.shape)}")
        worst = max(worst, float((o - r).abs().max() / r.abs().max().clamp_min(1e-30)) if r.numel() else 0.0)
        if not torch.isfinite(o).all():
            return float("inf")
    return worst


def _flat_tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat_tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat_tensors(v)]
    return []
