"""The fused layers' kernel routes end to end under Triton's interpreter (the module -> op -> launcher plumbing a
CUDA device would take: packed 3-D weights, residual, post-affine, Conv1d as a 2-D conv with H = 1), the int64
offsets of the 3-D kernel, and the `fusedconv::conv3d_bn_act` op itself (schema / fake-tensor checks via
torch.library.opcheck, and torch.export of a converted video block).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fusedconv
from fusedconv import ops, ops_nd
from fusedconv.fused_layers import FusedConv1d, FusedConv3d
from util import max_rel_error, randomize_bn


def _bn(cls, c, seed):
    bn = cls(c)
    randomize_bn(nn.Sequential(bn), seed)
    return bn.eval()


def _truth(seq, x, *extra):
    with torch.no_grad():
        return seq.double()(x.double(), *extra) if extra else seq.double()(x.double())


@pytest.mark.interpret
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv3d_runs_the_3d_kernel(monkeypatch, channels_last):
    monkeypatch.setattr(ops_nd, "use_kernel_3d", lambda x, w: True)  # what a CUDA tensor gets
    torch.manual_seed(0)
    conv, bn, post = nn.Conv3d(5, 6, 3, stride=(1, 2, 2), padding=1), _bn(nn.BatchNorm3d, 6, 1), _bn(nn.BatchNorm3d, 6, 2)
    fused = FusedConv3d.from_modules(conv, bn, nn.GELU(), post)
    assert not fused.weight.is_contiguous()  # packed (KD, KH, KW, Cin, Cout) strides reach the kernel
    x = torch.randn(2, 5, 3, 5, 6)
    r = torch.randn(2, 6, 3, 3, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = fused(x, r)
    truth = _truth(nn.Sequential(conv, bn), x)
    truth = post.double()(nn.functional.gelu(truth + r.double()))
    assert max_rel_error(out, truth) < 1e-5
    assert out.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


@pytest.mark.interpret
def test_3d_kernel_int64_offsets(monkeypatch):
    from fusedconv.kernels import conv3d

    monkeypatch.setattr(conv3d, "_INT32_LIMIT", 0)  # force the int64 variant on a tiny problem
    torch.manual_seed(1)
    x, w = torch.randn(1, 4, 3, 4, 4), torch.randn(5, 4, 3, 3, 3) * 0.2
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)
    out = conv3d.conv3d_bn_act(x, w, scale, shift, padding=1, activation="silu")
    truth = nn.functional.silu(nn.functional.conv3d(x.double(), w.double(), padding=1) * scale.double().view(1, -1, 1, 1, 1)
                               + shift.double().view(1, -1, 1, 1, 1))
    assert max_rel_error(out, truth) < 1e-5


@pytest.mark.interpret
def test_fused_conv1d_runs_the_2d_kernel_with_h1(monkeypatch):
    monkeypatch.setattr(ops, "use_kernel", lambda x, w: True)
    monkeypatch.setattr(ops, "_kernel_dtype_on_cuda", lambda x, w: True)
    torch.manual_seed(2)
    conv, bn, post = nn.Conv1d(6, 8, 5, stride=2, padding=4, dilation=2, groups=2), _bn(nn.BatchNorm1d, 8, 3), \
        _bn(nn.BatchNorm1d, 8, 4)
    fused = FusedConv1d.from_modules(conv, bn, nn.ReLU(), post)
    x = torch.randn(2, 6, 17)
    with torch.no_grad():
        out = fused(x)
    truth = post.double()(torch.relu(_truth(nn.Sequential(conv, bn), x)))
    assert out.shape == truth.shape and max_rel_error(out, truth) < 1e-5


def test_conv3d_op_passes_opcheck():
    torch.manual_seed(3)
    x, w = torch.randn(1, 4, 3, 4, 4), torch.randn(6, 2, 3, 1, 3)
    args = (x, w, torch.rand(6) + 0.5, torch.randn(6), torch.randn(1, 6, 3, 4, 4), torch.rand(6), torch.randn(6),
            [1, 1, 1], [1, 0, 1], [1, 1, 1], 2, "leaky_relu", 0.1)
    torch.library.opcheck(torch.ops.fusedconv.conv3d_bn_act.default, args)
    out = torch.ops.fusedconv.conv3d_bn_act(*args)
    conv = nn.functional.conv3d(x.double(), w.double(), None, 1, (1, 0, 1), 1, 2)
    view = (1, -1, 1, 1, 1)
    truth = nn.functional.leaky_relu(conv * args[2].double().view(view) + args[3].double().view(view)
                                     + args[4].double(), 0.1) * args[5].double().view(view) + args[6].double().view(view)
    assert max_rel_error(out, truth) < 1e-5


@torch.no_grad()
def test_converted_video_block_exports_without_batch_norm():
    torch.manual_seed(4)
    block = nn.Sequential(nn.Conv3d(3, 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), nn.BatchNorm3d(8), nn.ReLU(),
                          nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8))
    block = randomize_bn(block).eval()
    converted = fusedconv.convert(block)
    x = torch.randn(1, 3, 4, 16, 16)
    program = torch.export.export(converted, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets), targets
    assert max_rel_error(program.module()(x), block(x)) < 1e-5
