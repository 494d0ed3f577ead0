"""FusedConv2d's standard-conv fallback against PyTorch itself (nn.Conv2d -> nn.BatchNorm2d(eval) -> activation).

Covers every activation, the residual input, every padding_mode, grouped/depthwise convs, fp32 / fp64 / fp16 /
bf16, unbatched 3-d input, empty batches, channels_last and non-contiguous inputs, the dtype rules of scale/shift,
the folded-weight cache's freshness, extra_repr, and tracing with torch.compile / torch.export.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import ACT_MODULES, max_rel_error, randomize_bn  # noqa: E402

from fusedconv.activations import ACTIVATIONS  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

# Relative tolerance (max |out - ref| / max |ref|) per dtype; the same numbers are documented in docs/SUPPORT.md.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_block(cin=4, cout=6, k=3, stride=1, padding=1, dilation=1, groups=1, bias=False, padding_mode="zeros",
               act="relu", seed=0, dtype=torch.float32):
    """A reference Conv2d -> BatchNorm2d(eval, random stats) -> activation and its FusedConv2d."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias, padding_mode=padding_mode)
    bn = nn.BatchNorm2d(cout)
    ref = nn.Sequential(conv, bn, ACT_MODULES[act]).eval()
    randomize_bn(ref, seed)
    ref = ref.to(dtype)
    fused = FusedConv2d.from_modules(ref[0], ref[1], ref[2])
    return ref, fused


def reference_with_residual(ref: nn.Sequential, x, residual):
    """act(bn(conv(x)) + residual), with PyTorch modules."""
    return ref[2](ref[1](ref[0](x)) + residual)


def test_every_activation_is_covered():
    assert set(ACT_MODULES) == set(ACTIVATIONS)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
@torch.no_grad()
def test_fallback_matches_pytorch_for_every_activation(act, with_residual):
    ref, fused = make_block(act=act, bias=True)
    x = torch.randn(2, 4, 9, 7)
    if with_residual:
        r = torch.randn(2, 6, 9, 7)
        out, expected = fused(x, r), reference_with_residual(ref, x, r)
    else:
        out, expected = fused(x), ref(x)
    assert out.shape == expected.shape
    assert max_rel_error(out, expected) < TOL[torch.float32]


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@torch.no_grad()
def test_fallback_every_padding_mode(padding_mode):
    ref, fused = make_block(padding=(1, 2), k=(3, 5), padding_mode=padding_mode, act="silu")
    x = torch.randn(2, 4, 8, 9)
    assert max_rel_error(fused(x), ref(x)) < TOL[torch.float32]
    assert fused.padding_mode == padding_mode


@pytest.mark.parametrize("geometry", [
    dict(cin=4, cout=6, groups=2),
    dict(cin=6, cout=6, groups=6),  # depthwise
    dict(cin=4, cout=8, groups=4),  # depthwise with channel multiplier 2
    dict(stride=2, padding=0),
    dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    dict(k=1, padding=0),
    dict(k=(1, 5), padding=(0, 2)),
])
@torch.no_grad()
def test_fallback_geometries(geometry):
    ref, fused = make_block(act="relu6", **geometry)
    x = torch.randn(3, ref[0].in_channels, 11, 10)
    r = torch.randn_like(ref[1](ref[0](x)))
    assert max_rel_error(fused(x, r), reference_with_residual(ref, x, r)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@torch.no_grad()
def test_fallback_other_dtypes(dtype):
    ref, fused = make_block(act="hardswish", dtype=dtype)
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    try:
        expected = ref(x)
    except RuntimeError as e:  # some CPU builds have no half conv / batch norm
        pytest.skip(f"{dtype} conv not supported on this CPU build: {e}")
    out = fused(x)
    assert out.dtype == dtype
    # Judge both against the float64 computation: the fused path must be at least as close as PyTorch's own.
    exact = ref.double()(x.double())
    assert max_rel_error(out, exact) < TOL[dtype]
    assert max_rel_error(out, expected) < 2 * TOL[dtype]


def test_scale_shift_dtypes_follow_the_module():
    _, fused = make_block()
    assert fused.scale.dtype == fused.shift.dtype == torch.float32
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to(dtype=torch.float16)):
        m = cast(make_block()[1])
        assert m.weight.dtype in (torch.float16, torch.bfloat16)
        assert m.scale.dtype == m.shift.dtype == torch.float32
    m = make_block()[1].double()
    assert m.weight.dtype == m.scale.dtype == m.shift.dtype == torch.float64
    m = m.float()
    assert m.weight.dtype == m.scale.dtype == m.shift.dtype == torch.float32


