"""State round-trips of FusedConv2d and converted models (issue 7 item 5).

state_dict -> torch.save -> torch.load(weights_only=True) -> a freshly built module; pickle / deepcopy of the
module and of converted models; converting twice is a no-op; a converted state_dict loads into a freshly
converted copy; fused and unfused checkpoints are never loaded into the other architecture silently.
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.activations import ActivationSpec  # noqa: E402
from fusedconv.modules import FusedConv2d, check_state_dict  # noqa: E402


def small_model(seed: int = 0) -> nn.Sequential:
    """Conv-BN-act chains in plain Sequentials (fusable by every version of convert), random BN statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 4, 1, bias=True), nn.BatchNorm2d(4),
    )
    return randomize_bn(model, seed).eval()


class ResidualBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x), written with attributes like torchvision's BasicBlock."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def residual_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          ResidualBlock(8), ResidualBlock(8))
    return randomize_bn(model, seed).eval()


def fresh_fused(seed: int = 0) -> FusedConv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    bn = nn.BatchNorm2d(6)
    randomize_bn(nn.Sequential(bn), seed)
    return FusedConv2d.from_modules(conv, bn.eval(), nn.LeakyReLU(0.3))


def save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@torch.no_grad()
def test_state_dict_weights_only_round_trip_into_fresh_module():
    source, target = fresh_fused(1), fresh_fused(2)
    x = torch.randn(2, 4, 9, 9)
    assert max_rel_error(target(x), source(x)) > 1e-3  # different seeds: the test can fail
    state = save_load(source.state_dict())
    assert set(state) == {"weight", "scale", "shift"}
    target.load_state_dict(state)
    assert torch.equal(target(x), source(x))


@torch.no_grad()
def test_state_dict_of_half_module_keeps_fp32_scale():
    source = fresh_fused(1).half()
    state = save_load(source.state_dict())
    assert state["scale"].dtype == state["shift"].dtype == torch.float32
    target = fresh_fused(2).half()
    target.load_state_dict(state)
    assert target.scale.dtype == torch.float32 and torch.equal(target.scale, source.scale)
    # A checkpoint whose scale was cast to fp16 by someone else still loads into fp32 scale/shift.
    target.load_state_dict({k: v.half() for k, v in state.items()})
    assert target.scale.dtype == torch.float32


@pytest.mark.parametrize("clone", ["pickle", "deepcopy", "torch.save"])
@torch.no_grad()
def test_module_pickle_and_deepcopy(clone):
    source = fresh_fused(3)
    x = torch.randn(1, 4, 8, 8)
    expected = source(x)  # fills the cache, which must survive or be rebuilt correctly
    if clone == "pickle":
        copy_ = pickle.loads(pickle.dumps(source))
    elif clone == "deepcopy":
        copy_ = copy.deepcopy(source)
    else:
        buffer = io.BytesIO()
        torch.save(source, buffer)
        buffer.seek(0)
        copy_ = torch.load(buffer, weights_only=False)
    assert isinstance(copy_.act, ActivationSpec) and copy_.act == ActivationSpec("leaky_relu", 0.3)
    assert torch.equal(copy_(x), expected)
    # The copy is independent: editing it does not change the source, and its own cache follows the edit.
    copy_.weight.mul_(2.0)
    assert torch.equal(source(x), expected)
    assert not torch.equal(copy_(x), expected)


@pytest.mark.parametrize("build", [small_model, residual_model], ids=["sequential", "residual"])
@torch.no_grad()
def test_converted_model_round_trips(build):
    model = build()
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    converted = fusedconv.convert(model)
    assert sum(isinstance(m, FusedConv2d) for m in converted.modules()) >= 3
    for clone in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert max_rel_error(clone(x), expected) < 1e-5
    # The state_dict of a converted model loads (weights_only) into a freshly converted copy of the same
    # architecture with other weights, and reproduces the outputs exactly.
    other = fusedconv.convert(build(seed=7))
    assert max_rel_error(other(x), expected) > 1e-3
    other.load_state_dict(save_load(converted.state_dict()))
    assert torch.equal(other(x), converted(x))


