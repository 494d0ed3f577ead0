"""The whole-model flat forward (fusedconv/graph/flat.py): exact, guarded, and out of the way of tracers.

Models are converted in float64 (random BN statistics) and compared with the unconverted model called the same
way; each change a user may make after convert (a child replaced, a flag flipped, a hook added, forward patched)
must reach the output exactly as it would without flattening. The root's `fallback_calls` says whether a call
took the flat graph (0) or the converted model's own forward.
"""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.graph.flat import flat_check, flatten  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402

torchvision = pytest.importorskip("torchvision")

TOL = 1e-12  # float64: a real mistake shows as O(1)
# One input size for every mobilenet_v2 / resnet18 test: PyTorch's first float64 CPU conv of each new shape costs
# up to ~0.4 s, so new sizes, not the checks, would dominate the file's time.
SIZE = (1, 3, 32, 32)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _convert(model, **kw):
    model = randomize_bn(model).double().eval()
    return model, fusedconv.convert(model, reparameterize=False, **kw)


def _flat_table(model):
    table = guard_table(model)
    assert table is not None and flat_check(model) is not None
    return table


@torch.no_grad()
def _same(a, b):
    assert max_rel_error(a, b) < TOL


@pytest.fixture(scope="module")
def mobilenet():
    return _convert(torchvision.models.mobilenet_v2(weights=None))


@pytest.mark.parametrize("build", [torchvision.models.mobilenet_v2, torchvision.models.resnet18],
                         ids=["mobilenet_v2", "resnet18"])
def test_flat_forward_is_taken_and_exact(build):
    model, converted = _convert(build(weights=None))
    table = _flat_table(converted)
    x = _x(*SIZE)
    with torch.no_grad():
        _same(converted(x), model(x))
    assert table.fallback_calls == 0
    # The graph calls the fused layers, not the model's containers.
    assert "fusedconv_graph_flat_call_leaf" in table.entries[0].src
    _, unflat = _convert(build(weights=None), flatten=False)
    assert guard_table(unflat) is None


def test_flatten_argument_checked():
    with pytest.raises(TypeError, match="flatten: expected True or False"):
        fusedconv.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), flatten=1)


def _changed_pair(mobilenet, change):
    """(converted + flattened, converted without flattening), both with `change` applied, and the original."""
    model, _ = mobilenet
    flat = fusedconv.convert(model, reparameterize=False)
    plain = fusedconv.convert(model, reparameterize=False, flatten=False)
    _flat_table(flat)
    for m in (flat, plain):  # a replacement module gets the same random weights in both
        with torch.random.fork_rng():
            torch.manual_seed(0)
            change(m)
    return flat, plain


@pytest.mark.parametrize("change", [
    # a fused leaf replaced by another module
    lambda m: m.features[0].__setitem__(0, nn.Conv2d(3, 32, 3, 2, 1).double()),
    # a rewritten block's flag flipped (its inlined specialization no longer applies)
    lambda m: setattr(m.features[3], "use_res_connect", False),
    # a container's child replaced by a module of another class
    lambda m: m.features[2].conv.__setitem__(2, nn.Sequential(m.features[2].conv[2], nn.ReLU())),
    # a whole traced container swapped out
    lambda m: setattr(m, "classifier", nn.Sequential(nn.Linear(1280, 7).double())),
    # forward patched on one instance the trace went through
    lambda m: setattr(m.features[0], "forward", lambda x: nn.Sequential.forward(m.features[0], x) * 2.0),
    # a child of a traced module deleted and re-added as None-valued attribute read by the block
    lambda m: m.features[1].__dict__.__setitem__("use_res_connect", True),
], ids=["leaf", "flag", "child", "container", "patched_forward", "attribute"])
def test_changes_after_convert_reach_the_output(mobilenet, change):
    flat, plain = _changed_pair(mobilenet, change)
    x = _x(*SIZE)
    with torch.no_grad():
        try:
            expected = plain(x)
        except Exception as e:  # noqa: BLE001 - then flattening must raise the same way
            with pytest.raises(type(e)):
                flat(x)
            return
        _same(flat(x), expected)
    assert guard_table(flat).fallback_calls >= 1


