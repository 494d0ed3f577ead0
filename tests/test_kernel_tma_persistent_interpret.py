"""The persistent configs of the TMA 1x1 kernel (kernels/conv_tma.py: PERSISTENT, a grid of PROGRAMS_PER_SM
programs per SM walking the output tiles in one flattened, software-pipelined loop) under Triton's CPU
interpreter vs float64, and the rules around them (configs, pruning, grid). That PROGRAMS_PER_SM programs of
each config fit one SM's shared memory is checked on the compiled sm_90 kernels (tests/test_kernel_compile.py).

The variant is forced, not left to the autotuner: a spy on the launch function adds PERSISTENT to the
interpreter's config and records the grid. Under the interpreter a persistent launch has
`INTERPRET_PERSISTENT_PROGRAMS` (3) programs, so on these shapes every program walks several tiles, the last
ones an uneven share; the output starts as NaN, so a tile no program wrote fails the check. Unmarked tests run
in-process.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from fusedconv.kernels import backend_log, conv_bn_act, conv_tma, pack_weight
from fusedconv.kernels import configs as kconfigs
from fusedconv.kernels.epilogue import activation_id
from test_kernel_interpret import TOLERANCE, ConvCase, build_case
from test_kernel_tma_epilogue_interpret import _prune_args
from util import max_rel_error

#: 1x1 problems against the 16 x 16 x 16 interpreter tile: 7 x 2 tiles (M = 98, Cout = 24, one K step), and
#: 5 x 3 tiles over two K steps (M = 72, Cout = 40, Cin = 32) — both more tiles than the 3 programs.
CASES = [ConvCase("m98_cout24", 2, 16, 7, 7, 24, (1, 1)), ConvCase("m72_cout40_k32", 2, 32, 6, 6, 40, (1, 1))]


@pytest.fixture
def persistent(monkeypatch):
    """Force PERSISTENT on every launch through conv_tma.conv1x1_tma_launch; record the grids launched."""
    seen = SimpleNamespace(launches=0, grids=[])
    real_launch, real_programs = conv_tma.conv1x1_tma_launch, conv_tma.programs

    def launch(*args, interpret_cfg=None, **kwargs):
        seen.launches += 1
        return real_launch(*args, interpret_cfg={**interpret_cfg, "PERSISTENT": True, "PROGRAMS_PER_SM": 1},
                           **kwargs)

    def programs(tiles, meta, device):
        seen.grids.append((tiles, real_programs(tiles, meta, device)))
        return seen.grids[-1][1]

    monkeypatch.setattr(conv_tma, "conv1x1_tma_launch", launch)
    monkeypatch.setattr(conv_tma, "programs", programs)
    return seen


def _tiles(case) -> int:
    m = case.n * case.h * case.w
    return -(-m // 16) * -(-case.cout // 16)


@pytest.mark.interpret
@pytest.mark.parametrize("residual", [None, "channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_persistent_launch_matches_float64(case, dtype, residual, persistent):
    """Every tile written once right by 3 programs (bulk-store epilogue; the residual through its descriptor or
    its strides), against the float64 Conv2d -> BatchNorm2d(eval) (+ residual) -> activation."""
    i = CASES.index(case) * 6 + (dtype == torch.float32) * 3 + (None, "channels_last", "nchw").index(residual)
    activation = ("relu", "silu", "gelu", "hardswish", "leaky_relu", "gelu_tanh", "relu6", "identity")[i % 8]
    inputs, truth = build_case(case, dtype, "channels_last", activation, residual is not None)
    res = inputs["residual"]
    if residual == "nchw":
        res = res.contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow in the interpreter's exp (sigmoid)
        out = conv_bn_act(inputs["x"], pack_weight(inputs["weight"]), inputs["scale"], inputs["shift"],
                          activation=activation, act_param=inputs["act_param"], residual=res, tma=True)
    assert persistent.launches == 1, "the launcher did not take the TMA 1x1 kernel"
    assert persistent.grids == [(_tiles(case), conv_tma.INTERPRET_PERSISTENT_PROGRAMS)]
    err = max_rel_error(out, truth)
    assert err <= TOLERANCE[dtype], f"{case.name} {dtype} {activation} residual={residual}: {err:.3g}"


@pytest.mark.interpret
@pytest.mark.parametrize("forced", [True, False], ids=["persistent", "one-tile"])
def test_backend_log_tells_persistent_configs_apart(forced, request):
    """A launch that ran a persistent config is recorded as "triton tma persistent" (reports then show how many
    layers took one); the one-tile configs stay "triton tma"."""
    if forced:
        request.getfixturevalue("persistent")
    inputs, _ = build_case(CASES[0], torch.float16, "channels_last", "relu", False)
    with backend_log.recording() as log:
        conv_bn_act(inputs["x"], pack_weight(inputs["weight"]), inputs["scale"], inputs["shift"], tma=True)
    assert log == (["triton tma persistent"] if forced else ["triton tma"])


@pytest.mark.interpret
def test_persistent_launch_without_output_descriptor(persistent):
    """An NCHW output (no store descriptor) and a NaN-filled start: the persistent programs' pointer epilogue
    writes every tile."""
    case = CASES[1]
    inputs, truth = build_case(case, torch.float16, "channels_last", "gelu", True)
    x, w = inputs["x"], pack_weight(inputs["weight"])
    y = torch.full(truth.shape, float("nan"), dtype=torch.float16)  # NCHW
    res = inputs["residual"]
    conv_tma.conv1x1_tma_launch(x, w, inputs["scale"].float(), inputs["shift"].float(), res, y,
                                activation_id("gelu"), 0.0, False, res.stride(), None,
                                interpret_cfg=dict(kconfigs.INTERPRET_CONFIG))
    assert persistent.grids == [(_tiles(case), conv_tma.INTERPRET_PERSISTENT_PROGRAMS)]
    assert bool(torch.isfinite(y).all())
    assert max_rel_error(y, truth) <= TOLERANCE[torch.float16]


def test_persistent_configs_are_16bit_only_and_in_the_autotuner():
    configs16, configs32 = conv_tma.persistent_configs(2), conv_tma.persistent_configs(4)
    assert configs16 and configs32 == []
    assert all(c.kwargs["PERSISTENT"] and c.kwargs["TMA_EPILOGUE"] for c in configs16)
    keys = [tuple(sorted(c.kwargs.items())) + (c.num_warps, c.num_stages) for c in conv_tma.all_configs()]
    assert len(keys) == len(set(keys))
    assert len(conv_tma.all_configs()) == len(conv_tma.dp_configs(2) + conv_tma.dp_configs(4)) + len(configs16)


def test_prune_keeps_persistent_configs_without_an_output_descriptor():
    """The TMA-store twins need an output descriptor; the persistent configs do not (pointer stores then)."""
    kept = conv_tma._prune_tma(conv_tma.all_configs(), _prune_args(None, m=100352, cin=64, cout=64))
    persistent = [c for c in kept if c.kwargs.get("PERSISTENT")]
    assert len(persistent) == len(conv_tma.persistent_configs(2))
    assert not any(c.kwargs.get("TMA_EPILOGUE") and not c.kwargs.get("PERSISTENT") for c in kept)
    fp32 = conv_tma._prune_tma(conv_tma.all_configs(), _prune_args(None, dtype=torch.float32))
    assert fp32 and not any(c.kwargs.get("PERSISTENT") for c in fp32)


def test_prune_caps_persistent_tiles_to_the_problem():
    """Cout = 32: the 64- and 128-wide persistent tiles are capped to 32, deduplicated, still persistent."""
    kept = [c for c in conv_tma._prune_tma(conv_tma.all_configs(), _prune_args(object(), m=100352, cin=64, cout=32))
            if c.kwargs.get("PERSISTENT")]
    assert kept and all(c.kwargs["BLOCK_N"] == 32 for c in kept)
    sigs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps, c.kwargs["PROGRAMS_PER_SM"])
            for c in kept]
    assert len(sigs) == len(set(sigs))


def test_persistent_grid_is_capped_by_the_sm_count(monkeypatch):
    """On a GPU: one program per tile, or min(tiles, SMs x PROGRAMS_PER_SM) for a persistent config."""
    monkeypatch.setattr(conv_tma, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert conv_tma.programs(784, {"BLOCK_M": 128}, cuda) == 784
    assert conv_tma.programs(784, {"PERSISTENT": True, "PROGRAMS_PER_SM": 2}, cuda) == 264
    assert conv_tma.programs(100, {"PERSISTENT": True, "PROGRAMS_PER_SM": 2}, cuda) == 100
    assert conv_tma.programs(784, {"PERSISTENT": True, "PROGRAMS_PER_SM": 1}, torch.device("cpu")) == \
        conv_tma.INTERPRET_PERSISTENT_PROGRAMS
