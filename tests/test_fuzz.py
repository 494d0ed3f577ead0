"""Property-based fuzzing (issue 7 item 2) with hypothesis, fixed seed (derandomize=True), tiny shapes.

1. The Triton launcher `fusedconv.kernels.conv_bn_act` under TRITON_INTERPRET=1 (this test runs in the
   conftest's interpreter child) against the float64 `kernels.reference.conv_bn_act_ref` computed from the same
   dtype-rounded tensors: random kernel sizes, strides, paddings, dilations, groups (incl. depthwise and
   channel multipliers), channel counts, spatial sizes (incl. 1 and primes), batch, memory layout (NCHW,
   channels_last, sliced views), activation, residual, split-K and fp32/fp16 — KERNEL_EXAMPLES examples.
2. `fusedconv.convert` on randomly generated models (plain Sequential chains, modules calling functional
   activations, residual blocks; random BN statistics) against the unconverted model, plus FusedConv2d's
   fallback (fp32 / fp16 / bf16, any layout, unbatched, empty batch) against float64 nn modules.

The number of kernel examples run is written to the terminal (and checked to be >= 200) by a companion test
in the parent process, so the CI log shows it. A failure that hypothesis finds is shrunk to a minimal example
that is printed; such cases become regular tests at the end of this file.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

from fusedconv.kernels.reference import ACTIVATIONS, conv_bn_act_ref  # noqa: E402

KERNEL_EXAMPLES = 220
CONVERT_EXAMPLES = 40
MODULE_EXAMPLES = 60
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}
SPATIAL = [1, 2, 3, 5, 7, 11, 13]

# The kernel fuzz runs in the TRITON_INTERPRET=1 child; it reports its example count through this file, whose
# path the parent chooses at import time (the child inherits the environment).
_COUNT_ENV = "FUSEDCONV_FUZZ_COUNT_FILE"
if not os.environ.get(_COUNT_ENV) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    # Only a name: the file exists only once the child has written it (the companion test deletes it).
    os.environ[_COUNT_ENV] = os.path.join(tempfile.gettempdir(), f"fusedconv-fuzz-count-{os.getpid()}.json")
    Path(os.environ[_COUNT_ENV]).unlink(missing_ok=True)  # never read a count left by an earlier process

FUZZ_SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _terminal(capsys, line: str) -> None:
    """Write a line straight to the terminal (shown with -q and output capture on, so it lands in the CI log)."""
    with capsys.disabled():
        print(line)


# ----------------------------------------------------------------------------------------------- kernel fuzz
@st.composite
def conv_problems(draw):
    """One launcher call: geometry that always yields an output of at least 1x1, and its options."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "depthwise_multiplier"]))
    if kind == "dense":
        groups, cin_g, cout_g = 1, draw(st.integers(1, 20)), draw(st.integers(1, 20))
    elif kind == "grouped":
        groups, cin_g, cout_g = draw(st.integers(2, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    elif kind == "depthwise":
        groups, cin_g, cout_g = draw(st.integers(1, 12)), 1, 1
    else:
        groups, cin_g, cout_g = draw(st.integers(2, 6)), 1, draw(st.integers(2, 3))
    h, w = draw(st.sampled_from(SPATIAL)), draw(st.sampled_from(SPATIAL))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding, kernel = [], []
    for size, dil in zip((h, w), dilation):
        pad = draw(st.integers(0, 2))
        max_k = min(5, (size + 2 * pad - 1) // dil + 1)  # the dilated kernel fits the padded input
        kernel.append(draw(st.integers(1, max_k)))
        padding.append(pad)
    activation = draw(st.sampled_from(ACTIVATIONS))
    return dict(
        n=draw(st.integers(1, 3)), cin=groups * cin_g, cout=groups * cout_g, h=h, w=w, kernel=tuple(kernel),
        stride=stride, padding=tuple(padding), dilation=dilation, groups=groups,
        layout=draw(st.sampled_from(["nchw", "channels_last", "sliced", "channels_last_sliced"])),
        activation=activation,
        act_param=draw(st.sampled_from([0.01, 0.2, 1.5])) if activation == "leaky_relu" else 0.0,
        residual=draw(st.booleans()),
        residual_layout=draw(st.sampled_from(["nchw", "channels_last", "transposed"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        split_k=draw(st.sampled_from([None, None, None, 2, 3])),
        seed=draw(st.integers(0, 2**16)),
    )


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (channels_last, a sliced view, a transposed view)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout in ("sliced", "channels_last_sliced"):
        n, c, h, w = t.shape
        big = t.new_zeros(n, c + 2, h + 1, 2 * w)
        if layout == "channels_last_sliced":
            big = big.contiguous(memory_format=torch.channels_last)
        view = big[:, 1:c + 1, 1:, ::2]
        view.copy_(t)
        return view
    return t


def build_problem(p: dict):
    g = torch.Generator().manual_seed(p["seed"])
    dtype = p["dtype"]
    fan_in = (p["cin"] // p["groups"]) * p["kernel"][0] * p["kernel"][1]
    x = torch.randn(p["n"], p["cin"], p["h"], p["w"], generator=g).to(dtype)
    weight = (torch.randn(p["cout"], p["cin"] // p["groups"], *p["kernel"], generator=g) / fan_in ** 0.5).to(dtype)
    scale = torch.rand(p["cout"], generator=g) + 0.5
    shift = torch.randn(p["cout"], generator=g) * 0.5
    geometry = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"])
    truth_no_res = conv_bn_act_ref(x.double(), weight.double(), scale.double(), shift.double(),
                                   activation="identity", **geometry)
    residual = None
    if p["residual"]:
        residual = torch.randn(truth_no_res.shape, generator=g).to(dtype)
    truth = conv_bn_act_ref(x.double(), weight.double(), scale.double(), shift.double(),
                            activation=p["activation"], act_param=p["act_param"],
                            residual=None if residual is None else residual.double(), **geometry)
    if residual is not None:
        residual = _layout(residual, p["residual_layout"])
    return _layout(x, p["layout"]), weight, scale, shift, residual, geometry, truth


def check_kernel_problem(p: dict) -> None:
    from fusedconv.kernels import conv_bn_act

    x, weight, scale, shift, residual, geometry, truth = build_problem(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow inside the interpreter's exp
        out = conv_bn_act(x, weight, scale, shift, activation=p["activation"], act_param=p["act_param"],
                          residual=residual, split_k=p["split_k"], **geometry)
    assert out.dtype == p["dtype"] and out.shape == truth.shape, (out.dtype, tuple(out.shape), tuple(truth.shape))
    # Relative to max|truth|, floored at 0.1 so an output that is ~0 everywhere (relu of negatives) is not
    # judged on rounding noise; values here are O(1) by construction.
    err = float((out.double() - truth).abs().max()) / max(float(truth.abs().max()), 0.1)
    assert err <= TOLERANCE[p["dtype"]], f"max rel error {err:.3g} > {TOLERANCE[p['dtype']]:g} for {p}"


@pytest.mark.interpret
def test_kernel_fuzz_against_reference(capsys):
    count = {"examples": 0}

    @settings(max_examples=KERNEL_EXAMPLES, **FUZZ_SETTINGS)
    @given(problem=conv_problems())
    def check(problem):
        count["examples"] += 1
        check_kernel_problem(problem)

    check()
    path = os.environ.get(_COUNT_ENV)
    if path:
        with open(path, "w") as f:
            json.dump(count, f)
    _terminal(capsys, f"\n[fuzz] kernel vs reference under TRITON_INTERPRET=1: {count['examples']} examples, "
                              "0 failures")
    assert count["examples"] >= 200


def test_kernel_fuzz_example_count(request, capsys, interpret_child_finished):
    """Parent side: report how many examples the interpreter child ran (the CI log shows this line)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter run reports its own count")
    selected = any(item.name == "test_kernel_fuzz_against_reference" for item in request.session.items)
    if not selected:
        pytest.skip("the kernel fuzz test was not selected")
    path = os.environ.get(_COUNT_ENV)
    text = Path(path).read_text() if path and Path(path).exists() else ""
    if path:
        Path(path).unlink(missing_ok=True)
    if not text.strip():
        pytest.fail("the kernel fuzz did not record an example count (did it fail or not run?)")
    examples = json.loads(text)["examples"]
    _terminal(capsys, f"\n[fuzz] kernel vs reference under TRITON_INTERPRET=1: {examples} examples, "
                              "0 failures")
    assert examples >= 200


# ---------------------------------------------------------------------------------------------- module fuzz
ACT_MODULES = {
    "identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": lambda: nn.LeakyReLU(0.15),
    "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


@st.composite
def block_specs(draw, cin: int, size: int = 3):
    """(cout, Conv2d kwargs, activation name) of one block valid for a `size` x `size` input (>= 1 output;
    reflect padding only where the input is larger than the padding, as PyTorch requires)."""
    kind = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
    if kind == "depthwise":
        cout, groups = cin, cin
    elif kind == "grouped" and cin % 2 == 0:
        cout, groups = 2 * draw(st.integers(1, 4)), 2
    else:
        cout, groups = draw(st.integers(1, 8)), 1
    k = draw(st.sampled_from([1, 3]))
    modes = ["zeros", "zeros", "reflect"] if size > k // 2 else ["zeros"]
    return cout, dict(kernel_size=k, padding=k // 2, stride=draw(st.sampled_from([1, 1, 2])), groups=groups,
                      bias=draw(st.booleans()), padding_mode=draw(st.sampled_from(modes))), \
        draw(st.sampled_from(sorted(ACT_MODULES)))


class Residual(nn.Module):
    """act(body(x) + x): a residual block written as a module with its own forward."""

    def __init__(self, body: nn.Module, act: nn.Module):
        super().__init__()
        self.body = body
        self.act = act

    def forward(self, x):
        return self.act(self.body(x) + x)


FUNCTIONAL_ACTS = {"relu": torch.relu, "silu": nn.functional.silu, "relu6": nn.functional.relu6,
                   "gelu": nn.functional.gelu, "identity": lambda t: t}


class ConvBNFunctional(nn.Module):
    """F.act(bn(conv(x))) with the activation called as a function in forward (found by tracing only)."""

    def __init__(self, cin, cout, conv_kwargs, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, **conv_kwargs)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        return FUNCTIONAL_ACTS[self.act](self.bn(self.conv(x)))


def conv_bn_act(cin, cout, conv_kwargs, act):
    return nn.Sequential(nn.Conv2d(cin, cout, **conv_kwargs), nn.BatchNorm2d(cout), ACT_MODULES[act]())


@st.composite
def models(draw):
    cin = draw(st.integers(1, 6))
    input_size = size = draw(st.sampled_from([3, 5, 8]))
    channels = cin
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["sequential", "functional", "residual"]))
        if kind in ("sequential", "functional"):
            cout, kw, act = draw(block_specs(channels, size))
            if kind == "sequential":
                layers.append(conv_bn_act(channels, cout, kw, act))
            else:
                layers.append(ConvBNFunctional(channels, cout, kw, draw(st.sampled_from(sorted(FUNCTIONAL_ACTS)))))
            channels = cout
            size = (size - 1) // kw["stride"] + 1  # 'same' padding: only the stride changes the size
        else:  # residual block: two convs keeping channels and size
            mid = draw(st.integers(1, 6))
            body = nn.Sequential(
                conv_bn_act(channels, mid, dict(kernel_size=3, padding=1, bias=False), draw(st.sampled_from(["relu", "silu"]))),
                nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels))
            layers.append(Residual(body, ACT_MODULES[draw(st.sampled_from(["relu", "identity", "hardswish"]))]()))
    return cin, nn.Sequential(*layers), draw(st.integers(0, 2**16)), input_size


@settings(max_examples=CONVERT_EXAMPLES, **FUZZ_SETTINGS)
@given(spec=models())
@torch.no_grad()
def test_convert_fuzz_random_models(spec):
    import fusedconv
    from fusedconv.modules import FusedConv2d

    cin, model, seed, size = spec
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=(1.0 / (m.weight[0].numel())) ** 0.5)
    randomize_bn(model, seed).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, cin, size, size)
    expected = model(x)
    converted = fusedconv.convert(model)
    out = converted(x)
    assert out.shape == expected.shape
    assert max_rel_error(out, expected) < 1e-5
    # The input model is untouched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Every Conv -> BN chain of a plain Sequential is fused (what every version of convert guarantees).
    for seq in converted.modules():
        if type(seq) is nn.Sequential:
            kids = list(seq.children())
            for a, b in zip(kids, kids[1:]):
                assert not (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)), "unfused chain left"
    assert any(isinstance(m, FusedConv2d) for m in converted.modules())


@settings(max_examples=MODULE_EXAMPLES, **FUZZ_SETTINGS)
@given(spec=block_specs(4), act=st.sampled_from(sorted(ACT_MODULES)), n=st.integers(0, 3),
       hw=st.tuples(st.sampled_from(SPATIAL[2:]), st.sampled_from(SPATIAL[2:])),
       layout=st.sampled_from(["nchw", "channels_last", "sliced", "unbatched"]), residual=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
@torch.no_grad()
def test_fused_module_fallback_fuzz(spec, act, n, hw, layout, residual, dtype, seed):
    from fusedconv.modules import FusedConv2d

    cout, conv_kwargs, _ = spec
    torch.manual_seed(seed)
    ref = conv_bn_act(4, cout, conv_kwargs, act)
    randomize_bn(ref, seed).eval()
    fused = FusedConv2d.from_modules(*ref).to(dtype)
    # The truth: the same nn modules in float64, with the conv weight rounded to `dtype` as the module holds it.
    ref64 = copy.deepcopy(ref).double()
    ref64[0].weight.copy_(ref[0].weight.to(dtype))
    x = torch.randn(max(n, 1) if layout == "unbatched" else n, 4, *hw).to(dtype)
    expected_main = ref64[1](ref64[0](x.double()))
    r = torch.randn(expected_main.shape).to(dtype) if residual else None
    expected = ref64[2](expected_main + r.double()) if residual else ref64[2](expected_main)
    if layout == "unbatched":
        x, r, expected = x[0], None if r is None else r[0], expected[0]
    elif layout != "nchw":
        x = _layout(x, layout)
    out = fused(x, r)
    assert out.dtype == dtype and out.shape == expected.shape
    if out.numel():
        tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
        assert max_rel_error(out, expected) < tol


# ------------------------------------------------------------------------- minimised failures (regular tests)
# (Cases found by the fuzzers above, shrunk by hypothesis, kept here as plain regression tests.)
