"""Balanced stream-K slices (conv_streamk.streamk_slice) in both stream-K kernel families, under the interpreter.

The slice split gives every program floor(units / P) K steps and the first units % P programs one more. These
tests run the pointer stream-K kernel and the TMA stream-K kernels through the public launcher with program
counts that leave a remainder of 0, 1 and P - 1 (slices straddling tiles in each case) and with more programs
than work units, against the float64 truth of nn.Conv2d -> nn.BatchNorm2d(eval) -> (+residual) -> activation.

A probe kernel also calls the shared helpers themselves and reports every program's slice, tile range and
the owner of every unit, which must equal the Python walk of the balanced split and the schedule model's
`streamk_slices` (the static report's accounting): the model follows the kernel, not a copy of its formula.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fusedconv.kernels import pack_weight, schedule
from fusedconv.kernels.conv_streamk import streamk_owner, streamk_slice
from test_kernel_interpret import ConvCase, run_case

# Interpreter tiles: 16x16 (pointer and TMA 1x1) or 4x4-pixel boxes x 16 channels (TMA KxK); BLOCK_K 16.
ONE_BY_ONE = ConvCase("1x1_4x2_tiles_3_steps", 1, 48, 8, 8, 20, (1, 1))          # 8 tiles x 3 = 24 units
THREE_BY_THREE = ConvCase("3x3_2x2_tiles_9_steps", 1, 16, 5, 5, 20, (3, 3), padding=(1, 1))  # pointer: 36
ONE_TILE_3X3 = ConvCase("3x3_one_tile_9_steps", 1, 16, 4, 4, 8, (3, 3), padding=(1, 1))      # pointer: 9

# (case, programs, what the remainder units % programs is)
POINTER_CASES = [
    (ONE_BY_ONE, 6, "rem0"), (ONE_BY_ONE, 23, "rem1"), (ONE_BY_ONE, 5, "remP-1"), (ONE_BY_ONE, 30, "P>units"),
    (THREE_BY_THREE, 12, "rem0"), (THREE_BY_THREE, 5, "rem1"), (ONE_TILE_3X3, 5, "remP-1"),
    (ONE_TILE_3X3, 12, "P>units"),
]
# TMA KxK: the 5x5 output is 2x2 boxes of 4x4 pixels x 2 channel tiles x 9 steps = 72 units
TMA_CASES = [
    (ONE_BY_ONE, 6, "rem0"), (ONE_BY_ONE, 23, "rem1"), (ONE_BY_ONE, 5, "remP-1"), (ONE_BY_ONE, 30, "P>units"),
    (THREE_BY_THREE, 12, "rem0"), (THREE_BY_THREE, 71, "rem1"), (THREE_BY_THREE, 73, "remP-1,P>units"),
]
ACTS = ("silu", "relu", "gelu", "hardswish", "leaky_relu", "identity", "relu6", "gelu_tanh")


def _params(cases):
    out = []
    for i, (case, programs, what) in enumerate(cases):
        dtype = (torch.float32, torch.float16)[i % 2]
        act, residual = ACTS[i % len(ACTS)], i % 3 != 1
        out.append(pytest.param(case, programs, dtype, act, residual,
                                id=f"{case.name}-p{programs}-{what}-{str(dtype)[6:]}-{act}"))
    return out


@pytest.mark.interpret
@pytest.mark.parametrize("case,programs,dtype,activation,with_residual", _params(POINTER_CASES))
def test_pointer_streamk_balanced_slices_match_float64(case, programs, dtype, activation, with_residual):
    run_case(case, dtype, "nchw" if dtype == torch.float32 else "channels_last", activation, with_residual,
             stream_k=programs)


@pytest.mark.interpret
@pytest.mark.parametrize("case,programs,dtype,activation,with_residual", _params(TMA_CASES))
def test_tma_streamk_balanced_slices_match_float64(case, programs, dtype, activation, with_residual):
    run_case(case, dtype, "channels_last", activation, with_residual, weight_fn=pack_weight, tma=True,
             stream_k=programs)


@triton.jit
def _slice_probe_kernel(out_ptr, owner_ptr, total, k_tile):
    pid = tl.program_id(0)
    base, extra, start, end, t_lo, t_hi = streamk_slice(total, k_tile, pid, tl.num_programs(0))
    tl.store(out_ptr + pid * 4 + 0, start)
    tl.store(out_ptr + pid * 4 + 1, end)
    tl.store(out_ptr + pid * 4 + 2, t_lo)
    tl.store(out_ptr + pid * 4 + 3, t_hi)
    # every unit of this slice names this program as its owner (the fix-up's contributor lookup)
    for u in range(start, end):
        tl.store(owner_ptr + u, streamk_owner(u, base, extra))


def _walk(units, programs):
    """The balanced split, walked in Python: [start, end) of each program."""
    base, extra = divmod(units, programs)
    bounds, at = [], 0
    for p in range(programs):
        length = base + (p < extra)
        bounds.append((at, at + length))
        at += length
    return bounds


@pytest.mark.interpret
@pytest.mark.parametrize("units,k,programs", [(24, 3, 6), (24, 3, 23), (24, 3, 5), (24, 3, 30), (36, 9, 5),
                                              (72, 9, 73), (72, 9, 71), (147, 3, 132), (3528, 36, 132),
                                              (7, 1, 3), (8, 8, 3)])
def test_kernel_slices_are_balanced_and_the_model_counts_them(units, k, programs):
    out = torch.full((programs, 4), -1, dtype=torch.int32)
    owner = torch.full((units,), -1, dtype=torch.int32)
    _slice_probe_kernel[(programs,)](out, owner, units, k)
    walked = _walk(units, programs)
    for p, (start, end) in enumerate(walked):
        got = tuple(out[p].tolist())
        tiles = (start // k, -(-end // k)) if end > start else (start // k, start // k)  # empty: no tiles
        assert got == (start, end, *tiles), (p, got)
    lengths = [e - s for s, e in walked]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == units
    # every unit has exactly its walked program as owner (the fix-up sums contributors by this lookup)
    assert owner.tolist() == [p for p, (s, e) in enumerate(walked) for _ in range(s, e)]
    model = schedule.streamk_slices(units, k, programs)
    busy = [(s, e) for s, e in walked if e > s]
    assert model["per_prog"] == max(lengths) and model["busy"] == len(busy)
    partial = sum(sum(1 for t in range(s // k, -(-e // k)) if not (s <= t * k and (t + 1) * k <= e))
                  for s, e in busy)
    assert model["segments"] == partial
