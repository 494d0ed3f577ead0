"""The static report's time estimate (bench/static_estimate.py) on hand-built variants: the limits of one K
step combine as a maximum, stream-K counts its slices as the kernel cuts them, and programs beyond the SM
count share SMs only as far as the compiled variant's shared memory and registers let them."""

from __future__ import annotations

import pytest

from bench.static_estimate import TARGETS, estimated_us
from fusedconv.kernels import schedule

SMS = TARGETS[90]["sms"]


def _data_parallel(block, steps, tiles, stages=4):
    return {"block": block, "steps": steps, "tiles": tiles, "num_stages": stages, "num_warps": 4,
            "schedule": {"kind": "split_k", "split": 1, "k_tile": steps, "tile_count": tiles, "nbytes": 0}}


def test_issue_slots_and_operand_feed_are_separate_limits():
    # 64x64x64: 128 tensor-core cycles per step, 208 at its operand feed (tile efficiency 0.62); 8 stages keep
    # the latency floor (800 ns / 7 in flight ~ 200 cycles) under both. An issue ratio of 1.5 (192 issue
    # cycles) hides under the operand feed; 4.0 (512) does not.
    v = _data_parallel((64, 64, 64), steps=40, tiles=SMS, stages=8)
    fed = estimated_us(v, 0.5, 90)
    assert estimated_us(v, 1.5, 90) == fed
    assert estimated_us(v, 4.0, 90) > fed * 2


def _streamk(programs, units=147, k_tile=3, block=(16, 32, 64)):
    slices = schedule.streamk_slices(units, k_tile, programs)
    return {"block": block, "steps": slices["per_prog"], "tiles": slices["busy"], "num_stages": 4,
            "num_warps": 4, "schedule": {"kind": "stream_k", "k_tile": k_tile, "tile_count": units // k_tile,
                                         "nbytes": 300_000, "programs": programs}}


def test_one_k_step_per_program_beats_slices_that_straddle_tiles():
    # MobileNetV2 features.4.conv.2 at batch 1: 49 tiles of 16x32 x 3 K steps
    small = {"shared_bytes": 24 * 1024, "registers": 72}  # several programs fit one SM
    one_step = estimated_us(_streamk(147), 2.0, 90, small)
    two_step = estimated_us(_streamk(SMS), 2.0, 90, small)
    assert one_step < two_step


def test_programs_beyond_the_sms_that_cannot_share_one_pay_a_second_round():
    v = _streamk(147)
    shared = estimated_us(v, 2.0, 90, {"shared_bytes": 24 * 1024, "registers": 72})
    alone = estimated_us(v, 2.0, 90, {"shared_bytes": 200 * 1024, "registers": 72})  # one per SM
    assert alone > shared
    assert alone == pytest.approx(2 * shared, rel=0.35)  # two rounds of one step, plus the fix-up


def test_a_variant_with_more_programs_than_units_slices_like_one_with_as_many():
    assert estimated_us(_streamk(200), 2.0, 90) == estimated_us(_streamk(147), 2.0, 90)
