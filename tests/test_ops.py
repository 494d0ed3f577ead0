"""The `fusedconv::conv_bn_act` op on CPU: fallback values, fake (meta) outputs, torch.compile and torch.export.

Values are checked against PyTorch's own Conv2d -> BatchNorm2d(eval, randomised statistics) -> activation
(built by test_kernel_interpret.build_case). The compile tests use fullgraph=True, so any graph break fails them;
one of them routes FusedConv2d through the op (as it does on CUDA) by patching `ops.use_kernel`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusedconv
from fusedconv import FusedConv2d, ops
from fusedconv.kernels.reference import output_memory_format
from test_kernel_interpret import CASES, TOLERANCE, ConvCase, build_case
from util import max_rel_error, randomize_bn


def _call(inputs, case, activation):
    return ops.conv_bn_act(inputs["x"], inputs["weight"], inputs["scale"], inputs["shift"], inputs["residual"],
                           case.stride, case.padding, case.dilation, case.groups, activation, inputs["act_param"])


@pytest.mark.parametrize("case,layout,activation,residual", [
    (CASES[3], "nchw", "relu", True),
    (CASES[4], "channels_last", "gelu", False),
    (CASES[5], "channels_last", "leaky_relu", True),
    (CASES[7], "nchw", "hardswish", False),
    (CASES[8], "channels_last", "silu", True),
], ids=lambda v: v.name if isinstance(v, ConvCase) else str(v))
def test_op_cpu_fallback_matches_pytorch(case, layout, activation, residual):
    inputs, truth = build_case(case, torch.float32, layout, activation, residual)
    out = _call(inputs, case, activation)
    assert out.dtype == torch.float32 and out.shape == truth.shape
    assert out.is_contiguous(memory_format=output_memory_format(inputs["x"]))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_error(out, truth) <= TOLERANCE[torch.float32]


def test_op_cpu_fallback_float64():
    """fp64 (no kernel dtype) takes the fallback with an fp64 epilogue: near-exact."""
    case = CASES[3]
    inputs, truth = build_case(case, torch.float64, "nchw", "gelu_tanh", True)
    inputs["scale"], inputs["shift"] = inputs["scale"].double(), inputs["shift"].double()
    out = _call(inputs, case, "gelu_tanh")
    assert out.dtype == torch.float64
    # scale/shift were rounded to fp32 by build_case; that rounding is the only error left.
    assert max_rel_error(out, truth) <= 1e-6


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[6], CASES[10]], ids=lambda c: c.name)
def test_fake_and_meta_outputs_match_real(case, layout):
    inputs, _ = build_case(case, torch.float32, layout, "relu", True)
    real = _call(inputs, case, "relu")
    meta = _call({k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}, case, "relu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = _call({k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
                     case, "relu")
    # The opaque-registration fake (used with FUSEDCONV_OPAQUE_OP=1) follows the same rule.
    opaque = ops._conv_bn_act_fake(inputs["x"].to("meta"), inputs["weight"], None, None, None, case.stride,
                                   case.padding, case.dilation, case.groups, "relu", 0.0)
    for t in (meta, fake, opaque):
        assert t.shape == real.shape and t.dtype == real.dtype
        assert t.stride() == real.stride(), "fake output must have the real output's memory format"


def _small_model():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
    randomize_bn(seq, 1)
    seq.eval()
    return seq


@pytest.mark.parametrize("through_op", [False, True], ids=["fallback", "op"])
def test_compile_fullgraph_fusedconv_model(monkeypatch, through_op):
    """torch.compile(fullgraph=True) of a converted model has no graph break, on the fallback and through the op."""
    torch._dynamo.reset()
    if through_op:
        monkeypatch.setattr(ops, "use_kernel", lambda x, w: True)  # what CUDA does: forward calls the op
    ref_model = _small_model()
    model = fusedconv.convert(ref_model)
    assert any(isinstance(m, FusedConv2d) for m in model.modules())
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ref_model(x)
        compiled = torch.compile(model, fullgraph=True, backend="inductor" if through_op else "aot_eager")
        out = compiled(x)
    assert max_rel_error(out, expected) <= 1e-5


def test_compile_fullgraph_direct_op_call():
    torch._dynamo.reset()
    case = CASES[4]
    inputs, truth = build_case(case, torch.float32, "nchw", "gelu", True)

    def f(x, residual):
        y = ops.conv_bn_act(x, inputs["weight"], inputs["scale"], inputs["shift"], residual, case.stride,
                            case.padding, case.dilation, case.groups, "gelu", 0.0)
        return y * 2.0

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(inputs["x"], inputs["residual"])
    assert max_rel_error(out, truth * 2.0) <= TOLERANCE[torch.float32]


def test_export_keeps_the_op():
    case = CASES[3]
    inputs, truth = build_case(case, torch.float32, "channels_last", "relu6", True)

    class Block(nn.Module):
        def forward(self, x, residual):
            return ops.conv_bn_act(x, inputs["weight"], inputs["scale"], inputs["shift"], residual, case.stride,
                                   case.padding, case.dilation, case.groups, "relu6", 0.0)

    exported = torch.export.export(Block(), (inputs["x"], inputs["residual"]))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.fusedconv.conv_bn_act.default in targets
    out = exported.module()(inputs["x"], inputs["residual"])
    assert max_rel_error(out, truth) <= TOLERANCE[torch.float32]


def test_op_schema_and_helpers():
    schema = str(torch.ops.fusedconv.conv_bn_act.default._schema)
    for arg in ("Tensor x", "Tensor weight", "Tensor scale", "Tensor shift", "Tensor? residual", "stride",
                "padding", "dilation", "groups", "str activation", "float act_param"):
        assert arg in schema
    assert ops.OP_REGISTRATION in ("triton_op", "custom_op")
    x = torch.randn(1, 2, 3, 3)
    assert not ops.use_kernel(x, torch.randn(4, 2, 1, 1))  # CPU never runs the kernel
    w = ops.pack_weight(torch.randn(4, 2, 3, 3), 1)
    assert w.stride(0) == 1


def test_warmup_runs_once_per_distinct_signature():
    from fusedconv import tuning

    calls = []

    class Recorder(nn.Module):
        def forward(self, x, scale=None):
            calls.append((tuple(x.shape), x.is_contiguous()))
            assert not torch.is_grad_enabled(), "warmup must run under no_grad"
            return x

    model = Recorder()
    a, b = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert tuning.warmup(model, a, a.clone(), b, (b,), {"x": a.contiguous(memory_format=torch.channels_last)}) \
        is model
    assert calls == [((1, 3, 4, 4), True), ((2, 3, 4, 4), True), ((1, 3, 4, 4), False)]
    with pytest.raises(ValueError, match="example_inputs"):
        tuning.warmup(model)


def test_warmup_converted_model_on_cpu_is_harmless():
    from fusedconv import tuning

    model = fusedconv.convert(_small_model())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    tuning.warmup(model, x, torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_op_decomposes_into_traceable_triton_kernels(monkeypatch):
    """What torch.compile does on CUDA, checked without a GPU: with fake CUDA tensors, AOT tracing of the op
    runs the launcher's own code and records the Triton launches (autotuned GEMM + split-K epilogue) as
    wrap_triton higher-order ops instead of failing on fake tensors or breaking the graph."""
    import importlib

    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")
    if launcher.interpreting():
        pytest.skip("kernels are interpreter functions in this process")
    monkeypatch.setattr(ops, "kernel_available", lambda: True)
    monkeypatch.setattr(launcher, "_num_sms", lambda device: 132)  # no device to ask
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    def block(x, w, scale, shift, residual):
        return ops.conv_bn_act(x, w, scale, shift, residual, (1, 1), (1, 1), (1, 1), 1, "relu", 0.0)

    with FakeTensorMode():
        x = torch.empty(1, 64, 7, 7, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        w = ops.pack_weight(torch.empty(64, 64, 3, 3, device="cuda", dtype=torch.float16), 1)
        scale, shift = torch.empty(64, device="cuda"), torch.empty(64, device="cuda")
        residual = torch.empty(1, 64, 7, 7, device="cuda", dtype=torch.float16)
        out = aot_function(block, fw_compiler=keep)(x, w, scale, shift, residual)
    assert out.shape == (1, 64, 7, 7) and out.device.type == "cuda"
    code = graphs[0].code
    assert code.count("triton_kernel_wrapper_functional") >= 2, code  # GEMM (split-K here) + its epilogue
    assert "fusedconv.conv_bn_act" not in code  # decomposed: the kernels themselves are visible
