"""The schedules the full-wave rule picks, run under TRITON_INTERPRET=1 against the float64 reference.

Under the interpreter the launcher never chooses a schedule by itself (there are no SMs to count), so each case
asks the rule (`schedule.choose_schedule`, with a small SM count and the interpreter's BLOCK_K 16) what it
picks for a tiny shape, checks that it is the path the case is about, and runs the public launcher with that
schedule forced, against nn.Conv2d -> nn.BatchNorm2d(eval) -> (+ residual) -> activation in float64:

- stream-K on a 3x3 conv and on a short-K 1x1 (2 K steps per tile: every tile shared by two programs);
- stream-K where the layer has fewer work units than programs (achievable waves < 1: idle programs);
- split-K on a 1x1 with 2-step slices (the rule's minimum slice).
"""

from __future__ import annotations

import pytest
import torch

from fusedconv.kernels import configs as kconfigs
from fusedconv.kernels import schedule
from test_kernel_interpret import ConvCase, run_case

BLOCK_K = kconfigs.INTERPRET_CONFIG["BLOCK_K"]

# (case, SM count, expected (kind, value), achievable waves below 1?)
CASES = [
    (ConvCase("3x3_stream_k", 1, 16, 3, 3, 8, (3, 3), padding=(1, 1)), 2, ("stream_k", 2), False),
    (ConvCase("1x1_short_k_stream_k", 1, 32, 3, 3, 8, (1, 1)), 2, ("stream_k", 2), False),
    (ConvCase("1x1_fewer_units_than_programs", 1, 32, 3, 3, 8, (1, 1)), 4, ("stream_k", 4), True),
    (ConvCase("1x1_split_k_two_step_slices", 1, 256, 5, 5, 40, (1, 1)), 132, ("split_k", 8), True),
]


def _rule(case: ConvCase, sms: int):
    kh, kw = case.kernel
    oh = (case.h + 2 * case.padding[0] - kh) // case.stride[0] + 1
    ow = (case.w + 2 * case.padding[1] - kw) // case.stride[1] + 1
    m, k_iters = case.n * oh * ow, kh * kw * -(-case.cin // BLOCK_K)
    nbytes = schedule.layer_bytes(m, case.cout, 1, k_iters, BLOCK_K, input_k=case.cin)
    choice = schedule.choose_schedule(m, case.cout, 1, k_iters, sms, nbytes=nbytes)
    return choice, schedule.achievable_waves(m, case.cout, 1, k_iters, sms)


def _params():
    out = []
    for i, (case, sms, expected, small) in enumerate(CASES):
        for j, (activation, residual, dtype, layout) in enumerate(
                [("relu", True, torch.float32, "nchw"), ("silu", False, torch.float16, "channels_last")]):
            out.append(pytest.param(case, sms, expected, small, activation, residual, dtype, layout,
                                    id=f"{case.name}-sm{sms}-{activation}-{'res' if residual else 'nores'}"))
    return out


@pytest.mark.parametrize("case,sms,expected,small", [p.values[:4] for p in _params()[::2]],
                         ids=[c[0].name for c in CASES])
def test_the_rule_picks_the_path_of_the_case(case, sms, expected, small):
    choice, achievable = _rule(case, sms)
    assert choice == expected
    assert (achievable < 1.0) == small


@pytest.mark.interpret
@pytest.mark.parametrize("case,sms,expected,small,activation,residual,dtype,layout", _params())
def test_the_picked_schedule_matches_the_reference(case, sms, expected, small, activation, residual, dtype,
                                                    layout):
    (kind, value), _ = _rule(case, sms)
    assert (kind, value) == expected
    launch = {"stream_k": value} if kind == "stream_k" else {"split_k": value, "stream_k": False}
    run_case(case, dtype, layout, activation, residual, **launch)
