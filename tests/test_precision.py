"""kernels.precision: the TF32 decision for fp32 convs follows cuDNN's setting under both PyTorch APIs and never
raises where reading the legacy flag would."""

import pytest
import torch

from fusedconv.kernels.precision import cudnn_conv_allows_tf32

cudnn = torch.backends.cudnn
_HAS_TREE = hasattr(getattr(cudnn, "conv", None), "fp32_precision")


@pytest.fixture
def restore_precision():
    legacy = cudnn.allow_tf32
    tree = (torch.backends.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision,
            cudnn.rnn.fp32_precision) if _HAS_TREE else None
    yield
    if tree is not None:
        torch.backends.fp32_precision, cudnn.fp32_precision = tree[0], tree[1]
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = tree[2], tree[3]
    cudnn.allow_tf32 = legacy


@pytest.mark.parametrize("on", [True, False])
def test_legacy_flag(restore_precision, on):
    cudnn.allow_tf32 = on
    assert cudnn_conv_allows_tf32() is on


@pytest.mark.skipif(not _HAS_TREE, reason="this PyTorch has no fp32_precision settings")
@pytest.mark.parametrize("conv, rnn, expected", [("ieee", "tf32", False), ("tf32", "ieee", True)])
def test_conv_and_rnn_set_apart(restore_precision, conv, rnn, expected):
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = conv, rnn
    with pytest.raises(RuntimeError):
        cudnn.allow_tf32  # the legacy read this module guards against
    assert cudnn_conv_allows_tf32() is expected
