"""Edits after convert: a hook, a module appended, a stand-in replaced inside what a rewrite reached into.

convert's rewrites call into some containers instead of calling them: a residual block's absorbed Sequential
(mobilenet_v2's `conv`) has its leaves called one by one, a Sequential whose last conv took the BN after it is
still called but returns more, and the whole-model flat forward runs every container's loop as traced. Each edit
below is made on the converted model and, at the same path, on the original; the two must compute the same function
(float64, random BN statistics), with the whole-model flat forward and without it. Each of these was skipped
silently before the guards checked those containers (graph/inlined_containers.py, patterns.attribute_terms).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402

TOL = 1e-12  # float64: a skipped edit shows as 1e-3 and more


class Scale(nn.Module):
    def __init__(self, factor: float = 1.5):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _scale_output(module, args, output):
    return output * 1.5


def _halve_input(module, args):
    return tuple(a * 0.5 for a in args)


class LoopNet(nn.Module):
    """A residual loop over a ModuleList, then the layers of a ModuleDict in turn."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(3))
        self.extra = nn.ModuleDict({"a": nn.Conv2d(8, 8, 1), "b": nn.BatchNorm2d(8)})

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = x + layer(x)
        for m in self.extra.values():
            x = m(x)
        return x


class TailBlock(nn.Module):
    """A Sequential ending in a conv whose BN follows it in the block; the block reads a flag, so its rewrite is
    guarded (the BN folds into the Sequential's last conv)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.skip = True

    def forward(self, x):
        y = self.bn(self.body(x))
        return self.act(y + x) if self.skip else self.act(y)


class StemNet(nn.Module):
    """A conv-BN-ReLU stem, then `block` (so the block's input comes from a layer, as in a real model)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = block

    def forward(self, x):
        return self.block(self.stem(x))


def _x(size=32, seed=0):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _pair(model, flatten: bool, size: int = 32):
    # BN statistics measured on an input, then perturbed: with blind ones mobilenet_v2's output hardly depends on
    # its later blocks (model_specs.randomize_batchnorm), and an edit there would change nothing visible.
    model = randomize_bn(copy.deepcopy(model).float().eval(), example=_x(size, seed=1).float()).double().eval()
    return model, fusedconv.convert(model, reparameterize=False, flatten=flatten)


def _check_edit(original, converted, edit_original, edit_converted, x):
    """Apply the edits (the converted model warmed up first: its routes and flat forward in place) and compare."""
    original, converted = copy.deepcopy(original), copy.deepcopy(converted)
    with torch.no_grad():
        converted(x)
        before = converted(x)
        for model, edit in ((original, edit_original), (converted, edit_converted)):
            with torch.random.fork_rng():
                torch.manual_seed(7)  # a module the edit builds gets the same weights in both
                edit(model)
        want = original(x)
        assert max_rel_error(before, want) > 1e-6, "the edit must change the output (else the test proves nothing)"
        for _ in range(2):
            assert max_rel_error(converted(x), want) < TOL


def _fallbacks(model) -> int:
    return sum(guard_table(m).fallback_calls for m in model.modules() if guard_table(m) is not None)


LOOP_EDITS = {
    "modulelist_append": lambda m: m.layers.append(
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()).double().eval()),
    "modulelist_delete": lambda m: m.layers.__delitem__(1),
    "moduledict_add": lambda m: m.extra.update({"c": nn.Conv2d(8, 8, 1).double()}),
    "sequential_append": lambda m: m.stem.append(Scale()),
    "sequential_hook": lambda m: m.stem.register_forward_hook(_scale_output),
}


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "blocks"])
@pytest.mark.parametrize("edit", list(LOOP_EDITS), ids=list(LOOP_EDITS))
def test_containers_edited_after_convert_loop_over_their_new_children(edit, flatten):
    original, converted = _pair(LoopNet(), flatten, 16)
    _check_edit(original, converted, LOOP_EDITS[edit], LOOP_EDITS[edit], _x(16))


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None)


def _replace(path: str, make):
    def edit(model):
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent)
        owner._modules[name] = make(owner._modules[name])
    return edit


