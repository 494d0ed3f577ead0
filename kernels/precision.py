"""Whether fp32 convolutions may use TF32 tensor cores, read the way cuDNN's own convs read it.

The kernels follow cuDNN: fp32 input runs TF32 dots exactly when a cuDNN conv would. PyTorch has two ways to
say so — the legacy `torch.backends.cudnn.allow_tf32` and the `fp32_precision` tree
(`torch.backends.cudnn.conv.fp32_precision`, ...). Reading the legacy flag raises once conv and RNN were set
apart through the new tree, so it cannot be read unguarded on every launch.
"""

from __future__ import annotations

import torch


def cudnn_conv_allows_tf32() -> bool:
    """True when a cuDNN fp32 convolution may use TF32 under the current PyTorch settings."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        # Conv and RNN precisions differ (set through the fp32_precision API): the conv's own setting decides;
        # anything but an explicit "tf32" keeps IEEE fp32, the precise side.
        conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
        return conv == "tf32"
