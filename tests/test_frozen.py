"""convert(model, freeze=True) (fusedconv/frozen.py): the same function as the model at convert time, its own copy
out of reach, per-forward checks only of what lies outside that copy (class-level code, global hooks, grad mode,
the fast path switch), and every way a user could reach its state refused or empty."""

from __future__ import annotations

import copy
import io
import os
import re
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu  # noqa: E402
from fusedconv.cpu_boundary import layout_used  # noqa: E402
from fusedconv.graph.flat import conjuncts, flat_check, frozen_check_source  # noqa: E402
from fusedconv.graph.model_code import ClassAttrRef, ClassNamespace  # noqa: E402

torchvision = pytest.importorskip("torchvision")

SIZE = (1, 3, 64, 64)


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mobilenet(dtype=torch.float32):
    # BN statistics measured on an example: with blind ones mobilenet_v2's output hardly depends on its early layers
    example = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(99))
    return randomize_bn(torchvision.models.mobilenet_v2(weights=None), example=example).eval().to(dtype)


def _resnet18(dtype=torch.float32):
    return randomize_bn(torchvision.models.resnet18(weights=None)).eval().to(dtype)


class Head(nn.Module):
    """Reads a class attribute and calls a method of its class: class-level terms of the frozen check."""

    gain = 2.0

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def post(self, y):
        return y * self.gain

    def forward(self, x):
        return self.post(torch.relu(self.bn(self.conv(x)))) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = Head()

    def forward(self, x):
        return self.head(self.stem(x))


def _run(model, x, times=1):
    with torch.no_grad():
        for _ in range(times):
            y = model(x)
    return y


@pytest.mark.parametrize("build", [_mobilenet, _resnet18], ids=["mobilenet_v2", "resnet18"])
def test_frozen_model_computes_the_original_in_float64(build):
    model = build(torch.float64)
    x = _x(*SIZE, dtype=torch.float64)
    frozen, report = fusedconv.convert(model, freeze=True, example_inputs=x, return_report=True)
    assert isinstance(frozen, fusedconv.FrozenModel) and report.fused
    assert flat_check(frozen._model).frozen
    ref = _run(model, x)
    for _ in range(4):  # the first calls route and keep the states, the later ones run frozen
        assert max_rel_error(_run(frozen, x), ref) < 1e-12
    assert max_rel_error(_run(frozen, _x(2, 3, 48, 48, seed=3, dtype=torch.float64)),
                         _run(model, _x(2, 3, 48, 48, seed=3, dtype=torch.float64))) < 1e-12


def test_frozen_forward_keeps_its_states_and_calls_the_layers_directly(onednn_small_convs, module_calls):
    model = _mobilenet()
    frozen, converted = fusedconv.convert(model, freeze=True), fusedconv.convert(model)
    x = _x(*SIZE, seed=1)
    y = _run(frozen, x, times=3)
    leaves = flat_check(frozen._model).fused
    with torch.no_grad():
        kept = leaves.states()
        assert leaves.states() is kept and sum(s is not None for s in kept) == len(leaves.fused)
    calls = module_calls[0]
    assert torch.equal(_run(frozen, x), y)
    assert module_calls[0] == calls  # every fused layer called directly
    assert max_rel_error(y, _run(converted, x)) < 1e-6
    assert layout_used(frozen, x) == layout_used(converted, x) == "channels_last"


@pytest.mark.parametrize("edit", ["bn_statistics", "conv_weight", "layer_replaced", "hook"])
def test_later_edits_of_the_model_are_not_seen(edit):
    model = _resnet18()
    x = _x(*SIZE, seed=2)
    frozen = fusedconv.convert(model, freeze=True)
    before = _run(frozen, x, times=3)
    hooked = []
    with torch.no_grad():
        if edit == "bn_statistics":
            model.layer1[0].bn1.running_var.mul_(4.0)
        elif edit == "conv_weight":
            model.layer2[0].conv1.weight.mul_(-1.0)
        elif edit == "layer_replaced":
            model.layer3[1].conv2 = nn.Conv2d(256, 256, 3, padding=1, bias=False)
        else:
            model.layer1[1].register_forward_hook(lambda m, args, out: hooked.append(1) or out * 2.0)
    assert torch.equal(_run(frozen, x), before) and not hooked
    assert max_rel_error(_run(model, x), before) > 1e-3  # the edit did change the original


