"""Guarded re-parameterization: a merged block computes the original function for every call it accepts, and
raises GuardMiss (never a stale merge) for one its merged weights cannot compute.

RepVGG-like blocks written here with adversarial forwards, plus timm's repvgg_a0 and mobileone_s0, each with
random weights and randomized BN statistics, compared with the original in float64 after reparameterize and
after convert, called in every way their users call them.
"""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import batch_norm_count, count_ops, max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import FusedConv2d, GuardMiss  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402

TOL = 1e-9  # float64: rounding is ~1e-15, a wrong merge O(1)


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conv_bn(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class Branches(nn.Module):
    """RepVGG's three branches; subclasses decide how the forward combines them."""

    def __init__(self, c=4):
        super().__init__()
        self.dense, self.pw, self.idbn = conv_bn(c, c, 3), conv_bn(c, c, 1), nn.BatchNorm2d(c)
        self.act = nn.ReLU()


class OptionalSkip(Branches):
    """An optional tensor added after the merged sum (`is not None` form): the merge is the same both ways."""

    def forward(self, x, skip=None):
        out = self.act(self.dense(x) + self.pw(x) + self.idbn(x))
        if skip is not None:
            out = out + skip
        return out


class SkipReplacesIdentity(Branches):
    """`is None` form: the identity branch only when no skip is given, so each call pattern merges other
    branches (two merged convs)."""

    def forward(self, x, skip=None):
        if skip is None:
            return self.act(self.dense(x) + self.pw(x) + self.idbn(x))
        return self.act(self.dense(x) + self.pw(x) + skip)


class IdentityFlag(Branches):
    """A plain flag decides whether the identity branch joins the sum (users flip such flags)."""

    def __init__(self, c=4):
        super().__init__(c)
        self.use_identity = True

    def forward(self, x):
        out = self.dense(x) + self.pw(x)
        if self.use_identity:
            out = out + self.idbn(x)
        return self.act(out)


class IdentityIsNone(Branches):
    """timm RepVggBlock's form: `if self.idbn is None` picks the branches."""

    def forward(self, x):
        if self.idbn is None:
            return self.act(self.dense(x) + self.pw(x))
        return self.act(self.dense(x) + self.pw(x) + self.idbn(x))


class Gate(nn.Module):
    """A stateless user module the re-parameterization trace goes through (its code is inlined), with a flag."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def forward(self, x):
        return x * 2.0 if self.enabled else x


class GatedBlock(Branches):
    def __init__(self, c=4):
        super().__init__(c)
        self.gate = Gate()

    def forward(self, x):
        return self.act(self.gate(self.dense(x) + self.pw(x) + self.idbn(x)))


class StarArgs(Branches):
    def forward(self, x, *rest):
        return self.act(self.dense(x) + self.pw(x) + self.idbn(x))


class CalledTwoWays(nn.Module):
    """The same block instance called with and without its optional argument in one forward."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        y = self.block(x)
        return self.block(y, x)


def _prep(model, seed=0):
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.3)
    return randomize_bn(model, seed).double().eval()


@torch.no_grad()
def _close(out, ref):
    err = max_rel_error(out, ref)
    assert err < TOL, err


@torch.no_grad()
@pytest.mark.parametrize("order", ["given_first", "omitted_first"])
@pytest.mark.parametrize("block_cls,n_merged", [(OptionalSkip, 1), (SkipReplacesIdentity, 2)])
@pytest.mark.parametrize("stage", ["reparameterize", "convert"])
def test_optional_argument_every_way(block_cls, n_merged, order, stage):
    model = _prep(block_cls())
    x, skip = _t(2, 4, 7, 7), _t(2, 4, 7, 7, seed=1)
    if stage == "reparameterize":
        out, report = fusedconv.reparameterize(model, return_report=True)
    else:
        out, report = fusedconv.convert(model, return_report=True)
    calls = [(x, skip), (x,), (x, None)]
    for args in (calls if order == "given_first" else calls[::-1]):
        _close(out(*args), model(*args))
    assert type(out) is not block_cls and isinstance(out, block_cls)  # the guarded subclass of its own class
    # Both call patterns were traced while the branches existed: merged, no BN left, either way.
    for args in ((x,), (x, skip)):
        counts = count_ops(out, *args)
        assert batch_norm_count(counts) == 0, counts
    convs = [n for n, m in out.named_modules() if isinstance(m, (nn.Conv2d, FusedConv2d))]
    assert len(convs) == n_merged, convs
    assert not any(k.startswith(("dense", "pw", "idbn")) for k in out.state_dict()), list(out.state_dict())
    (scope, cls, specs), = report.guards
    assert cls == block_cls.__name__ and specs


