"""The working copy convert / reparameterize / FrozenModel make (fusedconv/model_copy.py): it computes what the
original computes even where copy.deepcopy loses state — torchvision feature extractors (a torch.fx GraphModule
that deepcopy returns in training mode) and a GraphModule root's hooks (which its deepcopy drops) — checked in
float64 against the original."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import fusedconv
from fusedconv.frozen import modules_in_training
from fusedconv.model_copy import copy_model
from fusedconv.modules import FusedConv2d
from tests.util import max_rel_error, randomize_bn


def _feature_extractor():
    model = randomize_bn(torchvision.models.resnet18(weights=None).eval(), 3).double()
    return create_feature_extractor(model, {"layer2": "mid", "layer4": "last"})


def test_deepcopy_of_a_feature_extractor_is_in_training_mode():
    # What the module mends (if torch / torchvision fix it, this test says so and the mending is a no-op).
    extractor = _feature_extractor()
    assert not modules_in_training(extractor)
    assert modules_in_training(copy.deepcopy(extractor))
    assert not modules_in_training(copy_model(extractor))


@pytest.mark.parametrize("options", ({}, {"flatten": False}, {"freeze": True}))
def test_converted_feature_extractor_computes_the_same_features(options):
    extractor = _feature_extractor()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = extractor(x)
        converted, report = fusedconv.convert(extractor, return_report=True, **options)
        for _ in range(2):  # the second call takes the routes and caches the first one set up
            got = converted(x)
            assert set(got) == set(want)
            assert all(max_rel_error(got[k], want[k]) < 1e-12 for k in want)
    assert len(report.fused) == 20  # every conv -> BN of resnet18 up to layer4
    if not options.get("freeze"):
        assert not modules_in_training(converted)
        assert sum(isinstance(m, FusedConv2d) for m in converted.modules()) == 20


def test_reparameterize_keeps_a_feature_extractor_in_eval_mode():
    extractor = _feature_extractor()
    merged = fusedconv.reparameterize(extractor)
    assert not modules_in_training(merged)


def test_root_hooks_of_a_graph_module_survive_the_copy():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval(), 1)
    traced = torch.fx.symbolic_trace(model)
    seen = []
    traced.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    traced.register_forward_hook(lambda m, args, out: seen.append("post"))
    assert not copy.deepcopy(traced)._forward_hooks  # torch's GraphModule deepcopy drops them
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        converted = fusedconv.convert(traced)
        seen.clear()
        got = converted(x)
        assert seen == ["pre", "post"]
        assert max_rel_error(got, model(x)) < 1e-5


def test_a_restored_hook_bound_to_a_module_binds_to_its_copy():
    class Counter(nn.Identity):
        calls = 0

        def count(self, module, args, out):
            self.calls += 1

    class DropsHooks(nn.Sequential):  # a container whose deepcopy loses its hooks, as GraphModule's does
        def __deepcopy__(self, memo):
            new = DropsHooks(*(copy.deepcopy(m, memo) for m in self))
            memo[id(self)] = new
            return new

    model = DropsHooks(nn.Conv2d(3, 4, 1), Counter()).eval()
    model.register_forward_hook(model[1].count)
    dup = copy_model(model)
    dup(torch.randn(1, 3, 4, 4))
    assert dup[1].calls == 1 and model[1].calls == 0


def test_mixed_training_flags_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.Sequential(nn.ReLU(), nn.Dropout(0.1))).eval()
    model[1].train()
    model[2][1].train()

    class TrainsWhenCopied(nn.Sequential):
        def __deepcopy__(self, memo):
            new = TrainsWhenCopied(*(copy.deepcopy(m, memo) for m in self))
            return new.train()

    wrapped = TrainsWhenCopied(*model)
    dup = copy_model(wrapped)
    assert [m.training for m in dup.modules()] == [m.training for m in wrapped.modules()]


def test_a_copy_with_other_submodules_is_refused():
    class Forgetful(nn.Module):
        def __init__(self, keep: bool = True):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            if keep:
                self.head = nn.Conv2d(4, 4, 1)

        def __deepcopy__(self, memo):
            return Forgetful(keep=False)

    with pytest.raises(RuntimeError, match=r"model: copy.deepcopy\(model\) gives a model with other submodules"):
        copy_model(Forgetful())


@pytest.mark.parametrize("entry", ("convert", "reparameterize"))
def test_lazy_modules_before_their_first_forward_are_refused(entry):
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.LazyConv2d(4, 1),
                          nn.LazyBatchNorm2d()).eval()
    with pytest.raises(ValueError, match=r"model: expected initialized parameters, got 8 uninitialized \(lazy\) "
                                         r"parameter\(s\) or buffer\(s\), e.g. '0.weight'; run one forward pass"):
        getattr(fusedconv, entry)(model)


def test_lazy_modules_initialized_by_example_inputs_convert_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.LazyConv2d(4, 1),
                          nn.LazyBatchNorm2d()).eval()
    x = torch.randn(1, 3, 8, 8)
    converted, report = fusedconv.convert(model, example_inputs=x, return_report=True)
    assert len(report.fused) == 2
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-5


def test_a_pruned_model_gets_a_clear_error_or_converts_after_a_forward():
    import torch.nn.utils.prune as prune

    def pruned():
        model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                           nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval(), 1).double()
        prune.l1_unstructured(model[0], "weight", 0.5)  # its weight: weight_orig * mask, computed with autograd
        return model

    with pytest.raises(RuntimeError, match=r"model: copy.deepcopy\(model\) failed \(.*\); run one forward pass "
                                           r"under torch.no_grad\(\) first"):
        fusedconv.convert(pruned())
    model, x = pruned(), torch.randn(1, 3, 10, 10, dtype=torch.float64)
    converted, report = fusedconv.convert(model, example_inputs=x, return_report=True)
    with torch.no_grad():
        assert max_rel_error(converted(x), model(x)) < 1e-12
    assert len(report.fused) == 1  # the pruned conv keeps its pruning hook: not fused
