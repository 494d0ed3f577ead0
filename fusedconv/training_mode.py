"""Training mode on a fused layer: what it computes there, said once when a layer is switched to it.

A fused layer is an inference layer: its BatchNorm is folded into a fixed per-channel affine map, and its weight,
scale and shift are built without gradients. `model.train()` on a converted model is allowed (dropout layers and
the like follow it, as some evaluation schemes want), but the fused layers then compute what the original's
layers compute in eval mode, not what its BatchNorm would compute in training mode (normalize with the batch's
statistics and update the running ones). That difference is announced with a warning when a fused layer is
switched to training mode, rather than left silent; there is no per-call cost.
"""
from __future__ import annotations

import warnings

MESSAGE = ("fusedconv: a fused layer was switched to training mode; it keeps its BatchNorm folded into a fixed "
           "per-channel affine map (as FrozenBatchNorm2d would), so batch statistics are neither used nor updated "
           "as the original model's BatchNorm would in training mode, and its weight, scale and shift are built "
           "without gradients. To train, train the original model and convert it again.")


def warn_if_training(mode: bool) -> None:
    """Warn (UserWarning, once per calling location under the default filters) when `mode` turns training on."""
    if mode:
        warnings.warn(MESSAGE, UserWarning, stacklevel=3)