@torch.no_grad()
@pytest.mark.parametrize("stage", ["reparameterize", "convert"])
def test_same_instance_called_two_ways(stage):
    model = _prep(CalledTwoWays(SkipReplacesIdentity()))
    x = _t(1, 4, 6, 6)
    out = getattr(fusedconv, stage)(model)
    _close(out(x), model(x))
    assert batch_norm_count(count_ops(out, x)) == 0


@torch.no_grad()
@pytest.mark.parametrize("stage", ["reparameterize", "convert"])
def test_flag_flipped_after_reparameterize_raises(stage):
    model = _prep(IdentityFlag())
    x = _t(1, 4, 6, 6)
    out, report = getattr(fusedconv, stage)(model, return_report=True)
    _close(out(x), model(x))
    assert any("self.use_identity=True" in g for g in report.guards[0][2])
    out.use_identity = False  # the original would now drop its identity branch: the merged conv has it
    with pytest.raises(GuardMiss, match=r"IdentityFlag at '<root>'.*self\.use_identity=True"):
        out(x)
    out.use_identity = True
    _close(out(x), model(x))


@torch.no_grad()
@pytest.mark.parametrize("stage", ["reparameterize", "convert"])
def test_merged_branch_set_to_none_raises(stage):
    model = _prep(IdentityIsNone())
    x = _t(1, 4, 6, 6)
    out = getattr(fusedconv, stage)(model)
    _close(out(x), model(x))
    assert not hasattr(out, "idbn")  # merged away, not in the state any more
    out.idbn = None
    with pytest.raises(GuardMiss, match=r"self\.idbn was merged away"):
        out(x)
    del out.idbn
    _close(out(x), model(x))


@torch.no_grad()
@pytest.mark.parametrize("stage", ["reparameterize", "convert"])
def test_flag_on_a_traced_through_child_is_guarded(stage):
    """The trace inlines Gate's forward: flipping its flag later must not leave the inlined `* 2` running."""
    model = _prep(GatedBlock())
    x = _t(1, 4, 6, 6)
    out, report = getattr(fusedconv, stage)(model, return_report=True)
    _close(out(x), model(x))
    assert isinstance(out.gate, Gate)  # stateless children stay
    out.gate.enabled = False
    with pytest.raises(GuardMiss, match=r"self\.gate\.enabled=True"):
        out(x)
    out.gate.enabled = True
    _close(out(x), model(x))


@torch.no_grad()
def test_reparameterize_then_convert_and_converting_twice():
    model = _prep(nn.Sequential(IdentityFlag(), OptionalSkip()))
    x = _t(1, 4, 6, 6)
    merged = fusedconv.reparameterize(model)
    assert fusedconv.reparameterize(merged, inplace=True) is merged  # merged blocks are not merged again
    converted, report = fusedconv.convert(merged, return_report=True)
    assert [r.kind for r in report.fused] == ["conv_bn_act", "conv_bn_act"]
    _close(converted(x), model(x))
    again, report = fusedconv.convert(converted, return_report=True)
    assert not report.fused
    _close(again(x), model(x))
    assert all(guard_table(m).kind == "convert" for m in again if guard_table(m) is not None)


@torch.no_grad()
def test_star_args_forward_is_not_merged():
    model = _prep(StarArgs())
    x = _t(1, 4, 6, 6)
    out, report = fusedconv.reparameterize(model, return_report=True)
    assert not report.fused and any("cannot be guarded" in n for n in report.notes), str(report)
    _close(out(x), model(x))
    _close(out(x, 1, 2), model(x, 1, 2))


