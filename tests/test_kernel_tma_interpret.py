"""The TMA-descriptor kernels under Triton's CPU interpreter vs float64 — the 1x1 GEMM over 2-D descriptors
(kernels/conv_tma.py) and the stride-1 KxK conv over a 4-D NHWC descriptor whose zero fill is the padding
(kernels/conv_tma_kxk.py) — and their eligibility rules (what falls back to the pointer kernel).

Triton's interpreter runs host-side TensorDescriptor loads on CPU tensors, zero fill past the edges included,
so the kernel's maskless loop (M, K and N tails all come from the descriptor's out-of-bounds fill) is checked
here on tails of every kind: M not a multiple of the tile, Cin and Cout below and between tile sizes. Each
interpreter case also asserts the launcher really took the TMA kernel (a spy on its launch function), so a
change of the eligibility rule cannot turn these into pointer-kernel tests unnoticed.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fusedconv.kernels import conv_tma, conv_tma_kxk, pack_weight
from test_kernel_interpret import ACTIVATION_NAMES, ConvCase, run_case

launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")

TMA_CASES = [
    ConvCase("c24_to_c40_m_tail", 2, 24, 5, 3, 40, (1, 1)),    # M = 30, K = 24 (tail of a 16-chunk), N = 40
    ConvCase("c64_to_c16", 1, 64, 7, 7, 16, (1, 1)),          # M = 49, K = 4 chunks
    ConvCase("c8_to_c8", 1, 8, 3, 3, 8, (1, 1)),              # K and N below one tile
]


@pytest.fixture
def tma_spy(monkeypatch):
    calls = []
    real = conv_tma.conv1x1_tma_launch

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_tma, "conv1x1_tma_launch", spy)
    return calls


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", TMA_CASES, ids=[c.name for c in TMA_CASES])
def test_tma_1x1_matches_float64(case, dtype, tma_spy):
    i = TMA_CASES.index(case) * 2 + (dtype == torch.float32)
    activation = ACTIVATION_NAMES[(3 * i + 1) % len(ACTIVATION_NAMES)]
    run_case(case, dtype, "channels_last", activation, with_residual=i % 2 == 0, weight_fn=pack_weight, tma=True)
    assert tma_spy, "the launcher did not take the TMA kernel"


@pytest.mark.interpret
def test_tma_off_by_default_and_ineligible_convs_fall_back(tma_spy):
    case = TMA_CASES[0]
    run_case(case, torch.float16, "channels_last", "relu", True, weight_fn=pack_weight)  # tma=None: default
    assert not tma_spy or launcher.TMA_DEFAULT
    tma_spy.clear()
    # Cin = 12 fp16: 24-byte rows are not 16-byte aligned -> the pointer kernel, same result, no fault.
    unaligned = ConvCase("c12_unaligned", 1, 12, 4, 5, 16, (1, 1))
    run_case(unaligned, torch.float16, "channels_last", "gelu", True, weight_fn=pack_weight, tma=True)
    assert not tma_spy


def _x(n, c, h, w, dtype=torch.float16, channels_last=True):
    x = torch.zeros(n, c, h, w, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("desc,x,w,groups,stride,padding,expected", [
    ("eligible", _x(2, 32, 5, 5), pack_weight(torch.zeros(16, 32, 1, 1, dtype=torch.float16)), 1, (1, 1), (0, 0),
     True),
    ("nchw input", _x(2, 32, 5, 5, channels_last=False), pack_weight(torch.zeros(16, 32, 1, 1, dtype=torch.float16)),
     1, (1, 1), (0, 0), False),
    ("unpacked weight", _x(2, 32, 5, 5), torch.zeros(16, 32, 1, 1, dtype=torch.float16), 1, (1, 1), (0, 0), False),
    ("row stride 24 bytes", _x(1, 12, 4, 4), pack_weight(torch.zeros(16, 12, 1, 1, dtype=torch.float16)), 1,
     (1, 1), (0, 0), False),
    ("cout row 24 bytes", _x(1, 16, 4, 4), pack_weight(torch.zeros(12, 16, 1, 1, dtype=torch.float16)), 1,
     (1, 1), (0, 0), False),
    ("stride 2", _x(1, 16, 4, 4), pack_weight(torch.zeros(16, 16, 1, 1, dtype=torch.float16)), 1, (2, 2), (0, 0),
     False),
    ("padded", _x(1, 16, 4, 4), pack_weight(torch.zeros(16, 16, 1, 1, dtype=torch.float16)), 1, (1, 1), (1, 1),
     False),
    ("groups 2", _x(1, 32, 4, 4), pack_weight(torch.zeros(32, 16, 1, 1, dtype=torch.float16), 2), 2, (1, 1),
     (0, 0), False),
    ("3x3", _x(1, 16, 4, 4), pack_weight(torch.zeros(16, 16, 3, 3, dtype=torch.float16)), 1, (1, 1), (0, 0),
     False),
    ("fp32 cin 4", _x(1, 4, 4, 4, torch.float32), pack_weight(torch.zeros(8, 4, 1, 1)), 1, (1, 1), (0, 0), True),
])
def test_tma_eligibility(desc, x, w, groups, stride, padding, expected):
    assert conv_tma.tma_1x1_eligible(x, w, groups, stride, padding, None) is expected, desc


def test_tma_eligibility_rejects_split_k_and_unaligned_base():
    x, w = _x(1, 32, 4, 4), pack_weight(torch.zeros(16, 32, 1, 1, dtype=torch.float16))
    assert not conv_tma.tma_1x1_eligible(x, w, 1, (1, 1), (0, 0), 2)
    big = torch.zeros(1 * 4 * 4 * 32 + 1, dtype=torch.float16)
    shifted = big[1:].view(1, 4, 4, 32).permute(0, 3, 1, 2)  # dense channels_last, base 2 bytes off alignment
    assert shifted.data_ptr() % 16 and shifted.stride() == x.stride()
    assert not conv_tma.tma_1x1_eligible(shifted, w, 1, (1, 1), (0, 0), None)


KXK_CASES = [
    ConvCase("3x3_c16_to_c24_odd", 2, 16, 5, 7, 24, (3, 3), padding=(1, 1)),
    ConvCase("5x5_c24_dil2_pad3", 1, 24, 9, 6, 8, (5, 5), padding=(3, 2), dilation=(2, 1)),  # K tail, dilation
    ConvCase("7x7_c40_pad3", 1, 40, 7, 5, 16, (7, 7), padding=(3, 3)),
    ConvCase("3x3_c8_pad0", 1, 8, 6, 6, 8, (3, 3)),
]


@pytest.fixture
def kxk_spy(monkeypatch):
    calls = []
    real = conv_tma_kxk.conv_kxk_tma_launch

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.stride()))  # the strides the descriptor is built on
        return real(x, *args, **kwargs)

    monkeypatch.setattr(conv_tma_kxk, "conv_kxk_tma_launch", spy)
    return calls


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", KXK_CASES, ids=[c.name for c in KXK_CASES])
def test_tma_kxk_matches_float64(case, dtype, kxk_spy):
    i = KXK_CASES.index(case) * 2 + (dtype == torch.float32)
    activation = ACTIVATION_NAMES[(3 * i + 2) % len(ACTIVATION_NAMES)]
    run_case(case, dtype, "channels_last", activation, with_residual=i % 2 == 1, weight_fn=pack_weight, tma=True)
    assert kxk_spy, "the launcher did not take the TMA KxK kernel"


@pytest.mark.parametrize("desc,x,w,groups,stride,expected", [
    ("eligible 3x3", _x(1, 16, 6, 6), pack_weight(torch.zeros(16, 16, 3, 3, dtype=torch.float16)), 1, (1, 1), True),
    ("stride 2", _x(1, 16, 6, 6), pack_weight(torch.zeros(16, 16, 3, 3, dtype=torch.float16)), 1, (2, 2), False),
    ("groups 2", _x(1, 32, 6, 6), pack_weight(torch.zeros(32, 16, 3, 3, dtype=torch.float16), 2), 2, (1, 1), False),
    ("cin 12: 24-byte rows", _x(1, 12, 6, 6), pack_weight(torch.zeros(16, 12, 3, 3, dtype=torch.float16)), 1,
     (1, 1), False),
    ("unpacked weight", _x(1, 16, 6, 6), torch.zeros(16, 16, 3, 3, dtype=torch.float16), 1, (1, 1), False),
    ("nchw", _x(1, 16, 6, 6, channels_last=False), pack_weight(torch.zeros(16, 16, 3, 3, dtype=torch.float16)), 1,
     (1, 1), False),
    ("1x1", _x(1, 16, 6, 6), pack_weight(torch.zeros(16, 16, 1, 1, dtype=torch.float16)), 1, (1, 1), False),
])
def test_tma_kxk_eligibility(desc, x, w, groups, stride, expected):
    assert conv_tma_kxk.tma_kxk_eligible(x, w, groups, stride, None) is expected, desc


@pytest.mark.interpret
def test_tma_kxk_ineligible_falls_back(kxk_spy):
    """A stride-2 3x3 with tma=True runs the pointer kernel (no descriptor is built) and is still right."""
    case = ConvCase("3x3_s2", 1, 16, 7, 7, 16, (3, 3), stride=(2, 2), padding=(1, 1))
    run_case(case, torch.float16, "channels_last", "relu", True, weight_fn=pack_weight, tma=True)
    assert not kxk_spy


def test_variant_choice_times_each_candidate_once_and_keeps_the_fastest(monkeypatch):
    """kernels.variant_choice: the first call per launch signature runs every candidate (its autotuning), times
    them and caches the fastest; later calls reuse the choice; without a way to time (CPU, tracing, graph
    capture) the first candidate (the pointer kernel) runs and nothing is cached."""
    from fusedconv.kernels import variant_choice

    calls = []
    cands = {"pointer": lambda: calls.append("pointer"), "tma": lambda: calls.append("tma")}
    fake_ms = {"pointer": 2.0, "tma": 1.0}
    monkeypatch.setattr(variant_choice, "device_time_ms", lambda fn, device: (fn(), fake_ms[calls[-1]])[1])
    monkeypatch.setattr(variant_choice, "_choices", {})
    cpu = torch.device("cpu")
    assert variant_choice.choose("k", cands, cpu) == "pointer" and not calls  # cannot time on a CPU
    monkeypatch.setattr(variant_choice, "can_time", lambda device: True)
    assert variant_choice.choose("k", cands, cpu) == "tma"
    assert calls.count("pointer") == 2 and calls.count("tma") == 2  # one warm-up + one timed run each
    calls.clear()
    assert variant_choice.choose("k", cands, cpu) == "tma" and not calls  # cached
    fake_ms["tma"] = 3.0
    assert variant_choice.choose("other", cands, cpu) == "pointer"
    assert variant_choice.chosen() == {"k": "tma", "other": "pointer"}


@pytest.mark.interpret
@pytest.mark.parametrize("case", [ConvCase("s2_odd", 2, 16, 7, 9, 24, (1, 1), stride=(2, 2)),
                                  ConvCase("s2x3_c40", 1, 40, 6, 7, 8, (1, 1), stride=(2, 3))],
                         ids=["stride2_odd_sizes", "stride2x3_c40"])
def test_tma_strided_1x1_through_a_strided_view(case, kxk_spy):
    """Stride-2 (and 2x3) 1x1 convs run the 4-D descriptor kernel on x[:, :, ::sh, ::sw] — a view, no copy:
    the descriptor's strides are the strided ones."""
    out = run_case(case, torch.float16, "channels_last", "silu", True, weight_fn=pack_weight, tma=True)
    assert kxk_spy, "the launcher did not take the TMA kernel"
    h, w, c = case.h, case.w, case.cin
    assert kxk_spy[0] == (h * w * c, 1, case.stride[0] * w * c, case.stride[1] * c)
    assert out.shape[2:] == ((h - 1) // case.stride[0] + 1, (w - 1) // case.stride[1] + 1)


def test_strided_1x1_view_eligibility():
    w = pack_weight(torch.zeros(16, 32, 1, 1, dtype=torch.float16))
    x = _x(1, 32, 6, 6)
    assert conv_tma_kxk.strided_1x1_view(x, w, 1, (2, 2), (0, 0), 1) is not None
    assert conv_tma_kxk.strided_1x1_view(x, w, 1, (1, 1), (0, 0), 1) is None      # stride 1: the 2-D GEMM kernel
    assert conv_tma_kxk.strided_1x1_view(x, w, 1, (2, 2), (1, 1), 1) is None      # padded
    assert conv_tma_kxk.strided_1x1_view(x, w, 1, (2, 2), (0, 0), 2) is None      # split-K
    assert conv_tma_kxk.strided_1x1_view(_x(1, 32, 6, 6, channels_last=False), w, 1, (2, 2), (0, 0), 1) is None
    w12 = pack_weight(torch.zeros(16, 12, 1, 1, dtype=torch.float16))
    assert conv_tma_kxk.strided_1x1_view(_x(1, 12, 6, 6), w12, 1, (2, 2), (0, 0), 1) is None  # 24-byte rows
