"""convert_exported / convert_torchscript: aten conv -> batch_norm (-> act) (-> add -> act) chains of a
torch.export ExportedProgram (or of a TorchScript module, via torch's converter) become
torch.ops.fusedconv.conv_bn_act calls, compared with the original PyTorch model (random weights,
randomized BN statistics); chains that are not provably equivalent are left alone and reported."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import batch_norm_count, count_ops, max_rel_error, randomize_bn  # noqa: E402

from fusedconv.graph.exported import convert_exported, convert_torchscript, decompose_fused  # noqa: E402

FUSED_OP = "fusedconv.conv_bn_act.default"
TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def _targets(ep) -> Counter:
    return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def _batch_norms(ep) -> int:
    return sum(v for k, v in _targets(ep).items() if "batch_norm" in k)


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def resnet18_programs():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.resnet18(weights=None).eval(), seed=3)
    with torch.no_grad():
        ep = torch.export.export(model, (_x(1, 3, 64, 64),))
    converted, report = convert_exported(ep, check=True, return_report=True)
    return model, ep, converted, report


@torch.no_grad()
def test_resnet18_program_fused_and_equal(resnet18_programs):
    model, ep, converted, report = resnet18_programs
    assert isinstance(converted, torch.export.ExportedProgram)
    assert _batch_norms(converted) == 0, _targets(converted)
    convs = sum(v for k, v in _targets(ep).items() if "conv" in k)
    assert _targets(converted)[FUSED_OP] == convs == 20
    assert len(converted.graph.nodes) < len(ep.graph.nodes)
    assert len(report.fused) == 20 and not report.skipped
    assert report.max_rel_error is not None and report.max_rel_error < TOL[torch.float32]
    # every BasicBlock's second conv takes the residual add and the ReLU after it into the epilogue
    assert sum("add" in r.detail for r in report.fused) == 8
    # folded BN tensors are gone from the program's state
    assert not any("running_mean" in k for k in converted.state_dict)
    x = _x(1, 3, 64, 64, seed=1)
    ref = model(x)
    assert max_rel_error(converted.module()(x), ref) < TOL[torch.float32]
    counts = count_ops(converted.module(), x)  # what actually runs
    assert batch_norm_count(counts) == 0 and counts["conv_bn_act"] == 20, counts
    # the input program is untouched
    assert _batch_norms(ep) == 20
    assert max_rel_error(ep.module()(x), ref) < 1e-6


@torch.no_grad()
def test_save_load_round_trip(resnet18_programs, tmp_path):
    model, _, converted, _ = resnet18_programs
    path = tmp_path / "resnet18_fused.pt2"
    torch.export.save(converted, str(path))
    loaded = torch.export.load(str(path))
    assert _targets(loaded)[FUSED_OP] == 20 and _batch_norms(loaded) == 0
    x = _x(1, 3, 64, 64, seed=2)
    assert max_rel_error(loaded.module()(x), model(x)) < TOL[torch.float32]


class Mixed(nn.Module):
    """Every epilogue activation spelling, bias / groups / dilation / stride, a residual and a second input."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, eps=1e-3)
        self.c4, self.b4 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c5, self.b5 = nn.Conv2d(8, 8, 3, padding="same"), nn.BatchNorm2d(8)
        self.c6, self.b6 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False)
        self.c7, self.b7 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c8, self.b8 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x, y):
        a = F.leaky_relu(self.b1(self.c1(x)), 0.2)
        b = F.hardtanh(self.b2(self.c2(a)), 0.0, 6.0)
        c = F.gelu(self.b3(self.c3(b)) + a, approximate="tanh")
        d = torch.clamp(self.b5(self.c5(c)), 0, 6)
        e = F.hardswish(self.b6(self.c6(d)))
        f = torch.relu_(self.b7(self.c7(e)))
        g = F.gelu(self.b8(self.c8(f)))
        h = F.silu(self.b4(self.c4(g)))
        return h * y