@torch.no_grad()
def test_child_replaced_after_convert_takes_the_base_path_or_raises():
    """convert over a re-parameterized block keeps the re-parameterization's guards as its base: replacing the
    activation invalidates both, which raises rather than running the fused epilogue's stale activation."""
    model = _prep(OptionalSkip())
    x = _t(1, 4, 6, 6)
    out = fusedconv.convert(model)
    table = guard_table(out)
    assert table.kind == "convert" and table.base is not None and table.base.kind == "reparam"
    _close(out(x), model(x))
    out.act = nn.Tanh()
    with pytest.raises(GuardMiss, match="self.act"):
        out(x)


@torch.no_grad()
def test_convert_fallback_over_the_base_is_exact():
    """A call convert's guards reject but the base accepts runs the re-parameterized code over role children."""
    model = _prep(OptionalSkip())
    x = _t(1, 4, 6, 6)
    out = fusedconv.convert(model)
    table = guard_table(out)
    for s in table.entries:  # make convert's own specializations miss (as a pattern it could not trace would)
        s.guard = "False"
    table._compile()
    _close(out(x), model(x))
    _close(out(x, x), model(x, x))
    assert table.fallback_calls == 2


@torch.no_grad()
def test_hooked_branch_is_not_merged():
    model = _prep(OptionalSkip())
    seen = []
    model.pw.register_forward_hook(lambda m, i, o: seen.append(o))
    x = _t(1, 4, 6, 6)
    out, report = fusedconv.reparameterize(model, return_report=True)
    # The hooked branch stays a branch (the other two merge around it) and its hook sees real tensors only.
    assert [r.detail.split(" (")[0] for r in report.fused] == ["2 branches"], str(report)
    assert "pw.0.weight" in out.state_dict()
    _close(out(x), model(x))
    assert len(seen) == 2 and all(type(t) is torch.Tensor for t in seen)  # the copy's hook fired too
    fired = []  # a hook on a merged block fires
    merged = fusedconv.reparameterize(_prep(OptionalSkip()))
    merged.register_forward_hook(lambda m, i, o: fired.append(o))
    merged(x)
    assert len(fired) == 1


@torch.no_grad()
@pytest.mark.parametrize("stage", ["reparameterize", "convert"])
def test_copies_pickle_and_dtype_moves_keep_the_guards(stage):
    model = _prep(nn.Sequential(IdentityFlag(), OptionalSkip()))
    x = _t(1, 4, 6, 6)
    out = getattr(fusedconv, stage)(model)
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (copy.deepcopy(out), loaded):
        _close(m(x), model(x))
        m[0].use_identity = False
        with pytest.raises(GuardMiss):
            m(x)
    half = copy.deepcopy(out).float()
    assert max_rel_error(half(x.float()), model(x)) < 1e-5
    state = out.state_dict()
    params = ["bias", "weight"] if stage == "reparameterize" else ["scale", "shift", "weight"]
    assert sorted(state) == [f"{i}.reparam_conv.{p}" for i in (0, 1) for p in params]
    fresh = getattr(fusedconv, stage)(_prep(nn.Sequential(IdentityFlag(), OptionalSkip()), seed=5))
    fresh.load_state_dict(state)
    _close(fresh(x), model(x))


# ---------------------------------------------------------------------------------------------- timm models
@pytest.fixture(scope="module", params=[("repvgg_a0", "RepVggBlock"), ("mobileone_s0", "MobileOneBlock")])
def timm_model(request):
    timm = pytest.importorskip("timm")
    name, block = request.param
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False), seed=1).double().eval()
    return model, block


@torch.no_grad()
def test_timm_models_float64(timm_model):
    model, block = timm_model
    n_blocks = sum(type(m).__name__ == block for m in model.modules())
    x = _t(1, 3, 64, 64)
    ref = model(x)
    reparam, report = fusedconv.reparameterize(model, return_report=True)
    _close(reparam(x), ref)
    counts = count_ops(reparam, x)
    assert counts["convolution"] == n_blocks and batch_norm_count(counts) == 0, counts
    guarded = [(s, c, g) for s, c, g in report.guards if c == block]
    assert len(guarded) == n_blocks and all(g for _, _, g in guarded)
    # timm's own inference path reads `self.reparam_conv`: the merged conv sits there, as after its own
    # reparameterize(), and the guard says so.
    assert all(any("self.reparam_conv is None" not in d for d in g) for _, _, g in guarded)
    assert sum(type(m).__name__ == block for m in reparam.modules()) == n_blocks  # blocks keep their class
    converted, creport = fusedconv.convert(model, return_report=True)
    _close(converted(x), ref)
    counts = count_ops(converted, x)
    assert counts["convolution"] + counts["_convolution_pointwise"] == n_blocks and batch_norm_count(counts) == 0
    assert sum(isinstance(m, FusedConv2d) and m.act.name != "identity" for m in converted.modules()) == n_blocks
    assert len([g for g in creport.guards if g[1] == block]) == n_blocks