def test_class_level_patches_are_seen(monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval().double()
    x = _x(1, 3, 16, 16, dtype=torch.float64)
    frozen = fusedconv.convert(model, freeze=True)
    source, _ = frozen_check_source(flat_check(frozen._model).src, flat_check(frozen._model).expect)
    assert "'post'" in source and "'gain'" in source
    assert max_rel_error(_run(frozen, x, times=3), _run(model, x)) < 1e-12
    monkeypatch.setattr(Head, "post", lambda self, y: y - 1.0)
    assert max_rel_error(_run(frozen, x), _run(model, x)) < 1e-12
    monkeypatch.undo()
    monkeypatch.setattr(Head, "gain", -3.0)
    assert max_rel_error(_run(frozen, x), _run(model, x)) < 1e-12


def test_global_hooks_grad_mode_and_the_fast_path_switch_are_seen(onednn_small_convs, module_calls, monkeypatch):
    frozen = fusedconv.convert(_mobilenet(), freeze=True)
    x = _x(*SIZE, seed=4)
    y = _run(frozen, x, times=3)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(type(m)))
    try:
        assert max_rel_error(_run(frozen, x), y) < 1e-6
    finally:
        handle.remove()
    assert fusedconv.FusedConv2d in seen
    # The other routes (the differentiable fallback, F.conv2d) round differently in float32: 1e-4, not exact.
    calls = module_calls[0]
    with torch.enable_grad():
        assert max_rel_error(frozen(x).detach(), y) < 1e-4
    assert module_calls[0] > calls
    monkeypatch.setattr(cpu, "enabled", False)
    calls = module_calls[0]
    assert max_rel_error(_run(frozen, x), y) < 1e-4
    assert module_calls[0] > calls


def test_frozen_model_has_no_reachable_state_and_refuses_to_move():
    frozen = fusedconv.convert(_mobilenet(), freeze=True)
    assert list(frozen.parameters()) == [] and list(frozen.buffers()) == [] and not frozen.state_dict()
    assert list(frozen.modules()) == [frozen]
    assert "MobileNetV2, frozen" in repr(frozen)
    for move in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.float(), lambda m: m.train()):
        with pytest.raises(RuntimeError, match="frozen"):
            move(frozen)
    assert frozen.eval() is frozen
    with pytest.raises(TypeError, match="mode"):
        frozen.train("no")


def test_convert_freeze_arguments():
    model = _mobilenet()
    with pytest.raises(TypeError, match="freeze"):
        fusedconv.convert(model, freeze=1)
    with pytest.raises(ValueError, match="freeze.*inplace"):
        fusedconv.convert(model, freeze=True, inplace=True)
    with pytest.raises(TypeError, match="FrozenModel"):
        fusedconv.convert(fusedconv.convert(model, freeze=True))


def test_copies_stay_frozen_and_keep_their_own_states(onednn_small_convs):
    frozen = fusedconv.convert(_mobilenet(), freeze=True)
    x = _x(*SIZE, seed=5)
    y = _run(frozen, x, times=3)
    buffer = io.BytesIO()
    torch.save(frozen, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(frozen), torch.load(buffer, weights_only=False)):
        assert torch.equal(_run(twin, x, times=3), y)
        check = flat_check(twin._model)
        assert check.frozen and check.fused.frozen
        with torch.no_grad():
            kept = check.fused.states()
        assert all(s is None or s is leaf._cpu_state for s, leaf in zip(kept, check.leaves))
        assert sum(s is not None for s in kept) == len(check.fused.fused)
        with torch.no_grad():
            mine = flat_check(frozen._model).fused.states()
        assert not {id(s) for s in kept if s is not None} & {id(s) for s in mine if s is not None}


