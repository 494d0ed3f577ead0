"""The TMA-store epilogue of the TMA kernels (TMA_EPILOGUE: kernels/conv_tma.py's 1x1 GEMM over a 2-D [M, Cout]
output descriptor, kernels/conv_tma_kxk.py's stride-1 KxK / strided 1x1 over a 4-D [N, OH, OW, Cout] one)
under Triton's CPU interpreter vs float64, and the rules that decide when it may run.

The variant is forced, not left to the autotuner: a spy on the kernel's launch function adds TMA_EPILOGUE to
the interpreter's config, and spies on the descriptor builder (`_store_desc`) and on the pointer-store
epilogue (`epilogue_1x1` / `epilogue_kxk`) show which path each launch took — the output written by the
bulk-tensor store (the descriptor clips the M / OH / OW and Cout tails of the interpreter tile), the residual
loaded through its own descriptor when it is dense channels_last and through its strides otherwise, and the
whole pointer epilogue when the output has no descriptor (an NCHW output) — so a change of the eligibility
rule cannot turn these into pointer-epilogue tests unnoticed. Unmarked tests (eligibility, configs, pruning)
run in-process.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from fusedconv.kernels import conv_bn_act, conv_tma, conv_tma_kxk, pack_weight
from fusedconv.kernels import configs as kconfigs
from fusedconv.kernels.epilogue import activation_id
from test_kernel_interpret import TOLERANCE, ConvCase, build_case
from util import max_rel_error

#: Tiny 1x1 problems with tails against the 16 x 16 interpreter tile: M = 21 rows and Cout = 24 (one full and
#: one partial tile each); M = 18, Cout = 40 over two K chunks of 16.
CASES = [ConvCase("m21_cout24", 1, 16, 3, 7, 24, (1, 1)), ConvCase("m18_cout40_k32", 2, 32, 3, 3, 40, (1, 1))]


def _force(monkeypatch, module, launch_name, epilogue_name):
    """Force TMA_EPILOGUE on every launch through `module.launch_name`; record the tensors given descriptors and
    the pointer-epilogue calls (one per program)."""
    seen = SimpleNamespace(launches=0, descs=[], pointer_epilogue=0)
    real_launch, real_desc = getattr(module, launch_name), module._store_desc
    real_epi = getattr(module, epilogue_name)

    def launch(*args, interpret_cfg=None, **kwargs):
        seen.launches += 1
        return real_launch(*args, interpret_cfg={**interpret_cfg, "TMA_EPILOGUE": True}, **kwargs)

    def store_desc(t, block):
        seen.descs.append(t)
        return real_desc(t, block)

    def pointer_epilogue(*args, **kwargs):
        seen.pointer_epilogue += 1
        return real_epi(*args, **kwargs)

    monkeypatch.setattr(module, launch_name, launch)
    monkeypatch.setattr(module, "_store_desc", store_desc)
    monkeypatch.setattr(module, epilogue_name, pointer_epilogue)
    return seen


@pytest.fixture
def forced(monkeypatch):
    return _force(monkeypatch, conv_tma, "conv1x1_tma_launch", "epilogue_1x1")


@pytest.fixture
def forced_kxk(monkeypatch):
    return _force(monkeypatch, conv_tma_kxk, "conv_kxk_tma_launch", "epilogue_kxk")


def _run(case, dtype, activation, residual_layout):
    """The launcher (tma=True) on `case` with a residual in `residual_layout` (None, "channels_last", "nchw");
    the output checked against the float64 module truth."""
    inputs, truth = build_case(case, dtype, "channels_last", activation, residual_layout is not None)
    res = inputs["residual"]
    if residual_layout == "nchw":
        res = res.contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow in the interpreter's exp (sigmoid)
        out = conv_bn_act(inputs["x"], pack_weight(inputs["weight"]), inputs["scale"], inputs["shift"],
                          stride=case.stride, padding=case.padding, dilation=case.dilation, activation=activation,
                          act_param=inputs["act_param"], residual=res, tma=True)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    err = max_rel_error(out, truth)
    assert err <= TOLERANCE[dtype], f"{case.name} {dtype} {activation} residual={residual_layout}: {err:.3g}"
    return out, res


@pytest.mark.interpret
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tma_store_epilogue_matches_float64(case, dtype, residual, forced):
    i = CASES.index(case) * 4 + (dtype == torch.float32) * 2 + residual
    activation = ("relu", "silu", "gelu", "hardswish", "leaky_relu", "gelu_tanh", "relu6", "identity")[i]
    out, res = _run(case, dtype, activation, "channels_last" if residual else None)
    assert forced.launches == 1, "the launcher did not take the TMA kernel"
    assert forced.pointer_epilogue == 0, "the pointer-store epilogue ran instead of the TMA store"
    assert [t.data_ptr() for t in forced.descs] == [out.data_ptr()] + ([res.data_ptr()] if residual else [])


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_nchw_residual_is_loaded_by_its_strides(dtype, forced):
    """A residual that is not dense channels_last gets no descriptor: the TMA-store epilogue loads it through
    its strides (and still stores through the output descriptor)."""
    out, res = _run(CASES[0], dtype, "silu", "nchw")
    assert forced.launches == 1 and forced.pointer_epilogue == 0
    assert [t.data_ptr() for t in forced.descs] == [out.data_ptr()]


@pytest.mark.interpret
def test_output_without_descriptor_runs_the_pointer_epilogue(forced):
    """An output the store descriptor cannot take (NCHW here; the launcher itself allocates channels_last) makes
    the forced TMA_EPILOGUE launch use the pointer-store epilogue — a correct result, no descriptor built."""
    case = CASES[0]
    inputs, truth = build_case(case, torch.float16, "channels_last", "gelu", True)
    x, w = inputs["x"], pack_weight(inputs["weight"])
    y = torch.empty(truth.shape, dtype=torch.float16)  # NCHW
    res = inputs["residual"]
    conv_tma.conv1x1_tma_launch(x, w, inputs["scale"].float(), inputs["shift"].float(), res, y,
                                activation_id("gelu"), 0.0, False, res.stride(), None,
                                interpret_cfg=dict(kconfigs.INTERPRET_CONFIG))
    programs = -(-y.shape[0] * y.shape[2] * y.shape[3] // 16) * -(-y.shape[1] // 16)  # the 16 x 16 tiles
    assert forced.launches == 1 and forced.descs == [] and forced.pointer_epilogue == programs
    assert max_rel_error(y, truth) <= TOLERANCE[torch.float16]


@pytest.mark.interpret
def test_unaligned_cout_falls_back_to_the_pointer_kernel(forced):
    """Cout = 12 fp16 (24-byte rows): no descriptor of any kind, the pointer kernel runs, still right."""
    _run(ConvCase("cout12", 1, 16, 3, 5, 12, (1, 1)), torch.float16, "relu", "channels_last")
    assert forced.launches == 0 and forced.descs == []


#: Stride-1 KxK and strided 1x1 problems for the 4-D descriptor kernel, with OH / OW / Cout tails against its
#: 4 x 4-pixel x 16-channel interpreter box.
KXK_CASES = [ConvCase("3x3_oh5_ow7_cout24", 1, 16, 5, 7, 24, (3, 3), padding=(1, 1)),
             ConvCase("1x1_stride2_oh4_ow3", 1, 16, 7, 5, 16, (1, 1), stride=(2, 2))]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype,residual", [(torch.float16, "channels_last"), (torch.float32, None),
                                            (torch.float16, "nchw")], ids=["fp16-res", "fp32-nores", "fp16-nchw-res"])
@pytest.mark.parametrize("case", KXK_CASES, ids=[c.name for c in KXK_CASES])
def test_kxk_tma_store_epilogue_matches_float64(case, dtype, residual, forced_kxk):
    i = KXK_CASES.index(case) * 3 + (dtype == torch.float32) + 2 * (residual == "nchw")
    activation = ("relu6", "gelu", "silu", "leaky_relu", "hardswish", "gelu_tanh")[i]
    out, res = _run(case, dtype, activation, residual)
    assert forced_kxk.launches == 1, "the launcher did not take the TMA KxK kernel"
    assert forced_kxk.pointer_epilogue == 0, "the pointer-store epilogue ran instead of the TMA store"
    with_res_desc = residual == "channels_last"
    assert [t.data_ptr() for t in forced_kxk.descs] == [out.data_ptr()] + ([res.data_ptr()] if with_res_desc else [])


@pytest.mark.interpret
def test_kxk_output_without_descriptor_runs_the_pointer_epilogue(forced_kxk):
    """As for the 1x1 kernel: an NCHW output has no 4-D descriptor, the forced variant stores by pointers."""
    case = KXK_CASES[0]
    inputs, truth = build_case(case, torch.float16, "channels_last", "relu", True)
    y = torch.empty(truth.shape, dtype=torch.float16)  # NCHW
    res = inputs["residual"]
    conv_tma_kxk.conv_kxk_tma_launch(inputs["x"], pack_weight(inputs["weight"]), inputs["scale"].float(),
                                     inputs["shift"].float(), res, y, case.padding, case.dilation,
                                     activation_id("relu"), 0.0, False, res.stride(), None,
                                     interpret_cfg=dict(conv_tma_kxk.INTERPRET_CONFIG))
    programs = -(-y.shape[2] // 4) * -(-y.shape[3] // 4) * -(-y.shape[1] // 16)  # 4 x 4-pixel x 16-channel boxes
    assert forced_kxk.launches == 1 and forced_kxk.descs == [] and forced_kxk.pointer_epilogue == programs
    assert max_rel_error(y, truth) <= TOLERANCE[torch.float16]


# ------------------------------------------------------------------------------------------ eligibility
def _cl(n, c, h, w, dtype=torch.float16):
    return torch.zeros(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _offset_by_one_element():
    flat = torch.zeros(2 * 3 * 3 * 16 + 1, dtype=torch.float16)
    t = flat[1:].view(2, 3, 3, 16).permute(0, 3, 1, 2)  # dense channels_last strides, base 2 bytes off
    assert t.stride() == _cl(2, 16, 3, 3).stride() and t.data_ptr() % 16
    return t


@pytest.mark.parametrize("desc,tensor,expected", [
    ("dense channels_last fp16", _cl(2, 16, 3, 3), True),
    ("fp32 12 channels: 48-byte rows", _cl(1, 12, 3, 3, torch.float32), True),
    ("fp16 12 channels: 24-byte rows", _cl(1, 12, 3, 3), False),
    ("nchw", torch.zeros(2, 16, 3, 3, dtype=torch.float16), False),
    ("channel slice of a wider tensor", _cl(1, 32, 3, 3)[:, :16], False),
    ("spatial slice (rows not dense)", _cl(1, 16, 4, 4)[:, :, :, :3], False),
    ("unaligned base", _offset_by_one_element(), False),
    ("empty", _cl(0, 16, 3, 3), False),
    ("3-D", torch.zeros(16, 3, 3, dtype=torch.float16), False),
    ("none", None, False),
])
def test_tma_store_eligibility(desc, tensor, expected):
    assert conv_tma.tma_store_eligible(tensor) is expected, desc


# ------------------------------------------------------------------------------------------ configs
def _prune_args(y_desc, dtype=torch.float16, m=4096, cin=256, cout=256, residual=False):
    base = SimpleNamespace(base=torch.empty(0, dtype=dtype))
    return {"a_desc": base, "y_desc": y_desc, "M": m, "CIN": cin, "COUT": cout, "HAS_RESIDUAL": residual}


def _tile(c):
    kw = c.kwargs
    return (kw.get("BLOCK_M", kw.get("BLOCK_H", 0) * kw.get("BLOCK_W", 0)), kw["BLOCK_N"], kw["BLOCK_K"],
            c.num_warps, c.num_stages)


@pytest.mark.parametrize("base_fn,dp_fn", [(conv_tma.tma_configs, conv_tma.dp_configs),
                                           (conv_tma_kxk.kxk_configs, conv_tma_kxk.dp_configs)], ids=["1x1", "kxk"])
def test_twins_only_for_large_tiles_and_not_in_the_stream_k_table(base_fn, dp_fn):
    """The stream-K kernels take `tma_configs` / `kxk_configs`: no twin there (their epilogue has no store
    descriptor); the data-parallel tables add one twin per tile of at least TMA_EPILOGUE_MIN_TILE outputs."""
    for dtype_bytes in (2, 4):
        base, dp = base_fn(dtype_bytes), dp_fn(dtype_bytes)
        twins = [c for c in dp if c.kwargs.get("TMA_EPILOGUE")]
        assert twins and not any(c.kwargs.get("TMA_EPILOGUE") for c in base)
        large = [c for c in base if _tile(c)[0] * _tile(c)[1] >= conv_tma.TMA_EPILOGUE_MIN_TILE]
        assert [_tile(c) for c in twins] == [_tile(c) for c in large]
        assert [_tile(c) for c in dp[:len(base)]] == [_tile(c) for c in base]


def test_pruning_keeps_twins_only_with_an_output_descriptor():
    configs = conv_tma.dp_configs(2) + conv_tma.dp_configs(4)
    with_desc = conv_tma._prune_tma(configs, _prune_args(y_desc=object()))
    without = conv_tma._prune_tma(configs, _prune_args(y_desc=None))
    assert any(c.kwargs.get("TMA_EPILOGUE") for c in with_desc)
    assert not any(c.kwargs.get("TMA_EPILOGUE") for c in without)
    assert len(with_desc) == len(without) + len(conv_tma.dp_configs(2)) - len(conv_tma.tma_configs(2))
    # capped to a 24-channel output, a twin stays apart from its pointer-store tile (not deduplicated away)
    small = conv_tma._prune_tma(configs, _prune_args(y_desc=object(), cout=24))
    sigs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, bool(c.kwargs.get("TMA_EPILOGUE")))
            for c in small]
    assert (128, 32, 8, 4, True) in sigs and (128, 32, 8, 4, False) in sigs and len(sigs) == len(set(sigs))


def test_kxk_pruning_keeps_twins_only_with_an_output_descriptor():
    base = SimpleNamespace(base=torch.empty(0, dtype=torch.float16))
    configs = conv_tma_kxk.dp_configs(2) + conv_tma_kxk.dp_configs(4)
    args = {"x_desc": base, "CIN": 64, "COUT": 256, "HAS_RESIDUAL": False}
    assert any(c.kwargs.get("TMA_EPILOGUE") for c in conv_tma_kxk._prune_kxk(configs, {**args, "y_desc": base}))
    assert not any(c.kwargs.get("TMA_EPILOGUE") for c in conv_tma_kxk._prune_kxk(configs, {**args, "y_desc": None}))
    twin = next(c for c in conv_tma_kxk._prune_kxk(configs, {**args, "y_desc": base}) if c.kwargs.get("TMA_EPILOGUE"))
    descs = {name: SimpleNamespace(block_shape=None) for name in ("x_desc", "w_desc", "y_desc", "r_desc")}
    twin.pre_hook({**descs, **twin.kwargs})
    box = [1, twin.kwargs["BLOCK_H"], twin.kwargs["BLOCK_W"], twin.kwargs["BLOCK_N"]]
    assert descs["y_desc"].block_shape == box and descs["r_desc"].block_shape == box


def test_pre_hook_sets_the_output_and_residual_boxes():
    twin = next(c for c in conv_tma._prune_tma(conv_tma.dp_configs(2), _prune_args(y_desc=object()))
                if c.kwargs.get("TMA_EPILOGUE"))
    descs = {name: SimpleNamespace(block_shape=None) for name in ("a_desc", "b_desc", "y_desc", "r_desc")}
    twin.pre_hook({**descs, **twin.kwargs})
    box = [twin.kwargs["BLOCK_M"], twin.kwargs["BLOCK_N"]]
    assert descs["y_desc"].block_shape == box and descs["r_desc"].block_shape == box
    twin.pre_hook({**descs, "r_desc": None, **twin.kwargs})  # no residual descriptor: nothing to set


def test_deny_list_keys_tell_twins_apart():
    from fusedconv.kernels.denylist import config_key

    keys = [config_key(c) for c in conv_tma.dp_configs(2)]
    assert len(keys) == len(set(keys))


def test_deny_list_entry_of_a_twin_drops_only_the_twin(tmp_path):
    """An entry recorded as the GPU check records a failing TMA config (every config value, TMA_EPILOGUE's true
    included) denies the twin and keeps its pointer-store tile."""
    import triton

    from fusedconv.kernels import denylist

    configs = conv_tma._prune_tma(conv_tma.dp_configs(2), _prune_args(y_desc=object()))
    twin = next(c for c in configs if c.kwargs.get("TMA_EPILOGUE"))
    path = str(tmp_path / "denylist.json")
    denylist.add_entries([{"gpu": "GPU", "triton": triton.__version__, "kernel": "tma1x1",
                           "config": [*twin.kwargs.values(), twin.num_warps, twin.num_stages]}], path)
    fake_cuda = SimpleNamespace(is_cuda=True, dtype=torch.float16)
    kept = denylist.drop_denied(configs, {"IS_1X1": True}, gpu_name="GPU", deny_file=path, kernel="tma1x1",
                                tensor=fake_cuda, key=denylist.config_key)
    assert twin not in kept and len(kept) == len(configs) - 1


def test_gpu_check_covers_the_twins():
    """The GPU check's TMA candidates for a 1x1 layer (every config it runs against float64) include the
    TMA-store twins, labelled apart."""
    from bench import check_correctness as cc

    for g in (cc.Geometry("g", 256, 14, 14, 256, 1, 1, residual=True),
              cc.Geometry("g", 64, 14, 14, 256, 3, 3, padding=(1, 1))):
        cands = cc._tma_candidates(g, 32, torch.float16, torch.device("cpu"))
        labels = [cc.config_label(c) for c in cands]
        assert any(c.kwargs.get("TMA_EPILOGUE") for c in cands) and any("tma-store" in s for s in labels)
        assert len(labels) == len(set(labels))