@torch.no_grad()
def test_half_round_trip_keeps_scale_exact():
    """.half() then .float() must not round scale/shift through fp16."""
    _, fused = make_block()
    scale, shift = fused.scale.clone(), fused.shift.clone()
    fused.half().float()
    assert torch.equal(fused.scale, scale) and torch.equal(fused.shift, shift)


@torch.no_grad()
def test_unbatched_input_and_residual():
    ref, fused = make_block(act="leaky_relu")
    x = torch.randn(4, 8, 8)
    r = torch.randn(6, 8, 8)
    out = fused(x, r)
    assert out.shape == (6, 8, 8)
    expected = reference_with_residual(ref, x.unsqueeze(0), r.unsqueeze(0)).squeeze(0)
    assert max_rel_error(out, expected) < TOL[torch.float32]
    # nn.Conv2d itself accepts the unbatched input with the same result.
    assert max_rel_error(fused(x), ref[2](ref[1](ref[0](x).unsqueeze(0))).squeeze(0)) < TOL[torch.float32]


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@torch.no_grad()
def test_empty_batch(padding_mode):
    ref, fused = make_block(padding_mode=padding_mode)
    x = torch.randn(0, 4, 8, 8)
    out = fused(x, torch.randn(0, 6, 8, 8))
    assert out.shape == ref[0](x).shape == (0, 6, 8, 8)
    assert fused(x.contiguous(memory_format=torch.channels_last)).shape == (0, 6, 8, 8)


@torch.no_grad()
def test_zero_size_spatial_output():
    """nn.Conv2d refuses an empty spatial input; FusedConv2d returns the empty output the formula gives."""
    _, fused = make_block(k=1, padding=0)
    out = fused(torch.randn(2, 4, 0, 5))
    assert out.shape == (2, 6, 0, 5)
    _, fused3 = make_block(k=3, padding=1)
    assert fused3(torch.randn(2, 4, 5, 0)).shape == (2, 6, 5, 0)
    assert fused3(torch.randn(4, 0, 3)).shape == (6, 0, 3)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed", "channels_last_sliced"])