def test_without_a_flat_forward_it_is_still_the_same_function():
    model = _mobilenet(torch.float64)
    frozen = fusedconv.convert(model, freeze=True, flatten=False)
    assert flat_check(frozen._model) is None
    x = _x(*SIZE, seed=6, dtype=torch.float64)
    assert max_rel_error(_run(frozen, x), _run(model, x)) < 1e-12


def test_frozen_check_keeps_only_class_level_terms():
    check = flat_check(fusedconv.convert(_mobilenet()))
    source, objects = frozen_check_source(check.src, check.expect)
    body = source.split("\n", 1)[1]
    assert not re.search(r"(?<![.\w'\"])(?:[xdm]\d*|self|root|a\d+)\b", body)
    assert ".forward is e[" in body
    assert not any(isinstance(o, (nn.Module, torch.Tensor)) for o in objects)
    assert all(isinstance(o, (type, ClassNamespace, ClassAttrRef)) or callable(o) for o in objects)
    # Each class's terms once, however many of its instances the tree check reads.
    assert len(conjuncts(body.strip()[len("return bool("):-1])) < 20 < check.src.count("\n")


def test_conjuncts_split_only_the_top_level():
    assert conjuncts("a and (b and c) and 'x and y' and f(d, ' and ') and e") == [
        "a", "(b and c)", "'x and y'", "f(d, ' and ')", "e"]
    assert conjuncts("x") == ["x"]


def test_frozen_model_traces_exports_and_refuses_fx_clearly():
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    x = _x(1, 3, 16, 16)
    frozen = fusedconv.convert(model, freeze=True)
    ref = _run(model, x)
    assert not frozen.training
    with torch.no_grad():
        traced = torch.jit.trace(frozen, (x,), check_trace=False)
        exported = torch.export.export(frozen, (x,)).module()
    for y in (traced(x), exported(x)):
        assert max_rel_error(y, ref) < 1e-5
    buffer = io.BytesIO()
    torch.onnx.export(frozen, (x,), buffer, dynamo=False)  # keeps the model's mode: train(False) both ways
    assert buffer.getvalue()
    with pytest.raises(RuntimeError, match="torch.fx cannot trace a frozen model"):
        torch.fx.symbolic_trace(frozen)


def test_frozen_model_built_directly_freezes_its_own_copy():
    model = _resnet18()
    converted = fusedconv.convert(model)
    x = _x(*SIZE, seed=7)
    frozen = fusedconv.FrozenModel(converted)
    assert frozen._model is not converted and flat_check(frozen._model).frozen
    assert not flat_check(converted).frozen  # the converted model keeps its checks
    before = _run(frozen, x, times=3)
    with torch.no_grad():
        next(m for m in converted.modules() if isinstance(m, fusedconv.FusedConv2d)).weight.mul_(-1.0)
    assert torch.equal(_run(frozen, x), before)
    assert max_rel_error(_run(converted, x), before) > 1e-2
    with pytest.raises(ValueError, match="converted: expected a model in eval mode"):
        fusedconv.FrozenModel(_mobilenet().train())
    with pytest.raises(TypeError, match="converted: expected a torch.nn.Module"):
        fusedconv.FrozenModel(lambda x: x)


def test_layer_backends_refuses_a_frozen_model():
    from fusedconv.report import layer_backends

    torch.manual_seed(0)
    frozen = fusedconv.convert(randomize_bn(Net()).eval(), freeze=True)
    with pytest.raises(TypeError, match="not a FrozenModel"):
        layer_backends(frozen, _x(1, 3, 16, 16))