def _mixed(dtype=torch.float32):
    model = randomize_bn(Mixed().eval(), seed=5)
    with torch.no_grad():  # large BN gains before the relu6 spellings, so that their cap at 6 is reached
        model.b2.weight.mul_(10.0)
        model.b5.weight.mul_(10.0)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@torch.no_grad()
def test_activations_and_conv_geometry(dtype):
    model = _mixed(dtype)
    args = (_x(2, 3, 16, 16, dtype=dtype), _x(2, 8, 8, 8, seed=1, dtype=dtype))
    ep = torch.export.export(model, args)
    converted, report = convert_exported(ep, return_report=True)
    assert len(report.fused) == 8 and not report.skipped, str(report)
    details = sorted(r.detail for r in report.fused)
    assert details == sorted(["bn+leaky_relu(0.2)", "bn+relu6", "bn+add+gelu_tanh", "bn+relu6", "bn+hardswish",
                              "bn+relu", "bn+gelu", "bn+silu"])
    assert _batch_norms(converted) == 0
    new = (_x(2, 3, 16, 16, seed=2, dtype=dtype), _x(2, 8, 8, 8, seed=3, dtype=dtype))
    assert max_rel_error(converted.module()(*new), model(*new)) < TOL[dtype]


@torch.no_grad()
def test_core_aten_program_stays_core_aten():
    model = _mixed()
    args = (_x(1, 3, 16, 16), _x(1, 8, 8, 8, seed=1))
    ep = torch.export.export(model, args).run_decompositions()
    assert any("_native_batch_norm_legit_no_training" in k for k in _targets(ep))
    converted = convert_exported(ep)
    assert converted.dialect == ep.dialect
    assert _batch_norms(converted) == 0 and _targets(converted)[FUSED_OP] == 8
    assert max_rel_error(converted.module()(*args), model(*args)) < TOL[torch.float32]


@torch.no_grad()
def test_dynamic_batch_dimension_kept():
    model = _mixed()
    batch = torch.export.Dim("batch", min=1, max=32)
    ep = torch.export.export(model, (_x(2, 3, 16, 16), _x(2, 8, 8, 8, seed=1)),
                             dynamic_shapes={"x": {0: batch}, "y": {0: batch}})
    converted = convert_exported(ep)
    assert _batch_norms(converted) == 0
    assert [(r.lower, r.upper) for r in converted.range_constraints.values()] == [(1, 32)]
    for n in (1, 5):
        args = (_x(n, 3, 16, 16, seed=n), _x(n, 8, 8, 8, seed=n + 1))
        assert max_rel_error(converted.module()(*args), model(*args)) < TOL[torch.float32]


@torch.no_grad()
def test_without_stored_example_inputs(monkeypatch):
    """Programs without stored example inputs (older saves) are re-exported with zeros of their input shapes."""
    model = _mixed()
    args = (_x(1, 3, 16, 16), _x(1, 8, 8, 8, seed=1))
    ep = torch.export.export(model, args)
    monkeypatch.setattr(type(ep), "example_inputs", property(lambda self: None))
    converted = convert_exported(ep)
    assert _targets(converted)[FUSED_OP] == 8
    assert max_rel_error(converted.module()(*args), model(*args)) < TOL[torch.float32]


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