@torch.no_grad()
def test_strided_inputs(layout):
    ref, fused = make_block(act="gelu")
    base = torch.randn(3, 8, 12, 13)
    if layout == "channels_last":
        x = base[:, :4].contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[::2, 1:8:2, 1:, ::2]
    elif layout == "transposed":
        x = base[:, :4].transpose(2, 3)
    else:
        x = base.contiguous(memory_format=torch.channels_last)[:, 2:6, 1:-1, 2:]
    r = torch.randn_like(ref[1](ref[0](x))).transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous residual
    out = fused(x, r)
    assert max_rel_error(out, reference_with_residual(ref, x.contiguous(), r)) < TOL[torch.float32]
    if layout == "channels_last":
        # Like F.conv2d, the output follows a channels_last input.
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert fused(x).is_contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def test_channels_last_output_on_the_scaled_path():
    """The fp32-epilogue path (used when scale does not fit fp16) also keeps channels_last."""
    ref, fused = make_block()
    fused.half()
    fused.scale[0] = 1e6  # folding this into an fp16 weight would overflow: forces the scaled path
    x = torch.randn(1, 4, 6, 6, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    out = fused(x)
    assert out.dtype == torch.float16 and out.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------- cache freshness
@torch.no_grad()
def _fused_vs_fresh(fused: FusedConv2d, x: torch.Tensor) -> float:
    """Error of `fused` against a freshly built module with the same state (so no cache can be involved)."""
    fresh = FusedConv2d(fused.weight.float(), fused.scale, fused.shift, stride=fused.stride,
                        padding=fused.padding, groups=fused.groups, activation=fused.act)
    return max_rel_error(fused(x).float(), fresh(x.float()))


@torch.no_grad()
def test_cache_sees_in_place_weight_edit():
    _, fused = make_block()
    x = torch.randn(2, 4, 8, 8)
    fused(x)
    fused.weight.mul_(-2.0)
    assert _fused_vs_fresh(fused, x) < TOL[torch.float32]
    nn.init.normal_(fused.weight)
    assert _fused_vs_fresh(fused, x) < TOL[torch.float32]
    fused.scale.mul_(3.0)
    fused.shift.add_(1.0)
    assert _fused_vs_fresh(fused, x) < TOL[torch.float32]


@torch.no_grad()
def test_cache_sees_data_edit_after_refresh():
    """Edits through `.data` bypass the version counter; refresh() is the documented way to announce them."""
    _, fused = make_block()
    x = torch.randn(2, 4, 8, 8)
    fused(x)
    fused.weight.data.mul_(0.5)
    fused.refresh()
    assert _fused_vs_fresh(fused, x) < TOL[torch.float32]


@torch.no_grad()
def test_cache_sees_replaced_weight_and_load_state_dict():
    _, fused = make_block(seed=1)
    _, other = make_block(seed=2, act="relu")
    x = torch.randn(2, 4, 8, 8)
    fused(x)
    fused.weight = nn.Parameter(torch.randn_like(fused.weight), requires_grad=False)
    assert _fused_vs_fresh(fused, x) < TOL[torch.float32]
    fused.load_state_dict(other.state_dict())
    assert max_rel_error(fused(x), other(x)) < TOL[torch.float32]
    fused.weight.data = torch.randn_like(fused.weight)  # a new tensor: seen without refresh()
    assert _fused_vs_fresh(fused, x) < TOL[torch.float32]


@torch.no_grad()
def test_cache_sees_dtype_round_trip():
    ref, fused = make_block()
    x = torch.randn(2, 4, 8, 8)
    fused(x)
    fused.double()
    assert max_rel_error(fused(x.double()), ref.double()(x.double())) < TOL[torch.float32]
    fused.float()
    assert max_rel_error(fused(x), ref.float()(x)) < TOL[torch.float32]


_GEOMETRY_EDITS = [("stride", (2, 2)), ("padding", (0, 0)), ("dilation", (2, 2)), ("groups", 2),
                   ("padding_mode", "reflect"), ("pre_pad", (1, 0, 1, 0)), ("kernel_size", (1, 1)),
                   ("in_channels", 8), ("out_channels", 3)]


@pytest.mark.parametrize("name, value", _GEOMETRY_EDITS, ids=[n for n, _ in _GEOMETRY_EDITS])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_geometry_assignment_raises_instead_of_keeping_the_old_geometry(name, value, layout):
    """nn.Conv2d convolves with a reassigned stride / padding / ...; a FusedConv2d's routes derived theirs at the
    first call (the CPU route's oneDNN arguments and packed weight), so assigning one raises, naming it."""
    _, fused = make_block(cin=4, cout=6)
    x = torch.randn(1, 4, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    before = fused(x)
    with pytest.raises(AttributeError, match=rf"^{name}: "):
        setattr(fused, name, value)
    assert torch.equal(fused(x), before)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_activation_assignment_is_validated_and_seen(layout):
    ref, fused = make_block(act="relu")
    x = torch.randn(2, 4, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fused(x), fused(x)  # the route and its post-op derived
    fused.act = nn.SiLU()
    ref[2] = nn.SiLU()
    assert fused.act.name == "silu"
    assert max_rel_error(fused(x), ref(x)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="^activation: expected one of"):
        fused.act = "nope"
    assert max_rel_error(fused(x), ref(x)) < TOL[torch.float32]


class _Doubled(nn.Module):
    def forward(self, w):
        return 2.0 * w


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_parametrized_weight_is_computed_on_every_call(layout):
    """torch.nn.utils.parametrize moves the weight out of the module's parameters and computes it on access:
    every route then reads it as the module's attribute (it raised KeyError 'weight' on CPU before)."""
    import torch.nn.utils.parametrize as parametrize

    ref, fused = make_block()
    x = torch.randn(2, 4, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fused(x), fused(x)
    parametrize.register_parametrization(ref[0], "weight", _Doubled())
    parametrize.register_parametrization(fused, "weight", _Doubled())
    assert max_rel_error(fused(x), ref(x)) < TOL[torch.float32]
    fused.parametrizations.weight.original.mul_(-1.0)
    ref[0].parametrizations.weight.original.mul_(-1.0)
    assert max_rel_error(fused(x), ref(x)) < TOL[torch.float32]
    parametrize.remove_parametrizations(fused, "weight")
    parametrize.remove_parametrizations(ref[0], "weight")
    assert max_rel_error(fused(x), ref(x)) < TOL[torch.float32]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_pruned_weight_is_read_on_every_call(layout):
    """torch.nn.utils.prune keeps `weight_orig` as the parameter and sets `weight` as a plain tensor attribute from
    a forward pre-hook: the module's own weight parameter is gone, every call reads the attribute."""
    import torch.nn.utils.prune as prune

    ref, fused = make_block()
    x = torch.randn(2, 4, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fused(x), fused(x)
    prune.l1_unstructured(ref[0], "weight", amount=0.5)
    prune.l1_unstructured(fused, "weight", amount=0.5)
    assert max_rel_error(fused(x), ref(x)) < TOL[torch.float32]
    prune.remove(fused, "weight")
    prune.remove(ref[0], "weight")
    assert max_rel_error(fused(x), ref(x)) < TOL[torch.float32]


def test_cache_is_not_state():
    _, fused = make_block()
    fused(torch.randn(1, 4, 8, 8))
    assert set(fused.state_dict()) == {"weight", "scale", "shift"}
    assert {n for n, _ in fused.named_buffers()} == {"scale", "shift"}
    assert [n for n, _ in fused.named_parameters()] == ["weight"]


# --------------------------------------------------------------------------------------------------- repr
def test_extra_repr_shows_geometry_and_activation():
    _, fused = make_block(cin=4, cout=8, k=3, stride=2, padding=1, dilation=2, groups=2, padding_mode="reflect",
                          act="leaky_relu")
    text = repr(fused)
    for part in ("4, 8", "kernel_size=(3, 3)", "stride=(2, 2)", "padding=(1, 1)", "dilation=(2, 2)", "groups=2",
                 "padding_mode='reflect'", "leaky_relu(0.2)"):
        assert part in text, (part, text)
    plain = repr(make_block(act="identity")[1])
    assert "dilation" not in plain and "groups" not in plain and "act=identity" in plain


# ------------------------------------------------------------------------------------------- construction
@torch.no_grad()
def test_from_modules_without_bn_and_without_act():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    x = torch.randn(2, 3, 6, 6)
    assert max_rel_error(FusedConv2d.from_modules(conv)(x), conv(x)) < TOL[torch.float32]
    assert max_rel_error(FusedConv2d.from_modules(conv, None, "silu")(x), nn.functional.silu(conv(x))) < 1e-5


@pytest.mark.parametrize("k,dilation", [(3, 1), (5, 2), (1, 1), ((3, 5), (2, 1))])
@torch.no_grad()
def test_string_padding(k, dilation):
    torch.manual_seed(0)
    for padding in ("same", "valid"):
        conv = nn.Conv2d(3, 4, k, padding=padding, dilation=dilation)
        x = torch.randn(1, 3, 9, 9)
        assert max_rel_error(FusedConv2d.from_modules(conv)(x), conv(x)) < TOL[torch.float32]


def test_asymmetric_same_padding_is_refused():
    conv = nn.Conv2d(3, 4, 2, padding="same")
    with pytest.raises(ValueError, match="padding"):
        FusedConv2d.from_modules(conv)


def test_source_modules_untouched():
    ref, _ = make_block()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    FusedConv2d.from_modules(ref[0], ref[1], ref[2])
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------------ tracing
@torch.no_grad()
def test_torch_compile_fullgraph_does_not_mutate():
    ref, fused = make_block(act="silu")
    x, r = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert max_rel_error(compiled(x, r), reference_with_residual(ref, x, r)) < TOL[torch.float32]
    assert fused._fold_cache is None  # the traced call did not fill the eager cache


@torch.no_grad()
def test_torch_compile_fullgraph_half_uses_fp32_epilogue():
    ref, fused = make_block(act="relu")
    fused.half()
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert max_rel_error(compiled(x.half()), ref(x)) < TOL[torch.float16]


@torch.no_grad()
def test_torch_export():
    ref, fused = make_block(act="hardswish", padding_mode="replicate")
    x = torch.randn(2, 4, 8, 8)
    fused(x)  # a filled eager cache must not leak into the exported program
    program = torch.export.export(fused, (x,))
    assert set(program.state_dict) == {"weight", "scale", "shift"}
    x2 = torch.randn(2, 4, 8, 8)
    assert max_rel_error(program.module()(x2), ref(x2)) < TOL[torch.float32]


@pytest.mark.parametrize("stride,padding,dilation,groups", list(itertools.product([1, 2], [0, 1], [1, 2], [1, 2]))[::3])
@torch.no_grad()
def test_direct_construction_matches_reference_function(stride, padding, dilation, groups):
    """The tensor constructor against kernels.reference.conv_bn_act_ref (the op's contract)."""
    from fusedconv.kernels.reference import conv_bn_act_ref

    torch.manual_seed(stride * 8 + padding * 4 + dilation * 2 + groups)
    w = torch.randn(6, 4 // groups, 3, 3)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    m = FusedConv2d(w, scale, shift, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    activation="gelu_tanh")
    x = torch.randn(2, 4, 9, 9)
    expected = conv_bn_act_ref(x, w, scale, shift, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, activation="gelu_tanh")
    assert max_rel_error(m(x), expected) < TOL[torch.float32]


@torch.no_grad()
def test_inference_mode_modules_are_never_stale():
    """Tensors made under torch.inference_mode have no version counter: the cache is bypassed, never stale."""
    with torch.inference_mode():
        ref, fused = make_block()
        x = torch.randn(2, 4, 8, 8)
        first = fused(x)
        fused.weight.mul_(-1.0)
        assert max_rel_error(fused(x), first) > 1e-2
        assert _fused_vs_fresh(fused, x) < TOL[torch.float32]


def test_cache_filled_in_inference_mode_works_with_autograd():
    """A cache filled inside inference_mode holds inference tensors; a later autograd call must not reuse it."""
    ref, fused = make_block()
    with torch.inference_mode():
        fused(torch.randn(1, 4, 8, 8))
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    fused(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@torch.no_grad()
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ref, fused = make_block(act="silu", bias=True)
    x = torch.randn(1, 4, 8, 8)
    path = tmp_path / "fused.onnx"
    torch.onnx.export(fused, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert max_rel_error(torch.from_numpy(out), ref(x)) < 1e-5


# ---------------------------------------------------------------------------------- CUDA (marker gpu; skipped here)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "unbatched", "empty"])
@torch.no_grad()
def test_cuda_kernel_path_matches_pytorch(dtype, layout):
    ref, fused = make_block(act="silu", groups=2)
    ref, fused = ref.cuda(), fused.cuda().to(dtype)
    assert fused.scale.dtype == torch.float32 and fused.scale.is_cuda
    n = 0 if layout == "empty" else 2
    x = torch.randn(n, 4, 10, 9, device="cuda")
    r = torch.randn(n, 6, 10, 9, device="cuda")
    expected = reference_with_residual(ref.double(), x.to(dtype).double(), r.to(dtype).double())
    if layout == "channels_last":
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    if layout == "unbatched":
        x, r, expected = x[0], r[0], expected[0]
    out = fused(x.to(dtype), r.to(dtype))
    assert out.dtype == dtype and out.shape == expected.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    if out.numel():
        tol = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]  # fp32 may use TF32
        assert max_rel_error(out, expected) < tol