@torch.no_grad()
def test_reparameterized_and_converted_compiles_and_exports():
    model = _prep(nn.Sequential(IdentityFlag(), OptionalSkip())).float()
    x = torch.randn(1, 4, 8, 8)
    converted = fusedconv.convert(model)
    ref = model(x)
    compiled = torch.compile(converted, fullgraph=True)
    assert max_rel_error(compiled(x), ref) < 1e-5
    ep = torch.export.export(converted, (x,))
    assert not any("batch_norm" in str(n.target) for n in ep.graph.nodes)
    assert max_rel_error(ep.module()(x), ref) < 1e-5


def test_reparameterized_and_converted_onnx_matches_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _prep(nn.Sequential(IdentityFlag(), OptionalSkip())).float()
    x = torch.randn(1, 4, 8, 8)
    converted = fusedconv.convert(model)
    buf = io.BytesIO()
    torch.onnx.export(converted, (x,), dynamo=True, verbose=False).save(buf)
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops, ops
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert max_rel_error(torch.from_numpy(out), model(x)) < 1e-4


class SqueezeExcite(nn.Module):
    """A user module with its own conv -> BN -> ReLU chain; the re-parameterization trace goes through it."""

    def __init__(self, c=4):
        super().__init__()
        self.fc1, self.bn, self.act = nn.Conv2d(c, 2, 1), nn.BatchNorm2d(2), nn.ReLU()
        self.fc2 = nn.Conv2d(2, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.bn(self.fc1(s)))))


class ExcitedBlock(Branches):
    """timm's MobileOneBlock with use_se (FastViT's final_conv): the merged sum goes through a child that holds
    a chain of its own."""

    def __init__(self, c=4):
        super().__init__(c)
        self.se = SqueezeExcite(c)

    def forward(self, x):
        return self.act(self.se(self.dense(x) + self.pw(x) + self.idbn(x)))


@torch.no_grad()
def test_chain_inside_a_traced_through_child_of_a_merged_block():
    """Its merged code calls the child's modules directly (and pins them): fusing inside that child on its own
    broke every call of the converted model with GuardMiss. Now the child is left to the block's own rewrite."""
    model = _prep(ExcitedBlock())
    x = _t(2, 4, 6, 6)
    converted, report = fusedconv.convert(model, return_report=True)
    _close(converted(x), model(x))
    _close(converted(x[:1]), model(x[:1]))
    assert batch_norm_count(count_ops(converted, x)) == 0  # the child's chain is fused too, not left behind


class IdentityAct(Branches):
    """The branches' sum through an nn.Identity the block calls as its activation: the merged graph drops that call
    (so that convert sees the merged conv's output directly)."""

    def __init__(self, c=4):
        super().__init__(c)
        self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.dense(x) + self.pw(x) + self.idbn(x))


@torch.no_grad()
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("edit", ["hook", "instance forward"])
def test_a_hook_on_a_dropped_identity_call_is_not_skipped(edit, flatten):
    """Found by bench/random_sweep.py: a forward hook on `act` after convert was skipped (relative error 1.2)."""
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), IdentityAct()))
    x = _t(2, 3, 6, 6)
    out = fusedconv.convert(model, flatten=flatten)
    _close(out(x), model(x))
    if edit == "hook":
        out[1].act.register_forward_hook(lambda m, args, y: y * 1.5)
    else:
        out[1].act.forward = lambda y: y * 1.5
    with pytest.raises(GuardMiss, match="IdentityAct"):
        out(x)  # (the merged weights could run it, but no guard allows the call now: loud, not stale)
