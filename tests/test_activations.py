"""The activation vocabulary: modules / functions / methods -> ActivationSpec -> the same numbers as PyTorch.

Each recognised spelling is checked by running it and the spec's `apply` on the same input; unrecognised
spellings (other bounds, unknown arguments, subclasses) must give None rather than a guess.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedconv.activations import ACTIVATIONS, ActivationSpec, as_spec, spec_from_call, spec_from_module

X = torch.linspace(-8, 8, 161, dtype=torch.float64)

MODULES = [
    (nn.Identity(), "identity", 0.0),
    (nn.ReLU(), "relu", 0.0),
    (nn.ReLU(inplace=True), "relu", 0.0),
    (nn.ReLU6(), "relu6", 0.0),
    (nn.Hardtanh(0.0, 6.0), "relu6", 0.0),
    (nn.LeakyReLU(), "leaky_relu", 0.01),
    (nn.LeakyReLU(0.2), "leaky_relu", 0.2),
    (nn.SiLU(), "silu", 0.0),
    (nn.Hardswish(), "hardswish", 0.0),
    (nn.GELU(), "gelu", 0.0),
    (nn.GELU(approximate="tanh"), "gelu_tanh", 0.0),
]


@pytest.mark.parametrize("module,name,param", MODULES, ids=lambda v: repr(v) if isinstance(v, nn.Module) else None)
def test_spec_from_module_computes_the_same(module, name, param):
    spec = spec_from_module(module)
    assert spec == ActivationSpec(name, param)
    assert torch.allclose(spec.apply(X.clone()), module(X.clone()), rtol=0, atol=1e-15)
    assert as_spec(module) == spec


def test_every_name_is_reachable_from_a_module():
    assert {name for _, name, _ in MODULES} == set(ACTIVATIONS)


@pytest.mark.parametrize("module", [nn.Hardtanh(), nn.Hardtanh(0.0, 5.0), nn.Sigmoid(), nn.Tanh(), nn.ELU(),
                                    nn.PReLU(), nn.Mish()])
def test_unsupported_modules_give_none(module):
    assert spec_from_module(module) is None
    with pytest.raises(TypeError, match=rf"act: expected one of nn.ReLU.*got {type(module).__name__}"):
        as_spec(module)


def test_subclasses_are_not_assumed_alike():
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return x * 2

    assert spec_from_module(MyReLU()) is None


CALLS = [
    (F.relu, (X,), {}, "relu", 0.0),
    (F.relu, (X,), {"inplace": False}, "relu", 0.0),
    (torch.relu, (X,), {}, "relu", 0.0),
    (F.relu6, (X,), {}, "relu6", 0.0),
    (F.hardtanh, (X, 0.0, 6.0), {}, "relu6", 0.0),
    (F.hardtanh, (X,), {"min_val": 0.0, "max_val": 6.0}, "relu6", 0.0),
    (F.leaky_relu, (X,), {}, "leaky_relu", 0.01),
    (F.leaky_relu, (X, 0.3), {}, "leaky_relu", 0.3),
    (F.leaky_relu, (X,), {"negative_slope": 0.05, "inplace": False}, "leaky_relu", 0.05),
    (F.silu, (X,), {}, "silu", 0.0),
    (F.hardswish, (X,), {}, "hardswish", 0.0),
    (F.gelu, (X,), {}, "gelu", 0.0),
    (F.gelu, (X,), {"approximate": "tanh"}, "gelu_tanh", 0.0),
    (torch.clamp, (X, 0, 6), {}, "relu6", 0.0),
    (torch.clamp, (X,), {"min": 0.0}, "relu", 0.0),
    (torch.clip, (X,), {"min": 0, "max": 6}, "relu6", 0.0),
]


@pytest.mark.parametrize("target,args,kwargs,name,param", CALLS,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CALLS)])
def test_spec_from_call_computes_the_same(target, args, kwargs, name, param):
    spec = spec_from_call(target, args, kwargs)
    assert spec == ActivationSpec(name, param)
    assert torch.allclose(spec.apply(X.clone()), target(*args, **kwargs), rtol=0, atol=1e-15)


@pytest.mark.parametrize("method,args,kwargs,name", [
    ("relu", (X,), {}, "relu"),
    ("relu_", (X,), {}, "relu"),
    ("clamp", (X, 0, 6), {}, "relu6"),
    ("clamp_", (X,), {"min": 0}, "relu"),
    ("clip", (X,), {"min": 0, "max": 6}, "relu6"),
])
def test_spec_from_method_call(method, args, kwargs, name):
    spec = spec_from_call(method, args, kwargs)
    assert spec == ActivationSpec(name)
    expected = getattr(X.clone(), method)(*args[1:], **kwargs)
    assert torch.equal(spec.apply(X.clone()), expected)


@pytest.mark.parametrize("target,args,kwargs", [
    (F.hardtanh, (X,), {}),                        # default bounds (-1, 1)
    (F.hardtanh, (X, 0.0, 5.0), {}),
    (F.gelu, (X,), {"approximate": "bogus"}),
    (F.leaky_relu, (X,), {"unknown": 1}),
    (F.relu, (X, 3), {}),                          # not a bool in inplace position
    (torch.clamp, (X, -1, 1), {}),
    (torch.clamp, (X,), {"max": 6}),
    (torch.clamp, (X, torch.zeros(1)), {}),        # a tensor bound is data, not a constant
    (torch.sigmoid, (X,), {}),
    ("sigmoid", (X,), {}),
    ("relu", (X, 1), {}),
    ("clamp", (X, 1, 2), {}),
])
def test_unrecognised_calls_give_none(target, args, kwargs):
    assert spec_from_call(target, args, kwargs) is None


def test_spec_validation_names_the_argument():
    with pytest.raises(ValueError, match=r"activation: expected one of .*got 'swish'"):
        ActivationSpec("swish")
    with pytest.raises(ValueError, match=r"activation param: only 'leaky_relu' takes a parameter, got 0.5 for 'relu'"):
        ActivationSpec("relu", 0.5)
    with pytest.raises(ValueError, match=r"activation param: expected a finite float, got nan"):
        ActivationSpec("leaky_relu", float("nan"))
    with pytest.raises(ValueError, match=r"activation param: expected a finite float, got True"):
        ActivationSpec("leaky_relu", True)
    with pytest.raises(TypeError, match=r"act: expected None, a name, an ActivationSpec or an activation module, got int"):
        as_spec(3)


def test_as_spec_accepts_the_documented_forms():
    assert as_spec(None) == ActivationSpec("identity")
    assert as_spec("silu") == ActivationSpec("silu")
    spec = ActivationSpec("leaky_relu", 0.1)
    assert as_spec(spec) is spec
    assert str(spec) == "leaky_relu(0.1)" and str(ActivationSpec("gelu")) == "gelu"
    assert ActivationSpec("leaky_relu", 1).param == 1.0 and isinstance(ActivationSpec("leaky_relu", 1).param, float)


def test_spec_is_hashable_picklable_and_immutable():
    spec = ActivationSpec("leaky_relu", 0.2)
    assert pickle.loads(pickle.dumps(spec)) == spec and copy.deepcopy(spec) == spec
    assert len({spec, ActivationSpec("leaky_relu", 0.2)}) == 1
    with pytest.raises(AttributeError):
        spec.name = "relu"