def test_hooks_added_after_convert_run(mobilenet):
    model, _ = mobilenet
    flat = fusedconv.convert(model, reparameterize=False)
    table = _flat_table(flat)
    x = _x(*SIZE)
    seen = []
    # On a leaf: the flat graph calls leaves as modules, so the hook runs and the flat path stays.
    h = flat.features[0][0].register_forward_hook(lambda m, i, o: seen.append("leaf"))
    with torch.no_grad():
        _same(flat(x), model(x))
    assert seen == ["leaf"] and table.fallback_calls == 0
    h.remove()
    # On a container the trace went through: its call must happen, so the call leaves the flat graph.
    h = flat.features.register_forward_pre_hook(lambda m, i: seen.append("container"))
    with torch.no_grad():
        _same(flat(x), model(x))
    assert seen[-1] == "container" and table.fallback_calls == 1
    h.remove()
    # Globally: every module's call must happen.
    calls = []
    g = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        with torch.no_grad():
            _same(flat(x), model(x))
    finally:
        g.remove()
    assert "Sequential" in calls and table.fallback_calls == 2
    with torch.no_grad():
        flat(x)
    assert table.fallback_calls == 2  # hooks gone: flat again


@pytest.mark.parametrize("build", [torchvision.models.mobilenet_v2, torchvision.models.resnet18],
                         ids=["mobilenet_v2", "resnet18"])
def test_tree_check_loads_only_what_it_reads(build):
    """Every `dN = ....__dict__` / `mN = dN['_modules']` of the generated tree check is read later: after a forward
    these objects are out of cache, and a load nobody reads costs as much as one that guards something."""
    import ast

    _, converted = _convert(build(weights=None))
    tree = ast.parse(flat_check(converted).src)
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert {v for v in stored if v[0] in "dm"}, "the check reads no module dict at all"
    assert not {v for v in stored if v[0] in "dm"} - loaded


