"""The stream-K schedule (kernels/conv_streamk.py) and the schedule rule (kernels/schedule.py).

Interpreter tests (marked `interpret`, run in a TRITON_INTERPRET=1 child, see conftest.py) run the stream-K
kernel through the public launcher with a forced program count, so output tiles are shared by 2-3 programs
and the partial-tile fix-up path runs, against the float64 truth of nn.Conv2d -> nn.BatchNorm2d(eval) ->
activation (the helpers of test_kernel_interpret). They also check the fix-up's two promises directly: the
tile counters are back at 0 after a launch (so a reused buffer is clean), and the result does not depend on
which program arrives last (the sum runs in program order).

Unmarked tests check the stream-K configs fit the workspace slots and that bad `stream_k` arguments are
refused; the schedule rule's own tests are in test_schedule_waves.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fusedconv.kernels import configs as kconfigs
from fusedconv.kernels import schedule
from test_kernel_interpret import ConvCase, build_case, run_case

launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")

# (case, programs): K iterations per tile with the interpreter's BLOCK_K 16 are noted; programs are chosen so
# tiles straddle program boundaries (some tiles have 3 contributors).
STREAMK_CASES = [
    (ConvCase("3x3_shared_tiles", 1, 20, 5, 5, 20, (3, 3), padding=(1, 1)), 3),   # 4 tiles x 18 steps
    (ConvCase("3x3_three_per_tile", 1, 20, 5, 5, 20, (3, 3), padding=(1, 1)), 7),
    (ConvCase("1x1", 2, 40, 3, 3, 18, (1, 1)), 5),                                # 6 tiles x 3 steps
    (ConvCase("1x1_stride2", 1, 33, 7, 7, 17, (1, 1), stride=(2, 2)), 4),
    (ConvCase("3x3_stride2_groups2", 1, 34, 7, 6, 36, (3, 3), stride=(2, 2), padding=(1, 1), groups=2), 4),
    (ConvCase("3x3_dilation2", 1, 17, 9, 9, 6, (3, 3), padding=(2, 2), dilation=(2, 2)), 5),
    (ConvCase("7x7_stem_rows", 1, 3, 9, 9, 8, (7, 7), stride=(2, 2), padding=(3, 3)), 4),  # ROW_K loop
    (ConvCase("5x5_flat_k", 1, 13, 6, 6, 5, (5, 5), padding=(2, 2)), 3),                  # FLAT_K loop
    (ConvCase("more_programs_than_steps", 1, 16, 3, 3, 8, (1, 1)), 6),           # 1 tile x 1 step: 5 idle
]
ACTS = ("relu", "silu", "gelu", "leaky_relu", "hardswish", "relu6", "identity", "gelu_tanh", "relu")


def _params():
    params = []
    for i, (case, programs) in enumerate(STREAMK_CASES):
        for j, (layout, dtype) in enumerate([("channels_last", torch.float16), ("nchw", torch.float32)]):
            act, residual = ACTS[(i + j) % len(ACTS)], (i + j) % 2 == 0
            params.append(pytest.param(case, programs, layout, dtype, act, residual,
                                       id=f"{case.name}-p{programs}-{layout}-{str(dtype)[6:]}-{act}"
                                          f"-{'res' if residual else 'nores'}"))
    return params


@pytest.mark.interpret
@pytest.mark.parametrize("case,programs,layout,dtype,activation,with_residual", _params())
def test_streamk_matches_reference(case, programs, layout, dtype, activation, with_residual):
    run_case(case, dtype, layout, activation, with_residual, stream_k=programs)


@pytest.mark.interpret
def test_streamk_true_uses_the_interpreter_program_count():
    case = ConvCase("3x3", 1, 18, 4, 4, 10, (3, 3), padding=(1, 1))
    run_case(case, torch.float32, "nchw", "relu", True, stream_k=True)


def _direct_launch(case, programs, counters, order=None):
    """Launch the stream-K kernel by hand with a given counter buffer; `order`, a permutation of the program
    ids, makes the interpreter run the programs in that order (so a test chooses which one arrives last)."""
    inputs, truth = build_case(case, torch.float32, "nchw", "silu", True)
    x, w, res = inputs["x"], inputs["weight"], inputs["residual"]
    scale, shift = inputs["scale"].float().contiguous(), inputs["shift"].float().contiguous()
    key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, tuple(w.shape), tuple(w.stride()), w.dtype,
           tuple(scale.shape), tuple(shift.shape), (tuple(res.shape), tuple(res.stride()), res.dtype),
           case.stride, case.padding, case.dilation, case.groups, "silu", 0.0, None, False, False, programs)
    plan = launcher._plan(*key)
    y = torch.empty(plan["out_shape"], dtype=x.dtype)
    cfg = kconfigs.INTERPRET_CONFIG
    ws = torch.empty((2 * programs, cfg["BLOCK_M"] * cfg["BLOCK_N"]), dtype=torch.float32)
    flags = {k: v for k, v in plan["flags"].items() if k != "SPLIT_K"}
    flags["WS_TILE"] = cfg["BLOCK_M"] * cfg["BLOCK_N"]
    args = (x, w, scale, shift, res, y, ws, counters, *plan["int_args"], 0.0, case.groups)
    if order is None:
        launcher._conv_streamk_kernel[(programs,)](*args, **flags, **cfg)
        return y, truth
    interp = pytest.importorskip("triton.runtime.interpreter")
    builder = getattr(interp, "interpreter_builder", None)
    if builder is None or not hasattr(builder, "set_grid_idx"):
        pytest.skip("this triton's interpreter has no grid-index hook")
    perm = list(order)
    assert sorted(perm) == list(range(programs))
    original = builder.set_grid_idx
    builder.set_grid_idx = lambda px, py, pz: original(perm[px], py, pz)  # program px of the loop runs as perm[px]
    try:
        launcher._conv_streamk_kernel[(programs,)](*args, **flags, **cfg)
    finally:
        del builder.set_grid_idx  # back to the class method
    return y, truth


@pytest.mark.interpret
def test_streamk_counters_reset_and_reused_buffer_stays_correct():
    case = ConvCase("3x3", 1, 20, 5, 5, 20, (3, 3), padding=(1, 1))
    counters = torch.zeros(64, dtype=torch.int32)
    first, truth = _direct_launch(case, 7, counters)
    assert int(counters.abs().sum()) == 0, "the completing program must reset every tile counter"
    second, _ = _direct_launch(case, 7, counters)  # same buffer again: clean, so same (correct) result
    assert torch.equal(first, second)
    err = ((first.double() - truth).abs().max() / truth.abs().max()).item()
    assert err <= 1e-5


@pytest.mark.interpret
def test_streamk_result_does_not_depend_on_arrival_order():
    case = ConvCase("3x3", 1, 20, 5, 5, 20, (3, 3), padding=(1, 1))
    in_order, truth = _direct_launch(case, 7, torch.zeros(64, dtype=torch.int32))
    reversed_order, _ = _direct_launch(case, 7, torch.zeros(64, dtype=torch.int32), order=range(6, -1, -1))
    assert torch.allclose(in_order.double(), truth, rtol=0, atol=1e-5 * truth.abs().max().item())
    assert torch.equal(in_order, reversed_order), "partials must be summed in program order"


# ----------------------------------------------------------------------------------------- schedule rule
# The rule's unit tests (sub-wave layers, batch 1, achievable waves, memory-bound honesty) are in
# test_schedule_waves.py.


def test_streamk_configs_fit_the_workspace_slots():
    args = dict(x_ptr=torch.empty(0, dtype=torch.float16), KH=1, KW=1, IS_1X1=True, ROW_K=False, FLAT_K=False,
                ROW_WIDTH=16, M=6272, CIN_G=1024, COUT_G=256)
    kept = kconfigs.prune_streamk_configs(kconfigs.all_autotune_configs(), args)
    assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= schedule.STREAMK_MAX_TILE for c in kept)
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == schedule.STREAMK_MAX_TILE for c in kept)


@pytest.mark.parametrize("kwargs,words", [
    (dict(stream_k=0), "stream_k"), (dict(stream_k=-2), "stream_k"), (dict(stream_k=2.5), "stream_k"),
    (dict(stream_k=4, split_k=2), "split_k"),
])
def test_launcher_rejects_bad_stream_k(kwargs, words):
    x = torch.zeros(1, 4, 5, 5)
    w = torch.zeros(4, 4, 3, 3)
    with pytest.raises(ValueError, match=words):
        launcher._plan((1, 4, 5, 5), x.stride(), x.dtype, x.device, tuple(w.shape), w.stride(), w.dtype, (4,), (4,),
                       None, (1, 1), (1, 1), (1, 1), 1, "relu", 0.0, kwargs.get("split_k"), False, False,
                       kwargs["stream_k"])