class Awkward(nn.Module):
    """Chains that may only be fused in part, or not at all."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c4, self.b4 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c5 = nn.Conv2d(4, 4, 1)
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        a = self.b1(self.c1(x))                      # BN value read twice: conv+bn fused, act / add not
        a = torch.relu(a) + a.sum()
        b = F.relu(self.b2(self.c2(a)) + self.bias)   # broadcasting add: conv+bn fused, add stays
        w = self.c3.weight * 1.0                     # computed weight: not a program constant
        c = self.b3(F.conv2d(b, w, self.c3.bias, padding=1))
        d = torch.sigmoid(self.b4(self.c4(c)))       # not an epilogue activation: conv+bn fused
        return self.c5(d)                            # no BN at all


@torch.no_grad()
def test_conv_output_used_twice_left_alone():
    model = randomize_bn(ConvUsedTwice().eval())
    x = _x(1, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    converted, report = convert_exported(ep, return_report=True)
    assert not report.fused and len(report.skipped) == 1
    assert "used by 2 nodes" in report.skipped[0].detail
    assert converted is ep and _batch_norms(converted) == 1
    assert max_rel_error(converted.module()(x), model(x)) < 1e-7


@torch.no_grad()
def test_partial_chains_reported():
    model = randomize_bn(Awkward().eval(), seed=2)
    x = _x(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    converted, report = convert_exported(ep, return_report=True)
    fused = sorted(r.detail for r in report.fused)
    assert fused[0] == "bn" and fused[1] == "bn" and fused[2].startswith("bn (add not fused:")
    assert "broadcast" in fused[2]
    reasons = " | ".join(r.detail for r in report.skipped)
    assert "conv weight is not a parameter or buffer" in reasons
    assert "not followed by an inference batch norm" in reasons
    assert _batch_norms(converted) == 1 and _targets(converted)[FUSED_OP] == 3
    x2 = _x(2, 3, 8, 8, seed=9)
    assert max_rel_error(converted.module()(x2), model(x2)) < TOL[torch.float32]


@torch.no_grad()
def test_unfoldable_statistics_left_alone():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval())
    model[1].running_var[0] = -1.0  # var + eps < 0: no real scale exists
    ep = torch.export.export(model, (_x(1, 3, 8, 8),))
    converted, report = convert_exported(ep, return_report=True)
    assert converted is ep and not report.fused
    assert "running_var" in report.skipped[0].detail and report.skipped[0].nodes[0] == "conv2d"


@torch.no_grad()
def test_inplace_add_into_residual_not_fused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            r = x * 2.0
            r += self.b1(self.c1(x))   # writes into r: the add cannot become the op's output
            return torch.relu(r)

    model = randomize_bn(M().eval())
    x = _x(1, 4, 8, 8)
    ep = torch.export.export(model, (x,))
    converted, report = convert_exported(ep, return_report=True)
    assert len(report.fused) == 1 and "add not fused" in report.fused[0].detail, str(report)
    assert max_rel_error(converted.module()(x), model(x)) < TOL[torch.float32]


def test_training_mode_batch_norm_left_alone():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train())
    ep = torch.export.export(model, (_x(2, 3, 8, 8),))
    converted, report = convert_exported(ep, return_report=True)
    assert converted is ep and "training mode" in report.skipped[0].detail


@torch.no_grad()
def test_self_check_catches_a_wrong_fold(monkeypatch):
    import fusedconv.graph.exported_rewrite as exported  # where the BN statistics are folded

    real = exported.bn_scale_shift

    def off_by_a_bit(*args, **kwargs):
        scale, shift = real(*args, **kwargs)
        return scale, shift + 0.05

    monkeypatch.setattr(exported, "bn_scale_shift", off_by_a_bit)
    model = _mixed()
    ep = torch.export.export(model, (_x(1, 3, 16, 16), _x(1, 8, 8, 8, seed=1)))
    with pytest.raises(RuntimeError, match="outputs differ from the original's"):
        convert_exported(ep, check=True)


def test_rejects_a_module():
    with pytest.raises(TypeError, match="ep: expected a torch.export.ExportedProgram.*got ConvUsedTwice"):
        convert_exported(ConvUsedTwice())


class WritesInput(nn.Module):
    """The conv's input is written in place after the conv read it and before the chain ends."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = x * 1.0
        y = self.bn(self.conv(h))
        h.mul_(3.0)
        return torch.relu(y) + h