# features.10 is a residual InvertedResidual: its `conv` Sequential is absorbed (the last conv takes the add).
# conv.3 is the original's last BN, the converted model's nn.Identity stand-in for it.
MOBILENET_EDITS = {
    "hook_on_absorbed_sequential": ("features.10.conv", lambda m: m.register_forward_hook(_scale_output)),
    "pre_hook_on_absorbed_sequential": ("features.10.conv", lambda m: m.register_forward_pre_hook(_halve_input)),
    "hook_on_nested_container": ("features.10.conv.1", lambda m: m.register_forward_hook(_scale_output)),
    "hook_on_stand_in": ("features.10.conv.3", lambda m: m.register_forward_hook(_scale_output)),
    "append_to_absorbed_sequential": ("features.10.conv", lambda m: m.append(Scale())),
    "instance_forward_on_nested_container": (
        "features.10.conv.0", lambda m: setattr(m, "forward", lambda x: nn.Sequential.forward(m, x) * 1.5)),
    "append_to_flat_sequential": ("features.1.conv", lambda m: m.append(Scale())),
    "append_to_model_sequential": ("classifier", lambda m: m.append(Scale())),
}


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "blocks"])
@pytest.mark.parametrize("edit", list(MOBILENET_EDITS), ids=list(MOBILENET_EDITS))
def test_mobilenet_v2_edited_after_convert(mobilenet, edit, flatten):
    original, converted = _pair(mobilenet, flatten)
    path, change = MOBILENET_EDITS[edit]
    _check_edit(original, converted, lambda m: change(m.get_submodule(path)),
                lambda m: change(m.get_submodule(path)), _x())


def test_a_stand_in_replaced_after_convert_runs_after_the_folded_bn(mobilenet):
    """Replacing the nn.Identity that stands for a folded BN = putting the module after that BN in the original."""
    original, converted = _pair(mobilenet, True)
    _check_edit(original, converted, _replace("features.10.conv.3", lambda bn: nn.Sequential(bn, Scale())),
                _replace("features.10.conv.3", lambda stand_in: Scale()), _x())


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "blocks"])
@pytest.mark.parametrize("edit", ["hook", "append"])
def test_a_sequential_whose_last_conv_took_the_bn_keeps_its_own_output(edit, flatten):
    original, converted = _pair(StemNet(TailBlock()), flatten, 16)
    assert guard_table(converted.block) is not None  # the block was rewritten (its add fused)
    if edit == "hook":
        change = lambda m: m.block.body.register_forward_hook(_scale_output)  # noqa: E731
    else:
        change = lambda m: m.block.body.append(Scale())  # noqa: E731
    _check_edit(original, converted, change, change, _x(16))
    # unedited: the rewritten graph, no fallback
    fresh = _pair(StemNet(TailBlock()), flatten, 16)[1]
    with torch.no_grad():
        fresh(_x(16))
    assert _fallbacks(fresh) == 0


class AddBlock(nn.Module):
    """conv -> BN -> + x -> ReLU through functions, behind a flag: a graph rewrite whose BN becomes a stand-in."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.skip = True

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y + x) if self.skip else torch.relu(y)


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "blocks"])
@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_a_hook_on_a_folded_bns_stand_in_sees_what_the_bn_computed(hook, flatten):
    """The graph no longer calls the BN's nn.Identity stand-in: a hook on it sends the call to the fallback, whose
    stand-in for the BN carries the hook."""
    original, converted = _pair(StemNet(AddBlock()), flatten, 16)
    assert guard_table(converted.block) is not None and type(converted.block.bn) is nn.Identity
    if hook == "forward":
        change = lambda m: m.block.bn.register_forward_hook(_scale_output)  # noqa: E731
    else:
        change = lambda m: m.block.bn.register_forward_pre_hook(_halve_input)  # noqa: E731
    _check_edit(original, converted, change, change, _x(16))


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "blocks"])
def test_a_hook_on_an_activation_the_fused_layers_took_over(flatten):
    """resnet18's BasicBlock calls `self.relu` twice; both calls moved into the fused convs' epilogues."""
    torch.manual_seed(0)
    original, converted = _pair(torchvision.models.resnet18(weights=None), flatten)
    change = lambda m: m.layer1[0].relu.register_forward_hook(_scale_output)  # noqa: E731
    _check_edit(original, converted, change, change, _x())


class SharedActBlock(nn.Module):
    """A residual block calling one activation module twice (home-made and YOLO-style nets): both calls move into
    the fused convs' epilogues, the module stays where it was."""

    def __init__(self, act: nn.Module, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = act

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + x)