def test_copies_pickles_and_stays_flat(mobilenet):
    model, flat = mobilenet
    x = _x(*SIZE)
    dup = copy.deepcopy(flat)
    buf = io.BytesIO()
    torch.save(flat, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        ref = model(x)
        for m in (dup, loaded):
            _same(m(x), ref)
            assert _flat_table(m).fallback_calls == 0
        # The copy's guard checks the copy's modules: changing the copy does not touch the original.
        dup.features[-1][0] = nn.Sequential(dup.features[-1][0], nn.Hardtanh(-0.01, 0.01))
        _same(flat(x), ref)
        assert max_rel_error(dup(x), ref) > 1e-6
    assert _flat_table(dup).fallback_calls >= 1


def test_tracers_and_compilers_see_the_converted_forward(mobilenet):
    model, flat = mobilenet
    x = _x(*SIZE)
    table = _flat_table(flat)
    before = table.fallback_calls
    gm = torch.fx.symbolic_trace(flat)
    assert not any("call_leaf" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        _same(gm(x), model(x))
        traced = torch.jit.trace(flat, x, check_trace=False)
        _same(traced(x), model(x))
    assert table.fallback_calls > before
    exported = torch.export.export(flat, (x,))
    with torch.no_grad():
        _same(exported.module()(x), model(x))


class _Scale:
    """A helper object (like timm's hook-based feature extractor): its contents are not plain values a guard can
    compare."""

    def __init__(self, value):
        self.value = value


class StatefulHelper(nn.Module):
    """A forward that consults a helper object's contents (like timm's hook-based feature extractor)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.store = _Scale(1.0)

    def forward(self, x):
        return self.body(x) * self.store.value


class PlainDictRead(StatefulHelper):
    """The same with a dict of plain values."""

    def __init__(self):
        super().__init__()
        self.store = {"scale": 1.0}

    def forward(self, x):
        return self.body(x) * self.store["scale"]


class PlainListRead(nn.Module):
    """A forward that picks features by a plain list attribute (smp's encoders read `_out_indexes`)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
                                     for c in (3, 4, 4)])
        self.store = [0, 2]

    def forward(self, x):
        feats = []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in self.store:
                feats.append(x)
        return torch.cat(feats, 1)


def test_reads_of_stateful_objects_are_not_flattened():
    model, converted = _convert(StatefulHelper())
    assert guard_table(converted) is None
    converted.store.value = 3.0
    model.store.value = 3.0
    x = _x(1, 3, 8, 8)
    with torch.no_grad():
        _same(converted(x), model(x))
    notes = []
    assert not flatten(fusedconv.convert(model, flatten=False), notes)
    assert "store (_Scale)" in notes[0]


@pytest.mark.parametrize("cls,edit", [(PlainDictRead, ("scale", 3.0)), (PlainListRead, (1, 1))],
                         ids=["dict", "list"])
def test_plain_containers_read_are_guarded_by_their_contents(cls, edit):
    model, converted = _convert(cls())
    table = _flat_table(converted)
    x = _x(1, 3, 8, 8)
    with torch.no_grad():
        _same(converted(x), model(x))
        assert table.fallback_calls == 0
        key, value = edit
        converted.store[key] = value  # in place: the same container
        model.store[key] = value
        _same(converted(x), model(x))
    assert table.fallback_calls == 1


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        y = self.a(x)
        return y if y.sum() > 0 else -y


def test_untraceable_model_left_as_converted():
    model, converted = _convert(DataDependent())
    assert guard_table(converted) is None
    x = _x(1, 3, 8, 8)
    with torch.no_grad():
        _same(converted(x), model(x))
        _same(converted(-x), model(-x))


class TwoWay(nn.Module):
    """A block called with a residual that may be None: inlined only where the argument is provably a tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, skip=None):
        y = self.bn(self.conv(x))
        if skip is not None:
            y = y + skip
        return F.relu(y)


class UsesTwoWay(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = TwoWay()

    def forward(self, x):
        s = self.stem(x)
        return self.block(s, s) + self.block(s)


def test_blocks_called_two_ways():
    model, converted = _convert(UsesTwoWay())
    table = _flat_table(converted)
    x = _x(2, 3, 9, 7)
    with torch.no_grad():
        _same(converted(x), model(x))
        converted.block.bn = nn.Identity()  # the block's guard now misses for both calls
        model.block.bn = nn.Identity()
        _same(converted(x), model(x))
    assert table.fallback_calls == 1


# ---------------------------------------------------------------- residuals written in place by the flat graph
_in_place_available = pytest.mark.skipif(
    not fusedconv.cpu.available() or fusedconv.cpu._pointwise_binary_inplace is None,
    reason="this PyTorch build has no in-place oneDNN residual conv")

class Block(nn.Module):
    """A basic block whose residual is its own input; `reads_after` reads that input again after the add."""

    def __init__(self, reads_after=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.reads_after = reads_after

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + x)
        return y + x.mean() if self.reads_after else y


class Net(nn.Module):
    def __init__(self, *blocks, returns_stem=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(*blocks)
        self.returns_stem = returns_stem

    def forward(self, x):
        s = self.stem(x)
        y = self.stage(s)
        return (y, s) if self.returns_stem else y


def _float32_pair(model):
    torch.manual_seed(0)
    model = randomize_bn(model.eval())
    return model, fusedconv.convert(copy.deepcopy(model))


def _run(fc, x, inplace_calls, rounds=3):
    with torch.no_grad():
        for _ in range(rounds):  # the first call checks the CPU layout boundary
            inplace_calls.clear()
            y = fc(x)
    return y, len(inplace_calls)


def _ref64(model, x):
    """The original model's output (float64 for the small nets; the torchvision models in float32, where a tensor
    overwritten by mistake shows as O(1) too, without float64's slow first conv of each new shape)."""
    with torch.no_grad():
        if sum(1 for _ in model.modules()) > 40:
            return model(x)
        return copy.deepcopy(model).double()(x.double())


def _close(out, ref):
    if isinstance(out, tuple):
        return all(_close(o, r) for o, r in zip(out, ref, strict=True))
    return max_rel_error(out, ref) < 1e-4


@_in_place_available
@pytest.mark.parametrize("blocks,returns_stem,count", [
    ((False, False, False), False, 3),  # every block input is a fresh fused output read by the block only
    ((False, True, False), False, 1),   # block 1 reads its input after the add; block 1's output is not fused
    ((False, False), True, 1),          # the stem's output is returned too: block 0 must leave it
])
def test_residuals_written_in_place_only_where_dead(blocks, returns_stem, count, inplace_calls):
    model, fc = _float32_pair(Net(*(Block(r) for r in blocks), returns_stem=returns_stem))
    _flat_table(fc)
    x = torch.randn(2, 3, 12, 12)
    x_before = x.clone()
    y, n = _run(fc, x, inplace_calls)
    assert n == count
    assert _close(y, _ref64(model, x)) and torch.equal(x, x_before)


@_in_place_available
def test_hook_added_after_convert_keeps_what_it_captured(inplace_calls):
    model, fc = _float32_pair(Net(Block(), Block(), Block()))
    x = torch.randn(2, 3, 12, 12)
    _, base = _run(fc, x, inplace_calls)
    kept = []
    # stage.0.conv2 makes stage.1's input (its residual): a hook holding that tensor forbids writing into it.
    fc.stage[0].conv2.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    y, n = _run(fc, x, inplace_calls)
    # Two writes fewer: into stage.1's input (held by the hook) and into stage.0's, whose residual conv is the
    # hooked module itself (a module with hooks never takes a residual it could keep).
    assert n == base - 2 and _guard_still_flat(fc)
    held, copy_at_call = kept[-1]
    assert torch.equal(held, copy_at_call)  # not overwritten by stage.1's residual conv
    assert _close(y, _ref64(model, x))


def _guard_still_flat(fc) -> bool:
    return guard_table(fc).fallback_calls == 0


@_in_place_available
def test_mobilenet_v2_all_residuals_in_place(inplace_calls):
    model, fc = _float32_pair(torchvision.models.mobilenet_v2(weights=None))
    x = torch.randn(1, 3, 64, 64)
    y, n = _run(fc, x, inplace_calls)
    assert n == 10 and _close(y, _ref64(model, x)) and _guard_still_flat(fc)
    # Grad mode: converted weights need no gradient, so no autograd graph exists and the same writes happen; once
    # they require grad, the fused layers take their differentiable route and nothing is written in place.
    inplace_calls.clear()
    y = fc(x)
    assert len(inplace_calls) == 10 and _close(y.detach(), _ref64(model, x))
    for p in fc.parameters():
        p.requires_grad_(True)
    inplace_calls.clear()
    y = fc(x)
    assert not inplace_calls and y.requires_grad and _close(y.detach(), _ref64(model, x))


@_in_place_available
def test_downsample_hooked_after_convert_keeps_its_output(inplace_calls):
    """resnet18's layer2.0 adds its downsample branch's output: the block's own rewrite decides per call whether
    that residual may be overwritten (private_residual.residual_private); the flat graph must decide per call too,
    not once when it was traced."""
    model, fc = _float32_pair(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 64, 64)
    _, base = _run(fc, x, inplace_calls)
    assert base == 8  # every block: layer1.0's residual is the stem's max-pool output (flat_private_pooled)
    kept = []
    fc.layer2[0].downsample[0].register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    y, n = _run(fc, x, inplace_calls)
    held, copy_at_call = kept[-1]
    assert torch.equal(held, copy_at_call) and n == base - 1 and _guard_still_flat(fc)
    assert _close(y, _ref64(model, x))


class RewrittenRoot(nn.Module):
    """A root with a chain of its own (convert rewrites the root itself) and a flag its forward reads."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.stage = nn.Sequential(Block(), Block())
        self.double_out = False

    def forward(self, x):
        y = self.stage(F.relu(self.bn(self.conv(x))))
        return y * 2 if self.double_out else y


def test_rewritten_root_gets_the_flat_graph_in_front_of_its_own_table():
    from fusedconv.graph.flat import FlatTable
    model, converted = _convert(RewrittenRoot())
    table = guard_table(converted)
    assert isinstance(table, FlatTable) and flat_check(converted) is not None
    x = _x(2, 3, 10, 9)
    with torch.no_grad():
        _same(converted(x), model(x))
        assert table.fallback_calls == 0
        for m in (converted, model):
            m.double_out = True  # the root's own guard changes its mind: the flat graph must step aside
        _same(converted(x), model(x))
        assert table.fallback_calls == 1
        dup = copy.deepcopy(converted)
        assert isinstance(guard_table(dup), FlatTable) and guard_table(dup).inner is not table.inner
        for m in (converted, model, dup):
            m.double_out = False
        copied_count = guard_table(dup).fallback_calls
        dup.stage[1].conv2 = nn.Identity()  # the copy's change stays in the copy
        _same(converted(x), model(x))
        assert table.fallback_calls == 1
        model.stage[1].conv2 = nn.Identity()  # (the converted block's BN role still applies, as in the original)
        _same(dup(x), model(x))
        assert guard_table(dup).fallback_calls == copied_count + 1


@_in_place_available
@pytest.mark.parametrize("change", ["none", "instance_forward", "hook", "subclass"])
def test_max_pool_output_written_in_place_only_while_fresh(change, inplace_calls):
    """resnet18's layer1.0 adds the stem's max-pool output: written in place only while that leaf is a plain
    MaxPool2d returning a new tensor with no hooks. A max pool patched to return its input would otherwise have the
    stem's output, which the caller may hold, overwritten."""
    model, fc = _float32_pair(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 64, 64)
    _, base = _run(fc, x, inplace_calls)
    assert base == 8
    held = []
    if change == "instance_forward":  # returns its input: the stem's output, which the hook below keeps
        real = fc.maxpool.forward
        fc.maxpool.forward = lambda t: real(t)
    elif change == "hook":
        fc.maxpool.register_forward_hook(lambda m, i, o: held.append((o, o.clone())))
    elif change == "subclass":
        class OtherPool(nn.MaxPool2d):
            pass
        fc.maxpool.__class__ = OtherPool
    y, n = _run(fc, x, inplace_calls)
    assert n == (8 if change == "none" else 7)
    if held:
        assert torch.equal(*held[-1])
    assert _close(y, _ref64(model, x))


class _OwnNorm(nn.Module):
    """A norm layer that is not torch.nn's (so the flat trace goes through it) reading its own parameters and
    buffers, as timm's BatchNormAct2d does."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1,
                                       1e-5))


class _NormFirst(nn.Module):
    """BN (of its own kind) before the conv in each block: the norms stay, traced through."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*[nn.Sequential(_OwnNorm(8), nn.Conv2d(8, 8, 3, padding=1)) for _ in range(3)])

    def forward(self, x):
        return self.blocks(self.stem(x))


@pytest.mark.parametrize("change", [None, "reassign_buffer", "edit_parameter", "replace_owner", "delete_buffer"])
def test_parameters_and_buffers_read_through_their_checked_owner(change):
    """The graph reads a traced-through module's tensors with one getattr on that module (identity checked per
    forward), not a walk from the root; every later change to them or their owner reaches the output."""
    model, flat = _convert(_NormFirst())
    plain = fusedconv.convert(model, reparameterize=False, flatten=False)
    check = flat_check(flat)
    assert [type(m) for m in check.owners] == [_OwnNorm] * 3
    assert "self.blocks" not in guard_table(flat).entries[0].src  # no attribute walk from the root in the graph
    x = _x(1, 3, 6, 6)
    for m in (flat, plain):
        norm = m.blocks[1][0]
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            if change == "reassign_buffer":
                norm.running_mean = torch.randn(8, dtype=torch.float64)
            elif change == "edit_parameter":
                norm.weight.mul_(3.0)
            elif change == "replace_owner":
                m.blocks[1][0] = _OwnNorm(8).double()
            elif change == "delete_buffer":
                del norm.running_var
    with torch.no_grad():
        if change == "delete_buffer":
            with pytest.raises(AttributeError):
                plain(x)
            with pytest.raises(AttributeError):
                flat(x)
            return
        _same(flat(x), plain(x))
    fallbacks = guard_table(flat).fallback_calls
    assert fallbacks == (1 if change in ("replace_owner",) else 0)


class _BNLinearHead(nn.Module):
    """A conv stem and RepViT's classifier head: BatchNorm1d right before a Linear, which convert folds into one
    BN-folded Linear whose forward checks its input's rank (a branch on the traced value if traced through)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


def test_bn_folded_layer_is_a_leaf_of_the_flat_forward():
    from fusedconv.bn_folded_layers import BNFoldedLinear
    from fusedconv.graph.flat_fused import pure_leaf

    model, converted = _convert(_BNLinearHead())
    assert type(converted.head[1]) is BNFoldedLinear
    table = _flat_table(converted)
    assert all(pure_leaf(m) for m in flat_check(converted).leaves)  # the BN-folded layer runs no user code
    x = _x(2, 3, 8, 8)
    with torch.no_grad():
        _same(converted(x), model(x))
    assert table.fallback_calls == 0


class _TwoBranch(nn.Module):
    """RepVGG's branches with an optional skip: reparameterize merges them, convert then fuses the merged conv
    with the activation (a convert table over the reparam one)."""

    def __init__(self, c=4):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.act = nn.ReLU()

    def forward(self, x, skip=None):
        out = self.act(self.dense(x) + self.pw(x))
        return out if skip is None else out + skip


class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(_TwoBranch(), _TwoBranch())

    def forward(self, x):
        return self.blocks(self.stem(x))


def test_block_merged_then_fused_is_inlined_and_still_guarded():
    from fusedconv import GuardMiss

    model = randomize_bn(_TwoBlocks()).double().eval()
    converted = fusedconv.convert(model)
    assert all(guard_table(b).base is not None for b in converted.blocks)
    table = _flat_table(converted)
    assert "2 blocks inlined" in table.entries[0].described[0]
    x = _x(1, 3, 8, 8)
    with torch.no_grad():
        _same(converted(x), model(x))
        assert table.fallback_calls == 0
        act = converted.blocks[1].act
        converted.blocks[1].act = nn.Tanh()  # the merged block's guards (and its base's) reject this: raises
        with pytest.raises(GuardMiss, match="self.act"):
            converted(x)
        converted.blocks[1].act = act
        _same(converted(x), model(x))


class _Collect(nn.Module):
    """timm's feature collector (`FeatureListNet._collect`): each stage's output tested `isinstance(x, (tuple,
    list))` before it is kept."""

    tested = "stages.0.0"  # the layer whose output the (first) type test reads

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1, bias=False),
                                                  nn.BatchNorm2d(4), nn.ReLU()) for i in range(3))

    def forward(self, x):
        out = []
        for m in self.stages:
            x = m(x)
            if isinstance(x, (tuple, list)):
                x = x[0]
            out.append(x)
        return out


class _CollectPooled(_Collect):
    """The tested value from one of torch.nn's own layers (return_indices: that layer returns a tuple)."""

    tested = "pool"

    def __init__(self, return_indices=False):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=return_indices)

    def forward(self, x):
        x = self.pool(self.stages[0](x))
        return x[0] if isinstance(x, (tuple, list)) else x


