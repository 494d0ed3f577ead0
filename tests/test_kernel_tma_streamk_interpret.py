"""The stream-K TMA kernels (kernels/conv_tma_streamk.py) under Triton's CPU interpreter vs float64.

Each case runs the public launcher with `tma=True` and a forced program count, so the launcher takes the TMA
stream-K kernel (a spy asserts it did) and output tiles are shared by several programs: the partial-tile
fix-up of `conv_streamk.streamk_fixup` runs with TMA descriptor loads started mid-tile (mid-tap for 3x3).
Program counts are chosen so slices do not align with tiles (tile counts are not multiples of the program
count), one case gives every program a single K step (nine contributors per tile), and short-K cases have
more programs than K iterations (idle programs). The truth is nn.Conv2d -> nn.BatchNorm2d(eval) -> (+residual)
-> activation in float64 (test_kernel_interpret's helpers). Counters: the completing program resets them, so
the same buffer serves a second launch with the same (correct) result.

Unmarked tests check the launcher's choice of TMA kernel per schedule (stream-K: the stream-K form; split-K:
none, the pointer kernel runs) and that the stream-K configs fit the workspace slots; `gpu` tests run the
autotuned kernels on every SM of a Hopper GPU (skipped without one).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fusedconv.kernels import conv_streamk, conv_tma_streamk, pack_weight
from fusedconv.kernels.schedule import STREAMK_MAX_TILE
from test_kernel_interpret import ConvCase, run_case

launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")

# (case, programs). K steps per tile use the interpreter's BLOCK_K 16 (1x1: 16x16 tiles; KxK and strided 1x1:
# 4x4-pixel boxes x 16 channels).
CASES = [
    (ConvCase("1x1_m_tail", 2, 40, 3, 5, 24, (1, 1)), 7),              # 4 tiles x 3 steps, 6 busy, 1 idle
    (ConvCase("1x1_stride2_view", 1, 48, 7, 7, 40, (1, 1), stride=(2, 2)), 5),  # 3 tiles x 3 steps
    (ConvCase("3x3_pad1", 1, 24, 5, 6, 24, (3, 3), padding=(1, 1)), 5),  # 8 tiles x 18 steps (2 chunks/tap)
    (ConvCase("3x3_dil2_odd", 1, 16, 7, 5, 8, (3, 3), padding=(2, 2), dilation=(2, 2)), 7),  # 4 tiles x 9
    (ConvCase("3x3_one_step_each", 1, 16, 7, 5, 8, (3, 3), padding=(2, 2), dilation=(2, 2)), 40),  # 36 steps
    (ConvCase("1x1_short_k", 1, 16, 3, 3, 8, (1, 1)), 6),              # 1 tile x 1 step: 5 idle programs
    (ConvCase("3x3_short_k_cin8", 1, 8, 3, 3, 8, (3, 3), padding=(1, 1)), 12),  # 1 tile x 9 steps: 3 idle
]
ACTS = ("relu", "silu", "gelu", "leaky_relu", "hardswish", "identity", "gelu_tanh")


def _params():
    params = []
    for i, (case, programs) in enumerate(CASES):
        for j, dtype in enumerate((torch.float16, torch.float32)):
            act, residual = ACTS[(2 * i + j) % len(ACTS)], (i + j) % 2 == 0
            params.append(pytest.param(case, programs, dtype, act, residual,
                                       id=f"{case.name}-p{programs}-{str(dtype)[6:]}-{act}"
                                          f"-{'res' if residual else 'nores'}"))
    return params


@pytest.fixture
def spy(monkeypatch):
    calls = []
    for name in ("conv1x1_tma_streamk_launch", "conv_kxk_tma_streamk_launch"):
        real = getattr(conv_tma_streamk, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(conv_tma_streamk, name, wrapped)
    return calls


@pytest.mark.interpret
@pytest.mark.parametrize("case,programs,dtype,activation,with_residual", _params())
def test_tma_streamk_matches_float64(case, programs, dtype, activation, with_residual, spy):
    run_case(case, dtype, "channels_last", activation, with_residual, weight_fn=pack_weight, tma=True,
             stream_k=programs)
    wanted = "conv1x1_tma_streamk_launch" if case.kernel == (1, 1) and case.stride == (1, 1) \
        else "conv_kxk_tma_streamk_launch"
    assert spy == [wanted], f"the launcher ran {spy}, not the TMA stream-K kernel"


@pytest.mark.interpret
@pytest.mark.parametrize("case,programs", [CASES[0], CASES[2]], ids=["1x1", "3x3"])
def test_tma_streamk_counters_reset_so_a_reused_buffer_stays_correct(case, programs, spy, monkeypatch):
    counters = torch.zeros(256, dtype=torch.int32)
    handed = []

    def shared(device, numel):
        assert numel <= counters.numel()
        handed.append(numel)
        return counters

    monkeypatch.setattr(conv_streamk, "tile_counters", shared)
    first = run_case(case, torch.float16, "channels_last", "silu", True, weight_fn=pack_weight, tma=True,
                     stream_k=programs)
    assert int(counters.abs().sum()) == 0, "the completing program must reset every tile counter"
    second = run_case(case, torch.float16, "channels_last", "silu", True, weight_fn=pack_weight, tma=True,
                      stream_k=programs)
    assert int(counters.abs().sum()) == 0
    assert len(handed) == 2 and len(spy) == 2
    assert torch.equal(first, second)


@pytest.mark.interpret
@pytest.mark.parametrize("case,programs", [CASES[1], CASES[2]], ids=["1x1_stride2_view", "3x3"])
def test_tma_streamk_result_does_not_depend_on_arrival_order(case, programs, spy):
    """The interpreter runs programs in the order a hook gives: reversed, a different program completes each
    shared tile, and the partials must still be summed in program order (bit-identical output)."""
    interp = pytest.importorskip("triton.runtime.interpreter")
    builder = getattr(interp, "interpreter_builder", None)
    if builder is None or not hasattr(builder, "set_grid_idx"):
        pytest.skip("this triton's interpreter has no grid-index hook")
    in_order = run_case(case, torch.float32, "channels_last", "gelu", True, weight_fn=pack_weight, tma=True,
                        stream_k=programs)
    original = builder.set_grid_idx
    builder.set_grid_idx = lambda px, py, pz: original(programs - 1 - px, py, pz)
    try:
        reversed_order = run_case(case, torch.float32, "channels_last", "gelu", True, weight_fn=pack_weight,
                                  tma=True, stream_k=programs)
    finally:
        del builder.set_grid_idx  # back to the class method
    assert len(spy) == 2
    assert torch.equal(in_order, reversed_order), "partials must be summed in program order"


@pytest.mark.interpret
def test_unaligned_channels_fall_back_to_the_pointer_streamk_kernel(spy):
    # Cin = 12 fp16: 24-byte rows cannot be a TMA descriptor -> the pointer stream-K kernel, same result.
    case = ConvCase("c12_unaligned", 1, 12, 4, 5, 16, (3, 3), padding=(1, 1))
    run_case(case, torch.float16, "channels_last", "relu", True, weight_fn=pack_weight, tma=True, stream_k=3)
    assert not spy


# ------------------------------------------------------------------------------------------ no interpreter
def _plan_and_tensors(split_k=None, stream_k=None):
    x = torch.zeros(1, 32, 5, 5, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = pack_weight(torch.zeros(16, 32, 1, 1, dtype=torch.float16))
    plan = launcher._plan(tuple(x.shape), x.stride(), x.dtype, x.device, tuple(w.shape), w.stride(), w.dtype,
                          (16,), (16,), None, (1, 1), (0, 0), (1, 1), 1, "relu", 0.0, split_k, False, True,
                          stream_k)
    return plan, x, w


@pytest.mark.parametrize("split_k,stream_k,expected", [
    (None, 4, "launch_1x1_streamk"),   # stream-K layer: the TMA candidate runs the same schedule
    (2, None, None),                   # split-K layer: no TMA candidate, the pointer split runs
    (1, None, "launch_1x1"),           # data-parallel layer: the data-parallel TMA kernel
])
def test_tma_candidate_follows_the_layer_schedule(split_k, stream_k, expected):
    plan, x, w = _plan_and_tensors(split_k, stream_k)
    y = torch.empty(plan["out_shape"], dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    scale = shift = torch.zeros(16)
    launch = launcher._tma_candidate(plan, x, w, scale, shift, None, y, 1, (1, 1), (0, 0), (1, 1), 0.0, False)
    assert (launch.__name__ if launch else None) == expected


def test_streamk_tma_configs_fit_the_workspace_slots():
    for esize in (2, 4):
        kept_1x1 = conv_tma_streamk.configs_1x1(esize)
        kept_kxk = conv_tma_streamk.configs_kxk(esize)
        assert kept_1x1 and kept_kxk
        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= STREAMK_MAX_TILE for c in kept_1x1)
        assert all(c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"] * c.kwargs["BLOCK_N"] <= STREAMK_MAX_TILE
                   for c in kept_kxk)
    # the 128x256 1x1 tile of the data-parallel kernel would overrun a slot: not a stream-K candidate
    assert not any(c.kwargs["BLOCK_N"] == 256 for c in conv_tma_streamk.configs_1x1(2))


def test_16bit_kxk_streamk_offers_no_tile_wider_than_64_channels():
    """The 16-bit BLOCK_N=128 KxK stream-K tiles computed wrong results on an H200 (conv_tma_streamk
    MAX_BLOCK_N_16BIT_KXK): not offered; fp32's 128-wide tiles and the data-parallel kernel's stay."""
    from fusedconv.kernels import conv_tma_kxk

    widths_16 = {c.kwargs["BLOCK_N"] for c in conv_tma_streamk.configs_kxk(2)}
    assert widths_16 and max(widths_16) <= conv_tma_streamk.MAX_BLOCK_N_16BIT_KXK == 64
    assert 128 in {c.kwargs["BLOCK_N"] for c in conv_tma_streamk.configs_kxk(4)}
    assert 128 in {c.kwargs["BLOCK_N"] for c in conv_tma_kxk.kxk_configs(2)}
    # what the autotuner would run on a 16-bit launch: the same pruning the kernel's autotuner applies
    base = torch.empty(0, dtype=torch.float16)
    kept = conv_tma_streamk._prune_kxk(conv_tma_streamk.configs_kxk(2) + conv_tma_streamk.configs_kxk(4),
                                       {"x_desc": type("D", (), {"base": base})(), "CIN": 256, "COUT": 256,
                                        "HAS_RESIDUAL": False})
    assert kept and all(c.kwargs["BLOCK_N"] <= 64 for c in kept)


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tma_kxk_streamk_with_two_programs_per_sm_matches_float64(dtype, spy):
    """The layer and program counts where the 16-bit 128-wide tiles failed on an H200 (ResNet-50 layer3 3x3,
    batch 32, two programs per SM and one short of that), three launches each: every launch within tolerance."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    case = ConvCase("3x3_256_b32", 32, 256, 14, 14, 256, (3, 3), padding=(1, 1))
    for programs in (2 * sms, 2 * sms - 12):
        for _ in range(3):
            run_case(case, dtype, "channels_last", "relu", False, device="cuda", weight_fn=pack_weight, tma=True,
                     stream_k=programs)
    assert set(spy) == {"conv_kxk_tma_streamk_launch"}


@pytest.mark.gpu
@pytest.mark.parametrize("case", [ConvCase("1x1_256_to_64", 4, 256, 14, 14, 64, (1, 1)),
                                  ConvCase("1x1_512_to_128_stride2", 2, 512, 14, 14, 128, (1, 1), stride=(2, 2)),
                                  ConvCase("3x3_64_odd", 3, 64, 13, 11, 64, (3, 3), padding=(1, 1))],
                         ids=lambda c: c.name)
def test_tma_streamk_on_hopper(case, spy):
    """Every SM's program (stream_k=True) through the autotuned TMA stream-K kernels, against float64."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    run_case(case, torch.float16, "channels_last", "relu", True, device="cuda", weight_fn=pack_weight, tma=True,
             stream_k=True)
    assert spy, "the TMA stream-K kernel was not used"