class SharedActNet(nn.Module):
    """The same two calls of one activation module in the root's own forward (no block around them)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.act = act

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


SETTING_EDITS = {
    "leaky_relu_slope": (lambda: nn.LeakyReLU(0.1), "negative_slope", 0.3),
    "relu6_max_val": (nn.ReLU6, "max_val", 3.0),
    "gelu_approximate": (nn.GELU, "approximate", "tanh"),
}


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "blocks"])
@pytest.mark.parametrize("where", ["block", "root"])
@pytest.mark.parametrize("setting", list(SETTING_EDITS), ids=list(SETTING_EDITS))
def test_a_setting_of_an_activation_the_fused_layers_took_over(setting, where, flatten):
    """The fused convs hold the activation as convert read it from the module; a setting edited on the module after
    convert (its forward would read it) sends the calls to the fallback, which runs the module as it is now."""
    make, attr, value = SETTING_EDITS[setting]
    torch.manual_seed(0)
    model = StemNet(SharedActBlock(make())) if where == "block" else SharedActNet(make())
    original, converted = _pair(model, flatten, 16)
    path = "block.act" if where == "block" else "act"
    assert type(converted.get_submodule(path)) is type(original.get_submodule(path))  # kept, its calls moved
    change = lambda m: setattr(m.get_submodule(path), attr, value)  # noqa: E731
    _check_edit(original, converted, change, change, _x(16))
    fresh = copy.deepcopy(converted)
    with torch.no_grad():
        fresh(_x(16))
    assert _fallbacks(fresh) == 0  # unedited, the settings hold and the rewrite runs


class BiasActBlock(nn.Module):
    """A conv with its own bias and an activation module after it, no BN (RepVGG's merged conv), then a gain the
    block reads (its rewrite is guarded on it)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.gain = 1.0

    def forward(self, x):
        return self.act(self.conv(x)) * self.gain


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "blocks"])
@pytest.mark.parametrize("tensor", ["shift", "scale"])
def test_a_lone_convs_scale_and_shift_edited_after_convert_reach_the_fallback(tensor, flatten):
    """Without a BN, the fused layer's scale and shift stand for the conv's bias: edited in place after convert,
    the fused call sees them, and so must the block's fallback (a new gain sends calls there), which once added
    back the bias convert had read."""
    original, converted = _pair(StemNet(BiasActBlock()), flatten, 16)
    fused = converted.block.conv
    assert guard_table(converted.block) is not None and fused.scale.eq(1).all()

    def edit_original(m):
        m.block.gain = 2.0
        with torch.no_grad():
            if tensor == "shift":
                m.block.conv.bias.add_(0.5)
            else:  # conv(x, w) * 1.5 + b
                m.block.conv.weight.mul_(1.5)

    def edit_converted(m):
        m.block.gain = 2.0
        with torch.no_grad():
            m.block.conv.shift.add_(0.5) if tensor == "shift" else m.block.conv.scale.mul_(1.5)

    _check_edit(original, converted, edit_original, edit_converted, _x(16))


