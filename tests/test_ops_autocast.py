"""fusedconv's ops inside torch.autocast (fusedconv/ops_autocast.py): a converted ExportedProgram computes in a
region what the original program computes there (same output dtype, error against float64 at most twice the
original's), and the op itself casts input, weight and residual to the region's dtype and nothing else."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fusedconv import ops, ops_nd
from fusedconv.graph.exported import convert_exported
from tests.util import max_rel_error, randomize_bn

DTYPES = (torch.bfloat16, torch.float16)


class _Net(nn.Module):
    """A conv without BN (aten conv2d stays, and hands the fused op the region's dtype), conv -> BN -> ReLU, then
    conv -> BN + the first conv's output -> ReLU (a residual in the region's dtype)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        s = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(s)))
        return torch.relu(self.bn2(self.conv2(y)) + s)


def _programs(seed: int = 0):
    model = randomize_bn(_Net().eval(), seed)
    x = torch.randn(1, 3, 16, 16)
    ep = torch.export.export(model, (x,))
    converted = convert_exported(ep)
    fused = [n for n in converted.graph.nodes if n.target is torch.ops.fusedconv.conv_bn_act.default]
    assert len(fused) == 2
    return model, ep, converted, x


@pytest.mark.parametrize("dtype", DTYPES)
def test_converted_program_in_an_autocast_region(dtype):
    model, ep, converted, x = _programs()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want = ep.module()(x)
        got = converted.module()(x)
    assert got.dtype == want.dtype == dtype
    assert max_rel_error(got, ref) <= 2 * max_rel_error(want, ref) + torch.finfo(dtype).eps
    # Outside the region again: float32, as before.
    with torch.no_grad():
        out = converted.module()(x)
    assert out.dtype == torch.float32 and max_rel_error(out, ref) < 1e-5


def test_converted_program_compiled_in_an_autocast_region():
    model, ep, converted, x = _programs(1)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    compiled = torch.compile(converted.module(), backend="eager")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = ep.module()(x)
        got = compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert max_rel_error(got, ref) <= 2 * max_rel_error(want, ref) + torch.finfo(torch.bfloat16).eps


def _op_args(dtype=torch.float32, residual: bool = True):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 9, 9, generator=g, dtype=dtype)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=dtype)
    # A scale bf16 / fp16 cannot hold (1 + 2^-12): casting it would change the output.
    scale = torch.full((6,), 1 + 2 ** -12, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    shift = torch.randn(6, generator=g, dtype=scale.dtype)
    res = torch.randn(1, 6, 9, 9, generator=g, dtype=dtype) if residual else None
    return x, weight, scale, shift, res


def _call(x, weight, scale, shift, res):
    return ops.conv_bn_act(x, weight, scale, shift, res, (1, 1), (1, 1), (1, 1), 1, "relu", 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", (False, True))
def test_op_casts_input_weight_residual_and_keeps_scale_shift(dtype, residual):
    x, weight, scale, shift, res = _op_args(residual=residual)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        got = _call(x, weight, scale, shift, res)
    cast = None if res is None else res.to(dtype)
    with torch.no_grad():
        want = _call(x.to(dtype), weight.to(dtype), scale, shift, cast)
        scale_cast = _call(x.to(dtype), weight.to(dtype), scale.to(dtype).float(), shift, cast)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    assert not torch.equal(got, scale_cast)  # the scale was not rounded to the region's dtype


def test_op_leaves_float64_alone_in_a_region():
    args = _op_args(torch.float64)
    with torch.no_grad():
        want = _call(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _call(*args)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_conv3d_op_casts_in_a_region():
    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(1, 3, 4, 6, 6, generator=g), torch.randn(5, 3, 3, 3, 3, generator=g)
    scale, shift = torch.full((5,), 1 + 2 ** -12), torch.randn(5, generator=g)
    post = (torch.full((5,), 1 - 2 ** -12), torch.randn(5, generator=g))

    def call(x, weight, post_scale):
        return ops_nd.conv3d_bn_act(x, weight, scale, shift, None, post_scale, post[1], (1, 1, 1), (1, 1, 1),
                                    (1, 1, 1), 1, "silu", 0.0)

    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call(x, weight, post[0])
        want = call(x.bfloat16(), weight.bfloat16(), post[0])
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_on_cuda_in_an_autocast_region(dtype):
    x, weight, scale, shift, res = (t.cuda() for t in _op_args())
    with torch.no_grad():
        with torch.autocast("cuda", dtype=dtype):
            got = _call(x, weight, scale, shift, res)
        want = _call(x.to(dtype), weight.to(dtype), scale, shift, res.to(dtype))
    assert got.dtype == dtype and torch.equal(got, want)
