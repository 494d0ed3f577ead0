"""The schedules the full-wave rule picks, run under TRITON_INTERPRET=1 against the float64 reference.

Under the interpreter the launcher never chooses a schedule by itself (there are no SMs to count), so each case
asks the rule (`schedule.choose_schedule`, with a small SM count and the interpreter's BLOCK_K 16) what it
picks for a tiny shape, checks that it is the path the case is about, and runs the public launcher with that
schedule forced, against nn.Conv2d -> nn.BatchNorm2d(eval) -> (+ residual) -> activation in float64:

- stream-K on a 3x3 conv with more programs than SMs (3 programs of 3 K steps on 2 SMs) and on a short-K 1x1
  (2 K steps per tile: every tile shared by two programs);
- stream-K with one K step per program (a 3-step 1x1 on 2 SMs runs 3 programs: the batch-1 MobileNetV2
  features.4.conv.2 pattern in miniature, where every tile is finished by the fix-up of three partials);
- stream-K where the layer has fewer work units than programs (achievable waves < 1: idle programs);
- split-K on a long-K 3x3 with 2-step slices (the rule's minimum slice; the one stream-K completer would read
  back 35 partials of the layer's only tile).

The kernel's one-step slicing is also run directly, over several tiles and with more programs than units.
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
    (ConvCase("3x3_stream_k_more_programs_than_sms", 1, 16, 3, 3, 8, (3, 3), padding=(1, 1)), 2, ("stream_k", 3),
     False),
    (ConvCase("1x1_short_k_stream_k", 1, 32, 3, 3, 8, (1, 1)), 2, ("stream_k", 2), False),
    (ConvCase("1x1_one_k_step_per_program", 1, 48, 4, 4, 16, (1, 1)), 2, ("stream_k", 3), False),
    (ConvCase("1x1_fewer_units_than_programs", 1, 32, 3, 3, 8, (1, 1)), 4, ("stream_k", 4), True),
    (ConvCase("3x3_split_k_two_step_slices", 1, 64, 3, 3, 40, (3, 3), padding=(1, 1)), 132, ("split_k", 16),
     True),
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


# (case, programs): one K step of 16 channels per program over several 16x16 interpreter tiles, and more
# programs than work units (the last ones get an empty slice and must leave every output alone).
ONE_STEP_CASES = [
    (ConvCase("1x1_six_tiles_one_step_each", 1, 48, 6, 6, 24, (1, 1)), 18),   # 3 x 2 tiles x 3 steps
    (ConvCase("1x1_more_programs_than_units", 1, 48, 6, 6, 24, (1, 1)), 23),
    (ConvCase("3x3_one_tap_per_program", 1, 16, 4, 4, 8, (3, 3), padding=(1, 1)), 9),  # 1 tile x 9 taps
]


@pytest.mark.interpret
@pytest.mark.parametrize("case,programs", ONE_STEP_CASES, ids=[c[0].name for c in ONE_STEP_CASES])
@pytest.mark.parametrize("dtype,layout,activation,residual", [(torch.float32, "nchw", "silu", True),
                                                              (torch.float16, "channels_last", "relu6", False)],
                         ids=["fp32-nchw-silu-res", "fp16-cl-relu6"])
def test_one_k_step_per_program_matches_the_reference(case, programs, dtype, layout, activation, residual):
    kh, kw = case.kernel
    units = (-(-case.h * case.w // 16)) * -(-case.cout // 16) * kh * kw * -(-case.cin // BLOCK_K)
    assert -(-units // programs) == 1, "each program must get at most one K step"
    run_case(case, dtype, layout, activation, residual, stream_k=programs)