class _CollectTensorTest(_Collect):
    def forward(self, x):
        x = self.stages[0](x)
        return x * 2 if isinstance(x, torch.Tensor) else x


class _CollectOwnClass(_Collect):
    def forward(self, x):
        x = self.stages[0](x)
        return x[0] if isinstance(x, _Collect) else x


class _CollectLocalClass(_Collect):
    def forward(self, x):
        x = self.stages[0](x)
        kinds = (tuple, list)  # a local: its value is not read from the code (whatever it is, no answer)
        return x[0] if isinstance(x, kinds) else x


class _CollectChunk(_Collect):
    def forward(self, x):
        x = torch.chunk(self.stages[0](x), 2, 1)  # a tuple, from an op: not known to be a tensor
        return x[0] if isinstance(x, tuple) else x


def _same_lists(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        _same(u, v)


@pytest.mark.parametrize("build", [_Collect, _CollectTensorTest, _CollectPooled],
                         ids=["tuple_or_list", "tensor", "torch_layer"])
def test_type_test_of_a_layer_output_is_answered_and_guarded(build):
    model, converted = _convert(build())
    table = _flat_table(converted)
    _, unflat = _convert(build(), flatten=False)
    unflat.load_state_dict(converted.state_dict())
    x = _x(1, 3, 8, 8)
    out = (lambda y: y if isinstance(y, list) else [y])
    with torch.no_grad():
        _same_lists(out(converted(x)), out(model(x)))
        assert table.fallback_calls == 0
        # A forward hook may return anything: on the tested layer it sends the call to the model's own forward.
        hooks = [m.get_submodule(build.tested).register_forward_hook(lambda mod, args, y: [y * 3.0])
                 for m in (converted, unflat)]
        _same_lists(out(converted(x)), out(unflat(x)))
        assert table.fallback_calls == 1
        for h in hooks:
            h.remove()
        # A tensor subclass's __torch_function__ may make a layer return anything: not the flat graph either.
        sub = x.as_subclass(type("Sub", (torch.Tensor,), {}))
        _same_lists(out(converted(sub)), out(unflat(sub)))
        assert table.fallback_calls == 2


@pytest.mark.parametrize("build", [_CollectOwnClass, _CollectLocalClass, _CollectChunk,
                                   lambda: _CollectPooled(return_indices=True)],
                         ids=["other_class", "local_class", "op_output", "tuple_layer"])
def test_type_test_that_depends_on_the_value_is_not_flattened(build):
    model = randomize_bn(build()).double().eval()
    converted, report = fusedconv.convert(model, reparameterize=False, return_report=True)
    assert flat_check(converted) is None
    assert any("tests the type of a computed value" in n for n in report.notes), report.notes
    x = _x(1, 3, 8, 8)
    with torch.no_grad():
        _same(converted(x), model(x))