class FunctionalBNBlock(nn.Module):
    """A BN as F.batch_norm on the block's own buffers and parameters, then a residual and ReLU."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.register_buffer("mean", torch.randn(c, generator=torch.Generator().manual_seed(3)))
        self.register_buffer("var", torch.rand(c, generator=torch.Generator().manual_seed(4)) + 0.5)
        self.gamma = nn.Parameter(torch.randn(c, generator=torch.Generator().manual_seed(5)))
        self.beta = nn.Parameter(torch.randn(c, generator=torch.Generator().manual_seed(6)))

    def forward(self, x):
        return torch.relu(F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
                          + x)


def _scaled_state(m):
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["block.var"].mul_(1.5)
    sd["block.gamma"].mul_(1.5)
    return sd


FOLDED_SOURCE_EDITS = {
    "var_in_place": lambda m: m.block.var.mul_(1.5),
    "gamma_in_place": lambda m: m.block.gamma.mul_(1.5),
    "beta_data_replaced": lambda m: setattr(m.block.beta, "data", m.block.beta.data + 0.5),
    "mean_buffer_replaced": lambda m: setattr(m.block, "mean", m.block.mean + 0.5),
    "load_state_dict": lambda m: m.load_state_dict(_scaled_state(m)),
}


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "blocks"])
@pytest.mark.parametrize("edit", list(FOLDED_SOURCE_EDITS), ids=list(FOLDED_SOURCE_EDITS))
def test_a_functional_batch_norms_tensors_edited_after_convert(edit, flatten):
    """The fused conv holds scale and shift folded from the block's mean / var / gamma / beta, which stay in the
    block (graph/folded_sources.py): edited after convert, in place or replaced, the call takes the fallback that
    reads them."""
    original, converted = _pair(StemNet(FunctionalBNBlock()), flatten, 16)
    assert guard_table(converted.block) is not None and not hasattr(converted.block, "bn")
    assert "block.var" in converted.state_dict()

    def change(m):
        with torch.no_grad():
            FOLDED_SOURCE_EDITS[edit](m)

    _check_edit(original, converted, change, change, _x(16))


def test_a_functional_batch_norms_snapshot_travels_with_copies(tmp_path):
    """A deep copy or a saved and loaded converted model takes the fused path (its snapshot is of its own tensors);
    a copy made after an edit of the original's tensors does not (its fused conv carries the stale fold)."""
    original, converted = _pair(StemNet(FunctionalBNBlock()), False, 16)
    x = _x(16)
    with torch.no_grad():
        want = original(x)
        path = tmp_path / "converted.pt"
        torch.save(converted, path)
        for copy_ in (copy.deepcopy(converted), torch.load(path, weights_only=False)):
            assert max_rel_error(copy_(x), want) < TOL and _fallbacks(copy_) == 0
        converted.block.var.mul_(1.5)
        original.block.var.mul_(1.5)
        edited_copy = copy.deepcopy(converted)
        assert max_rel_error(edited_copy(x), original(x)) < TOL and _fallbacks(edited_copy) == 1


class SharedBNBlock(nn.Module):
    """One BN module after two convs (folded into each), and a gain the block reads (its rewrite is guarded)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.gain = 1.0

    def forward(self, x):
        return torch.relu(self.bn(self.a(x))) * self.gain + self.bn(self.b(x))


def test_a_bn_folded_into_two_convs_whose_copies_were_edited_apart_makes_the_fallback_raise():
    """The fused copies of a shared BN edited after convert: the fused calls use them, but the block's own forward
    calls the one BN and cannot; a call sent to it (a new gain) raises instead of computing something else."""
    original, converted = _pair(StemNet(SharedBNBlock()), False, 16)
    assert type(converted.block.bn) is nn.Identity
    x = _x(16)
    with torch.no_grad():
        unedited = copy.deepcopy(converted)
        unedited.block.gain = original.block.gain = 2.0  # the fallback, copies as convert made them: exact
        assert max_rel_error(unedited(x), original(x)) < TOL and _fallbacks(unedited) == 1
        as_float = copy.deepcopy(converted).float()  # a cast keeps the copies' values: no raise
        as_float.block.gain = 2.0
        assert max_rel_error(as_float(x.float()).double(), original(x)) < 1e-4
        converted(x)
        converted.block.a.scale.mul_(1.5)
        converted(x)  # the fused calls take the edit
        converted.block.gain = 2.0
        with pytest.raises(RuntimeError, match="BatchNorm bn is folded into each of a, b"):
            converted(x)


def test_a_functional_batch_norms_fused_copy_edited_makes_the_fallback_raise():
    """The fused conv's scale edited after convert while the block still holds the F.batch_norm's tensors: a call
    sent to the block's own forward (its tensors edited too) raises rather than drop the edit."""
    _, converted = _pair(StemNet(FunctionalBNBlock()), False, 16)
    with torch.no_grad():
        converted.block.conv.scale.mul_(1.5)
        converted(_x(16))
        converted.block.var.mul_(1.5)
        with pytest.raises(RuntimeError, match="fold of the F.batch_norm of mean, var, gamma, beta"):
            converted(_x(16))