class WritesOtherBranch(nn.Module):
    """An in-place activation on the residual's branch runs inside the chain's span, before the add reads it."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        p = self.c2(x)
        a = torch.relu_(self.b1(self.c1(x)))
        return torch.relu(self.b2(p) + a)


@torch.no_grad()
def test_write_into_chain_input_left_alone():
    model = randomize_bn(WritesInput().eval())
    x = _x(1, 4, 8, 8)
    ep = torch.export.export(model, (x,))
    converted, report = convert_exported(ep, return_report=True)
    assert not report.fused and "writes into an input of the chain" in report.skipped[0].detail, str(report)
    assert max_rel_error(converted.module()(x), model(x)) < 1e-7


@torch.no_grad()
def test_write_before_the_residual_is_read_is_fine():
    model = randomize_bn(WritesOtherBranch().eval())
    x = _x(1, 4, 8, 8)
    ep = torch.export.export(model, (x,))
    converted, report = convert_exported(ep, return_report=True)
    assert len(report.fused) == 2 and not report.skipped, str(report)
    assert "bn+add+relu" in {r.detail for r in report.fused}
    assert max_rel_error(converted.module()(x), model(x)) < TOL[torch.float32]


# torch.jit.* warn that TorchScript is deprecated: these tests use it on purpose.
@pytest.mark.filterwarnings("ignore::FutureWarning")
@torch.no_grad()
def test_torchscript_file_traced_resnet18(resnet18_programs, tmp_path):
    model = resnet18_programs[0]
    x = _x(2, 3, 64, 64)
    path = tmp_path / "resnet18_traced.pt"
    torch.jit.save(torch.jit.trace(model, (x,)), str(path))
    converted, report = convert_torchscript(str(path), (x,), check=True, return_report=True)
    assert isinstance(converted, torch.export.ExportedProgram)
    assert len(report.fused) == 20 and _batch_norms(converted) == 0
    x2 = _x(3, 3, 48, 56, seed=4)  # the converter keeps batch (example size 2) and H, W dynamic
    assert max_rel_error(converted.module()(x2), model(x2)) < TOL[torch.float32]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@torch.no_grad()
def test_torchscript_scripted_module():
    model = _mixed()
    args = (_x(2, 3, 16, 16), _x(2, 8, 8, 8, seed=1))
    converted, report = convert_torchscript(torch.jit.script(model), args, return_report=True)
    assert len(report.fused) == 8 and _batch_norms(converted) == 0, str(report)
    new = (_x(2, 3, 16, 16, seed=2), _x(2, 8, 8, 8, seed=3))
    assert max_rel_error(converted.module()(*new), model(*new)) < TOL[torch.float32]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="path_or_module: expected a TorchScript file.*no such file"):
        convert_torchscript(str(tmp_path / "missing.pt"), (_x(1, 3, 8, 8),))
    not_ts = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, str(not_ts))
    with pytest.raises(ValueError, match="torch.jit.load cannot read"):
        convert_torchscript(str(not_ts), (_x(1, 3, 8, 8),))
    with pytest.raises(TypeError, match="path_or_module: expected .* got Mixed"):
        convert_torchscript(Mixed(), (_x(1, 3, 8, 8),))
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())
    with pytest.raises(RuntimeError, match="expected a TorchScript module in eval mode"):
        convert_torchscript(scripted, (_x(1, 3, 8, 8),))


@pytest.mark.filterwarnings("ignore")
@torch.no_grad()
def test_decomposed_program_exports_to_onnx(tmp_path):
    """The op has no ONNX translation; decompose_fused spells it in aten ops that onnxruntime runs."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()).eval())
    x = _x(1, 3, 8, 8)
    converted = convert_exported(torch.export.export(model, (x,)))
    plain = decompose_fused(converted)
    assert FUSED_OP not in _targets(plain) and _batch_norms(plain) == 0
    path = str(tmp_path / "fused.onnx")
    torch.onnx.export(plain, (x,), path, dynamo=True, verbose=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert max_rel_error(torch.from_numpy(got), model(x)) < TOL[torch.float32]
