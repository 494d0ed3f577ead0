"""The compiled (autotuned) Triton kernels on a CUDA device vs PyTorch's Conv2d -> BatchNorm2d -> activation.

Marker `gpu`: skipped without CUDA (conftest). Covers fp16 / bf16 / fp32 with TF32 on and off over the
geometries of test_kernel_interpret, residual, NCHW and channels_last, ResNet-50-like layers, the automatic
split-K path for batch 1, int64 addressing for a tensor over 2^31 elements, and the op end to end (FusedConv2d,
torch.compile through the triton_op, CUDA-graph capture after `tuning.warmup`). No timing is asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedconv.kernels import conv_bn_act, pack_weight
from fusedconv.kernels import configs as kconfigs
from test_kernel_interpret import ACTIVATION_NAMES, CASES, TOLERANCE, ConvCase, run_case
from util import max_rel_error, randomize_bn

pytestmark = pytest.mark.gpu

# (dtype, tf32) combos; TF32 keeps a 10-bit mantissa, so its tolerance is that of 16-bit inputs.
DTYPE_MODES = [(torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True)]
TF32_TOLERANCE = 5e-3
DEVICE = "cuda"


@pytest.fixture
def tf32_mode(request):
    old = torch.backends.cudnn.allow_tf32
    yield lambda on: setattr(torch.backends.cudnn, "allow_tf32", on)
    torch.backends.cudnn.allow_tf32 = old


def _tolerance(dtype, tf32):
    return TF32_TOLERANCE if (dtype == torch.float32 and tf32) else TOLERANCE[dtype]


def _check(case, dtype, tf32, layout, activation, residual, tf32_mode, **kw):
    tf32_mode(tf32)
    kw.setdefault("cudnn", False)  # these check the Triton kernels: no cuDNN candidate for ReLU layers
    run_case(case, dtype, layout, activation, residual, device=DEVICE, tolerance=_tolerance(dtype, tf32), **kw)


@pytest.mark.parametrize("dtype,tf32", DTYPE_MODES, ids=["fp16", "bf16", "fp32", "tf32"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_geometries(case, layout, dtype, tf32, tf32_mode):
    i = CASES.index(case)
    activation = ACTIVATION_NAMES[(i + len(layout)) % len(ACTIVATION_NAMES)]
    _check(case, dtype, tf32, layout, activation, (i % 2 == 0), tf32_mode)


@pytest.mark.parametrize("dtype,tf32", DTYPE_MODES, ids=["fp16", "bf16", "fp32", "tf32"])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_every_activation_with_residual(activation, dtype, tf32, tf32_mode):
    case = ConvCase("3x3_act", 2, 24, 9, 9, 40, (3, 3), padding=(1, 1))
    _check(case, dtype, tf32, "channels_last", activation, True, tf32_mode, weight_fn=pack_weight)


RESNET_LIKE = [
    ConvCase("stem_7x7", 2, 3, 64, 64, 64, (7, 7), stride=(2, 2), padding=(3, 3)),
    ConvCase("1x1_256_64", 2, 256, 28, 28, 64, (1, 1)),
    ConvCase("3x3_64_64", 2, 64, 28, 28, 64, (3, 3), padding=(1, 1)),
    ConvCase("1x1_64_256", 2, 64, 28, 28, 256, (1, 1)),
    ConvCase("3x3_s2_128", 2, 128, 28, 28, 128, (3, 3), stride=(2, 2), padding=(1, 1)),
    ConvCase("1x1_s2_down", 2, 256, 28, 28, 512, (1, 1), stride=(2, 2)),
    ConvCase("3x3_512_bs1", 1, 512, 7, 7, 512, (3, 3), padding=(1, 1)),  # split-K territory
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", RESNET_LIKE, ids=lambda c: c.name)
def test_resnet_like_layers(case, dtype, tf32_mode):
    _check(case, dtype, False, "channels_last", "relu", case.kernel == (1, 1), tf32_mode, weight_fn=pack_weight)


def test_batch1_uses_split_k_and_matches(tf32_mode):
    case = RESNET_LIKE[-1]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    k_iters = 9 * -(-case.cin // 64)
    assert kconfigs.choose_split_k(7 * 7, case.cout, 1, k_iters, sms) > 1, "expected the automatic split-K path"
    _check(case, torch.float16, False, "channels_last", "silu", True, tf32_mode, weight_fn=pack_weight)
    _check(case, torch.float32, False, "nchw", "gelu", False, tf32_mode)


def test_int64_addressing_over_2_31_elements():
    """A channels_last fp16 input and output of > 2^31 elements: offsets past 2^31 must not wrap."""
    n, c, h, w = 2100, 64, 128, 128  # 2.2e9 elements, 4.4 GB per tensor
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs ~12 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    torch.manual_seed(0)
    x = torch.empty((n, c, h, w), dtype=torch.float16, device="cuda", memory_format=torch.channels_last)
    x.normal_()
    assert x.numel() > 2**31
    weight = (torch.randn(c, c, 1, 1, device="cuda") / 8).half()
    scale = torch.rand(c, device="cuda") + 0.5
    shift = torch.randn(c, device="cuda")
    y = conv_bn_act(x, pack_weight(weight, 1), scale, shift, activation="relu", cudnn=False)  # Triton's int64 path
    for idx in (slice(0, 2), slice(n - 2, n)):  # the last images live past 2^31
        ref = F.relu(F.conv2d(x[idx].float(), weight.float()) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
        assert max_rel_error(y[idx].float(), ref) <= TOLERANCE[torch.float16]
    del x, y
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the op
def _model(dtype):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
                        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
    randomize_bn(seq, 2)
    return seq.eval().to("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_converted_model_compile_and_cuda_graph(dtype, tf32_mode):
    import fusedconv
    from fusedconv import tuning

    tf32_mode(False)
    ref_model = _model(dtype)
    x = torch.randn(4, 16, 20, 20, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ref_model(x)
    model = fusedconv.convert(ref_model).to(dtype)
    xd = x.to(dtype)
    tuning.warmup(model, xd)
    with torch.no_grad():
        eager = model(xd)
        assert eager.is_contiguous(memory_format=torch.channels_last)
        assert max_rel_error(eager.float(), expected) <= TOLERANCE[dtype] * 2
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(xd)
        assert max_rel_error(compiled.float(), eager.float()) <= TOLERANCE[dtype]

        static_x = xd.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(static_x)  # tuned already: this only warms the graph pool
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        static_x.copy_(xd * 0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert max_rel_error(static_y.float(), model(xd * 0.5).float()) == 0.0


# ------------------------------------------------------------------------------------------- kernel v2 checks
from test_kernel_loops_interpret import LOOP_CASES, launch_with_config  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [c for c, _, _ in LOOP_CASES], ids=lambda c: c.name)
def test_v2_loops(case, dtype, tf32_mode):
    """The per-tap (carried counters, tap bits), row-K, flat-K and CH_ALIGN paths, compiled and autotuned."""
    i = [c for c, _, _ in LOOP_CASES].index(case)
    _check(case, dtype, False, "channels_last", ACTIVATION_NAMES[i % len(ACTIVATION_NAMES)], i % 2 == 0, tf32_mode,
           weight_fn=pack_weight)


@pytest.mark.parametrize("case", [ConvCase("1x1_256_64", 2, 256, 28, 28, 64, (1, 1)),
                                  ConvCase("1x1_64_256_tail", 3, 64, 13, 11, 256, (1, 1)),
                                  ConvCase("1x1_24_40", 2, 24, 9, 9, 40, (1, 1))], ids=lambda c: c.name)
def test_tma_1x1_on_hopper(case, tf32_mode, monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    from fusedconv.kernels import conv_tma

    calls = []
    real = conv_tma.conv1x1_tma_launch
    monkeypatch.setattr(conv_tma, "conv1x1_tma_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    _check(case, torch.float16, False, "channels_last", "relu", True, tf32_mode, weight_fn=pack_weight, tma=True)
    assert calls, "the TMA kernel was not used"


@pytest.mark.parametrize("block,warps,stages", [((128, 128, 64), 8, 4), ((128, 256, 64), 8, 3),
                                                ((256, 128, 64), 8, 3)])
@pytest.mark.parametrize("cin,h", [(64, 28), (256, 14)])
def test_spatial_8_warp_configs(block, warps, stages, cin, h):
    """The check that would lift configs.SPATIAL_MAX_WARPS: 8-warp tiles on the per-tap loop, on this GPU."""
    torch.manual_seed(0)
    x = torch.randn(4, cin, h, h, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = pack_weight((torch.randn(cin, cin, 3, 3, device="cuda") / (3 * cin ** 0.5)).half())
    scale, shift = torch.rand(cin, device="cuda") + 0.5, torch.randn(cin, device="cuda") * 0.1
    y = launch_with_config(x, w, scale, shift, padding=(1, 1), block=block, num_warps=warps, num_stages=stages)
    truth = torch.relu(F.conv2d(x.double(), w.double(), padding=1) * scale.double().view(1, -1, 1, 1)
                       + shift.double().view(1, -1, 1, 1))
    assert max_rel_error(y, truth) <= TOLERANCE[torch.float16]