@pytest.mark.parametrize("build", [small_model, residual_model], ids=["sequential", "residual"])
@torch.no_grad()
def test_converting_twice_is_a_no_op(build):
    model = build()
    x = torch.randn(1, 3, 8, 8)
    once, report_once = fusedconv.convert(model, return_report=True)
    twice, report_twice = fusedconv.convert(once, return_report=True)
    assert len(report_once.fused) >= 3
    assert len(report_twice.fused) == 0
    # Same structure and the same generated code (class names: see the test below).
    assert [(n, _kind(m)) for n, m in twice.named_modules()] == [(n, _kind(m)) for n, m in once.named_modules()]
    assert [m.code for m in twice.modules() if hasattr(m, "graph")] == \
        [m.code for m in once.modules() if hasattr(m, "graph")]
    for (name_a, a), (name_b, b) in zip(once.state_dict().items(), twice.state_dict().items()):
        assert name_a == name_b and torch.equal(a, b)
    assert torch.equal(twice(x), once(x))
    # In place as well: the second pass leaves the very same module objects.
    before = [id(m) for m in once.modules()]
    fusedconv.convert(once, inplace=True)
    assert [id(m) for m in once.modules()] == before


def _kind(module: nn.Module) -> str:
    """A module's class name, with every fx GraphModule (whatever name it carries) reported as 'GraphModule'."""
    return "GraphModule" if isinstance(module, torch.fx.GraphModule) else type(module).__name__


@torch.no_grad()
def test_converting_twice_keeps_class_names():
    once = fusedconv.convert(residual_model())
    twice = fusedconv.convert(once)
    assert [type(m).__name__ for m in twice.modules()] == [type(m).__name__ for m in once.modules()]
    assert "ResidualBlock" in [type(m).__name__ for m in once.modules()]


@torch.no_grad()
def test_pickled_converted_model_keeps_class_names_and_outputs():
    once = fusedconv.convert(residual_model())
    back = pickle.loads(pickle.dumps(once))
    assert [type(m).__name__ for m in back.modules()] == [type(m).__name__ for m in once.modules()]
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(back(x), once(x), rtol=0, atol=0)


@torch.no_grad()
def test_fused_state_dict_into_unfused_model_fails_clearly():
    fused_state = fusedconv.convert(small_model()).state_dict()
    unfused = small_model(seed=5)
    with pytest.raises(RuntimeError, match=r"0\.scale"):  # PyTorch's own strict check lists the keys
        unfused.load_state_dict(fused_state)
    # strict=False would load the raw conv weight silently; the helper refuses it with a clear message.
    with pytest.raises(ValueError, match=r"state_dict.*FusedConv2d.*'0'.*Conv2d.*convert"):
        check_state_dict(unfused, fused_state)


@torch.no_grad()
def test_unfused_state_dict_into_converted_model_fails_clearly():
    unfused_state = small_model(seed=5).state_dict()
    converted = fusedconv.convert(small_model())
    for strict in (True, False):  # never a silent partial load, even with strict=False
        with pytest.raises(RuntimeError, match=r"state_dict: expected a FusedConv2d state.*convert"):
            converted.load_state_dict(unfused_state, strict=strict)
    with pytest.raises(ValueError, match=r"state_dict: expected a converted checkpoint.*0\.scale"):
        check_state_dict(converted, unfused_state)


def test_check_state_dict_accepts_matching_pairs():
    model = small_model()
    converted = fusedconv.convert(model)
    check_state_dict(model, model.state_dict())
    check_state_dict(converted, converted.state_dict())
    with pytest.raises(TypeError, match="model"):
        check_state_dict("not a model", {})
    with pytest.raises(TypeError, match="state_dict"):
        check_state_dict(model, [1, 2])


def test_non_finite_scale_in_a_checkpoint_is_refused():
    state = fresh_fused(1).state_dict()
    state["shift"] = state["shift"].clone()
    state["shift"][0] = float("nan")
    target = fresh_fused(2)
    with pytest.raises(RuntimeError, match=r"shift: expected finite values, got 1 non-finite"):
        target.load_state_dict(state)
