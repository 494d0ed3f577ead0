"""What a traced forward consults besides its arguments and its module (fusedconv/graph/model_code.py).

A module-level value, a setting of another model module, a flag list or dict, a helper object held on the block,
a global-state query: fx evaluates each once, while tracing, and the graph keeps that outcome. Each block here is
converted in float64, the value it consults is changed afterwards (or the call is made in the other grad mode), and
the converted model must still compute what the original computes: by a guard that sends the call to the exact
fallback, or by not rewriting the block at all. Each test also shows the block is fused while nothing changed, so
a guard, not a skipped conversion, is what keeps it exact.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import random
import sys
import types
from os import getenv

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.graph import model_code  # noqa: E402

TOL = 1e-12  # float64: a real mistake shows as O(1)

SCALE = 1.0
FLAGS = [True, 2]
SETTINGS = {"negate": False, "shift": 0.0}

# A model module of its own (a file outside torch and the standard library, as a user's `config.py` would be).
config = types.ModuleType("fusedconv_test_config")
config.__file__ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusedconv_test_config.py")
config.GAIN = 1.0
sys.modules[config.__name__] = config


class Settings:
    """A helper object a block keeps and consults (its contents are what matter, not its identity)."""

    def __init__(self):
        self.gain = 1.0


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _convert(model, **kwargs):
    model = randomize_bn(model).double().eval()
    converted, report = fusedconv.convert(model, return_report=True, reparameterize=False, **kwargs)
    return model, converted, report


def _close(a, b):
    with torch.no_grad():
        assert max_rel_error(a, b) < TOL


def _copies(converted) -> tuple:
    """A deep copy of the converted model and one saved with torch.save and loaded back."""
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    return copy.deepcopy(converted), torch.load(buffer, weights_only=False)


def _not_traced(report, reason: str) -> None:
    """The block was left as written (only its children could convert), for a reason the report names."""
    assert not report.fused
    assert any(reason in text for text in [*report.notes, *(r.detail for r in report.rows)]), report.rows


def _exact_without_fallback(original, converted):
    """The converted model computes what the original does, and every guard held (no call took the fallback)."""
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        _close(converted(x), original(x))
    assert sum(fusedconv.graph.specialize.guard_table(m).fallback_calls for m in converted.modules()
               if fusedconv.graph.specialize.guard_table(m) is not None) == 0


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def body(self, x):
        return torch.relu(self.bn(self.conv(x)))


class GlobalScale(_Block):
    def forward(self, x):
        return self.body(x) * SCALE


class GlobalFlagList(_Block):
    def forward(self, x):
        y = self.body(x)
        return y * FLAGS[1] if FLAGS[0] else -y


class GlobalDict(_Block):
    def forward(self, x):
        y = self.body(x) + SETTINGS["shift"]
        return -y if SETTINGS["negate"] else y


class ConfigModule(_Block):
    def forward(self, x):
        return self.body(x) * config.GAIN


class LocalImportModule(_Block):
    def forward(self, x):
        import fusedconv_test_config as settings  # an import inside the forward: the name is local, GAIN is not

        return self.body(x) * settings.GAIN


class LocalFromImport(_Block):
    def forward(self, x):
        from fusedconv_test_config import GAIN

        return self.body(x) * GAIN


class Defaults:
    """A class used as a namespace of settings, read as `Defaults.GAIN` (never instantiated)."""

    GAIN = 1.0
    FLAGS = [True]

    @staticmethod
    def twice(t):
        return t * 2


class DerivedDefaults(Defaults):
    """Inherits GAIN: the read finds it in Defaults' dict."""


config.Nested = Defaults  # reached as config.Nested.GAIN: a class held by another model module


class ClassNamespaceGain(_Block):
    def forward(self, x):
        y = self.body(x) * DerivedDefaults.GAIN
        return y if Defaults.FLAGS[0] else -y


class NestedNamespaceGain(_Block):
    def forward(self, x):
        return self.body(x) * config.Nested.GAIN


class ClassNamespaceMethod(_Block):
    def forward(self, x):
        return Defaults.twice(self.body(x))


class ClassLevelScale(_Block):
    scale = 1.0  # a class attribute the forward reads through self

    def forward(self, x):
        return self.body(x) * self.scale


class AttributeList(_Block):
    def __init__(self):
        super().__init__()
        self.gains = [1.0, 1.0]

    def forward(self, x):
        return self.body(x) * self.gains[0]


class GradModeBranch(_Block):
    def forward(self, x):
        y = self.body(x)
        return y * 2 if torch.is_grad_enabled() else y


class Holder(nn.Module):
    """A submodule the block consults for a setting (and calls as a layer)."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return x


class ChildSetting(_Block):
    def __init__(self):
        super().__init__()
        self.holder = nn.Sequential(Holder())

    def forward(self, x):
        return self.holder(self.body(x)) * self.holder[0].factor


class EnvironmentFlag(_Block):
    def __init__(self, spelling: str = "environ"):
        super().__init__()
        self.spelling = spelling

    def forward(self, x):
        y = self.body(x)
        if self.spelling == "environ":
            negate = os.environ.get("FUSEDCONV_TEST_NEGATE")
        elif self.spelling == "getenv":
            negate = os.getenv("FUSEDCONV_TEST_NEGATE")
        else:
            negate = getenv("FUSEDCONV_TEST_NEGATE")
        return -y if negate else y


class TracingBranch(_Block):
    def forward(self, x):
        y = self.body(x)
        return y if torch.jit.is_tracing() or torch.compiler.is_compiling() else y * 3


class FxTracingBranch(_Block):
    def forward(self, x):
        y = self.body(x)
        return y if torch.fx._symbolic_trace.is_fx_tracing() else y * 3


def _wrapped(block):
    return nn.Sequential(nn.Identity(), block, nn.ReLU())


def _set_global(name, value):
    old = globals()[name]
    globals()[name] = value
    return old


CHANGES = {
    # block class -> (change, undo)
    GlobalScale: (lambda m: _set_global("SCALE", 3.0), lambda m, old: _set_global("SCALE", old)),
    GlobalFlagList: (lambda m: FLAGS.__setitem__(0, False), lambda m, old: FLAGS.__setitem__(0, True)),
    GlobalDict: (lambda m: SETTINGS.update(negate=True), lambda m, old: SETTINGS.update(negate=False)),
    ConfigModule: (lambda m: setattr(config, "GAIN", -2.0), lambda m, old: setattr(config, "GAIN", 1.0)),
    LocalImportModule: (lambda m: setattr(config, "GAIN", -2.0), lambda m, old: setattr(config, "GAIN", 1.0)),
    LocalFromImport: (lambda m: setattr(config, "GAIN", -2.0), lambda m, old: setattr(config, "GAIN", 1.0)),
    ClassLevelScale: (lambda m: setattr(ClassLevelScale, "scale", 0.5),
                      lambda m, old: setattr(ClassLevelScale, "scale", 1.0)),
    ClassNamespaceGain: (lambda m: setattr(Defaults, "GAIN", -2.0), lambda m, old: setattr(Defaults, "GAIN", 1.0)),
    NestedNamespaceGain: (lambda m: setattr(Defaults, "GAIN", 4.0), lambda m, old: setattr(Defaults, "GAIN", 1.0)),
}


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("block", list(CHANGES))
def test_module_level_values_are_guarded(block, flatten):
    original, converted, report = _convert(_wrapped(block()), flatten=flatten)
    assert report.fused, report.notes
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        _close(converted(x), original(x))
        change, undo = CHANGES[block]
        old = change(None)
        try:
            # Without the guard the graph keeps the trace-time value: off by O(1).
            _close(converted(x), original(x))
        finally:
            undo(None, old)
        _close(converted(x), original(x))


def test_guard_names_the_module_level_value():
    _, _, report = _convert(_wrapped(GlobalScale()), flatten=False)
    assert any("SCALE = 1.0" in spec for _, _, specs in report.guards for spec in specs), report.guards


def test_plain_list_attribute_edited_in_place():
    original, converted, report = _convert(_wrapped(AttributeList()), flatten=False)
    assert report.fused
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        _close(converted(x), original(x))
        # convert copied the model: edit both lists the same way
        original[1].gains[0] = converted[1].gains[0] = -4.0
        _close(converted(x), original(x))


class HelperObject(_Block):
    def __init__(self):
        super().__init__()
        self.settings = Settings()

    def forward(self, x):
        return self.body(x) * self.settings.gain


@pytest.mark.parametrize("flatten", [True, False])
def test_submodule_setting_read_by_the_forward(flatten):
    original, converted, report = _convert(_wrapped(ChildSetting()), flatten=flatten)
    assert report.fused
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        _close(converted(x), original(x))
        original[1].holder[0].factor = converted[1].holder[0].factor = -3.0
        _close(converted(x), original(x))


class SlopeScaled(nn.Module):
    """No conv chain of its own (the flat forward traces through it): reads a setting of a torch.nn layer it calls."""

    def __init__(self):
        super().__init__()
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        return self.act(x) * self.act.negative_slope


def test_layer_setting_read_by_a_forward_the_flat_graph_goes_through():
    original, converted, report = _convert(nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), SlopeScaled()))
    assert report.fused
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        _close(converted(x), original(x))
        original[3].act.negative_slope = converted[-1].act.negative_slope = 0.5
        _close(converted(x), original(x))


@pytest.mark.parametrize("spelling", ["environ", "getenv", "imported getenv"])
def test_environment_read_is_not_baked_in(monkeypatch, spelling):
    original, converted, report = _convert(_wrapped(EnvironmentFlag(spelling)))
    assert not report.fused
    assert any(("environ" if spelling == "environ" else "getenv") in r.detail for r in report.rows), report.rows
    monkeypatch.setenv("FUSEDCONV_TEST_NEGATE", "1")
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        _close(converted(x), original(x))


def test_helper_object_contents_are_not_baked_in():
    block = randomize_bn(HelperObject()).double().eval()
    reference = copy.deepcopy(block)
    converted, report = fusedconv.convert(_wrapped(block).eval(), return_report=True, reparameterize=False,
                                          inplace=True)
    assert not report.fused
    assert any("settings (Settings)" in r.detail for r in report.rows), report.rows
    x = _t(2, 4, 8, 8)
    block.settings.gain = reference.settings.gain = 5.0
    with torch.no_grad():
        _close(converted(x), torch.relu(reference(x)))


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("block, query", [(GradModeBranch, "is_grad_enabled"), (FxTracingBranch, "is_fx_tracing")])
def test_global_state_queries_are_not_traced(block, query, flatten):
    original, converted, report = _convert(_wrapped(block()), flatten=flatten)
    assert not report.fused
    assert any(query in r.detail for r in report.rows), report.rows
    x = _t(2, 4, 8, 8)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            _close(converted(x), original(x))


@pytest.mark.parametrize("flatten", [True, False])
def test_tracing_queries_are_guarded(flatten):
    # The graph holds the answer "not tracing": it runs only where that holds; jit tracing takes the block's own
    # forward (smp's models skip an input check this way).
    original, converted, report = _convert(_wrapped(TracingBranch()), flatten=flatten)
    assert report.fused
    assert any("not traced or compiled" in spec for _, _, specs in report.guards for spec in specs), report.guards
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        _close(converted(x), original(x))
        traced = torch.jit.trace(converted, x, check_trace=False)
        _close(traced(x), torch.jit.trace(original, x, check_trace=False)(x))


def test_guards_follow_copies_and_pickles():
    original, converted, report = _convert(_wrapped(GlobalScale()))
    assert report.fused
    x = _t(2, 4, 8, 8)
    for copied in _copies(converted):
        old = _set_global("SCALE", 3.0)
        try:
            with torch.no_grad():
                _close(copied(x), original(x))
        finally:
            _set_global("SCALE", old)


@pytest.mark.parametrize("block", [GlobalScale, GradModeBranch])
def test_found_while_a_profiler_holds_the_hook(block):
    # With sys.setprofile taken by someone else, the code a forward can reach is scanned instead.
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(event))
    try:
        original, converted, report = _convert(_wrapped(block()), flatten=False)
    finally:
        sys.setprofile(None)
    assert calls
    x = _t(2, 4, 8, 8)
    if block is GradModeBranch:
        assert not report.fused
        with torch.enable_grad():
            _close(converted(x), original(x))
    else:
        assert report.fused
        old = _set_global("SCALE", -1.5)
        try:
            with torch.no_grad():
                _close(converted(x), original(x))
        finally:
            _set_global("SCALE", old)


_COLLECTIONS = [0]


def _count_collection(phase, info):
    # A gc callback outside the model (hypothesis installs one like it): its reads are not the forward's.
    global _GC_RUNS
    _GC_RUNS = _COLLECTIONS[0] = _COLLECTIONS[0] + 1


_GC_RUNS = 0


def test_garbage_collection_during_the_trace_adds_no_guard():
    import gc

    threshold = gc.get_threshold()
    gc.callbacks.append(_count_collection)
    gc.set_threshold(1)  # a collection at nearly every allocation, were the collector on during the trace
    try:
        original, converted, report = _convert(_wrapped(GlobalScale()), flatten=False)
    finally:
        gc.callbacks.remove(_count_collection)
        gc.set_threshold(*threshold)
    assert report.fused
    assert not any("_GC_RUNS" in spec or "_COLLECTIONS" in spec for _, _, specs in report.guards for spec in specs)
    _exact_without_fallback(original, converted)


def test_same_plain_compares_types():
    assert model_code.same_plain([1, (2.0, "a")], [1, (2.0, "a")])
    assert not model_code.same_plain([1], [1.0])
    assert not model_code.same_plain([1], [True])
    assert not model_code.same_plain({"a": 1}, {"a": 1, "b": 2})


def test_guard_kinds():
    assert model_code.guard_kind(1.5) == "value"
    assert model_code.guard_kind({"a": [1, 2]}) == "value"
    assert model_code.guard_kind(torch.ones(1)) == "identity"
    assert model_code.guard_kind(torch.relu) == "code"
    assert model_code.guard_kind(Settings()) is None
    assert model_code.guard_kind([nn.ReLU()]) is None  # a list of modules: contents a guard cannot compare
    assert model_code.guard_kind(functools.lru_cache(maxsize=None)(abs)) == "code"


def test_numpy_values():
    np = pytest.importorskip("numpy")
    assert model_code.guard_kind(np.sqrt) == "code"
    assert model_code.guard_kind(np.float32(2.0)) == "identity"
    assert model_code.guard_kind(np.ones(2)) is None


def doubled(t):
    return t * 2


def _closure_block(kind: str):
    """A block class made by a factory whose forward reads the factory's variables (closure cells), and a function
    that changes them afterwards: rebinding (`nonlocal`) or editing in place."""
    scale = 1.0
    gains = [1.0]
    offset = torch.zeros(1, dtype=torch.float64)
    activation = doubled

    class ClosureBlock(_Block):
        def forward(self, x):
            y = self.body(x)
            if kind == "value":
                return y * scale
            if kind == "list":
                return y * gains[0]
            if kind == "function":
                return activation(y)
            return y + offset

    def change():
        # Only the variable of this kind: a guard on another cell must not be what catches the change.
        nonlocal scale, offset, activation
        if kind == "value":
            scale = 3.0
        elif kind == "list":
            gains[0] = -2.0
        elif kind == "function":
            activation = torch.sigmoid
        else:
            offset = torch.ones(1, dtype=torch.float64)

    return ClosureBlock, change


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("kind", ["value", "list", "tensor", "function"])
def test_closure_variables_are_guarded(kind, flatten):
    block, change = _closure_block(kind)
    original, converted, report = _convert(_wrapped(block()), flatten=flatten)
    assert report.fused, report.notes
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        _close(converted(x), original(x))
        change()
        # Without the guard the graph keeps the trace-time value of the cell: off by O(1).
        _close(converted(x), original(x))
    if kind != "function":  # (code's identity terms are not listed in the report)
        assert any("closure variable" in spec for _, _, specs in report.guards for spec in specs), report.guards


class InnerClosures(_Block):
    """Closures made inside the forward (a lambda, a comprehension) read its own locals: nothing to guard."""

    def forward(self, x):
        k = 2.0
        scaled = lambda t: t * k  # noqa: E731
        return [scaled(t) for t in (self.body(x),)][0]


def test_closures_made_during_the_call_need_no_guard():
    original, converted, report = _convert(_wrapped(InnerClosures()), flatten=False)
    assert report.fused, report.notes
    assert not any("closure variable" in spec for _, _, specs in report.guards for spec in specs), report.guards
    _exact_without_fallback(original, converted)


def test_closure_holding_an_object_is_not_baked_in():
    settings = Settings()

    class HelperClosure(_Block):
        def forward(self, x):
            return self.body(x) * settings.gain

    original, converted, report = _convert(_wrapped(HelperClosure()))
    x = _t(2, 4, 8, 8)
    settings.gain = -3.0
    with torch.no_grad():
        _close(converted(x), original(x))
    assert any("closure variable settings" in note for note in report.notes), report.notes


def test_closure_guard_while_a_profiler_holds_the_hook():
    block, change = _closure_block("value")
    sys.setprofile(lambda frame, event, arg: None)
    try:
        original, converted, report = _convert(_wrapped(block()), flatten=False)
    finally:
        sys.setprofile(None)
    assert report.fused
    x = _t(2, 4, 8, 8)
    change()
    with torch.no_grad():
        _close(converted(x), original(x))


PickledClosureBlock, _change_pickled_closure = _closure_block("value")
PickledClosureBlock.__qualname__ = "PickledClosureBlock"  # importable by name: the model pickles


def test_closure_guards_follow_copies_and_miss_after_pickling():
    original, converted, report = _convert(_wrapped(PickledClosureBlock()))
    assert report.fused
    x = _t(2, 4, 8, 8)
    copies = _copies(converted)
    _change_pickled_closure()  # the cell is the class's, shared by every copy of the model
    with torch.no_grad():
        for model in copies:
            _close(model(x), original(x))


def test_class_namespace_flag_list_edited_in_place():
    original, converted, report = _convert(_wrapped(ClassNamespaceGain()))
    assert report.fused, report.notes
    x = _t(2, 4, 8, 8)
    Defaults.FLAGS[0] = False
    try:
        with torch.no_grad():
            _close(converted(x), original(x))
    finally:
        Defaults.FLAGS[0] = True
    assert any("Defaults.FLAGS" in spec for _, _, specs in report.guards for spec in specs), report.guards


def test_class_namespace_method_needs_no_guard():
    original, converted, report = _convert(_wrapped(ClassNamespaceMethod()))
    assert report.fused, report.notes
    assert not any("Defaults" in spec for _, _, specs in report.guards for spec in specs), report.guards
    _exact_without_fallback(original, converted)


def test_class_namespace_guard_follows_copies_and_pickles():
    original, converted, report = _convert(_wrapped(ClassNamespaceGain()))
    assert report.fused
    x = _t(2, 4, 8, 8)
    copies = _copies(converted)
    Defaults.GAIN = 3.0
    try:
        with torch.no_grad():
            for model in copies:
                _close(model(x), original(x))
    finally:
        Defaults.GAIN = 1.0


THRESHOLD = torch.ones((), dtype=torch.float64)  # a module-level tensor whose value picks a branch


class TensorValueBranch(_Block):
    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.limit = torch.ones((), dtype=torch.float64)  # a plain tensor attribute, not a buffer

    def forward(self, x):
        y = self.body(x)
        if self.where == "global":
            return y * 2 if THRESHOLD.item() > 0 else y
        return y + 1 if self.limit > 0 else y


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("where", ["global", "attribute"])
def test_tensor_values_read_while_tracing_are_not_baked_in(where, flatten):
    # fx runs `.item()` / `if t > 0` on a real tensor at trace time: the graph would keep that branch after an
    # in-place edit of the tensor (which keeps its identity): such a forward is not traced.
    original, converted, report = _convert(_wrapped(TensorValueBranch(where)), flatten=flatten)
    _not_traced(report, "reads a tensor's value")
    x = _t(2, 4, 8, 8)
    tensors = [THRESHOLD] if where == "global" else [m.limit for m in (*original.modules(), *converted.modules())
                                                       if isinstance(m, TensorValueBranch)]
    for t in tensors:
        t.fill_(-1.0)
    try:
        with torch.no_grad():
            _close(converted(x), original(x))
    finally:
        for t in tensors:
            t.fill_(1.0)


class TensorArithmetic(_Block):
    """A module-level tensor used only in tensor arithmetic: the graph reads its values on every call."""

    def forward(self, x):
        return self.body(x) * THRESHOLD


def test_tensor_used_in_arithmetic_is_still_traced():
    original, converted, report = _convert(_wrapped(TensorArithmetic()))
    assert report.fused, report.notes
    x = _t(2, 4, 8, 8)
    THRESHOLD.fill_(-3.0)
    try:
        with torch.no_grad():
            _close(converted(x), original(x))
    finally:
        THRESHOLD.fill_(1.0)


class InstanceDictRead(_Block):
    """Reads its own setting through the instance dict rather than as an attribute."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.gain = 1.0

    def forward(self, x):
        d = self.__dict__ if self.spelling == "__dict__" else vars(self)
        return self.body(x) * d["gain"]


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("spelling", ["__dict__", "vars"])
def test_instance_dict_read_is_not_baked_in(spelling, flatten):
    # The attribute-read log sees `__dict__`, not the key read in it: such a forward is not traced.
    original, converted, report = _convert(_wrapped(InstanceDictRead(spelling)), flatten=flatten)
    _not_traced(report, "__dict__ itself")
    for model in (original, converted):
        model[1].gain = 3.0
    with torch.no_grad():
        _close(converted(_t(2, 4, 8, 8)), original(_t(2, 4, 8, 8)))


def scaled(t):
    """A model function with a setting kept as an attribute of the function itself."""
    return t * scaled.gain


scaled.gain = 1.0


class FunctionAttributeGain(_Block):
    def forward(self, x):
        return scaled(self.body(x))


@pytest.mark.parametrize("flatten", [True, False])
def test_function_attribute_is_guarded(flatten):
    original, converted, report = _convert(_wrapped(FunctionAttributeGain()), flatten=flatten)
    assert report.fused, report.notes
    _exact_without_fallback(original, converted)
    assert any("function attribute scaled.gain" in spec for _, _, specs in report.guards for spec in specs), \
        report.guards
    copies = _copies(converted)
    scaled.gain = -2.5
    try:
        with torch.no_grad():
            for model in (converted, *copies):
                _close(model(_t(2, 4, 8, 8)), original(_t(2, 4, 8, 8)))
    finally:
        scaled.gain = 1.0


def test_function_attribute_guard_of_an_unimportable_function_misses_after_pickling():
    def local_scaled(t):
        return t * local_scaled.gain

    local_scaled.gain = 1.0
    namespace = model_code.FunctionNamespace(local_scaled)
    assert copy.deepcopy(namespace).d is vars(local_scaled)
    buffer = io.BytesIO()
    torch.save(namespace, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).d.get("gain", "missing") == "missing"


class DefaultConfig(_Block):
    """A forward with a mutable default argument (a config dict)."""

    def forward(self, x, cfg={"gain": 1.0}):  # noqa: B006 - the pattern under test
        return self.body(x) * cfg["gain"]


@pytest.mark.parametrize("flatten", [True, False])
def test_mutable_default_of_the_forward_is_an_argument(flatten):
    # Traced as an argument, not fixed: the graph reads the dict on every call (it used to fail to compile).
    original, converted, report = _convert(_wrapped(DefaultConfig()), flatten=flatten)
    assert report.fused, report.notes
    _exact_without_fallback(original, converted)
    DefaultConfig.forward.__defaults__[0]["gain"] = -2.0
    try:
        with torch.no_grad():
            _close(converted(_t(2, 4, 8, 8)), original(_t(2, 4, 8, 8)))
            block, reference = converted[1], original[1]
            _close(block(_t(2, 4, 8, 8), {"gain": 0.5}), reference(_t(2, 4, 8, 8), {"gain": 0.5}))
    finally:
        DefaultConfig.forward.__defaults__[0]["gain"] = 1.0


def _gained(t, gains=[1.0]):  # noqa: B006 - the pattern under test
    return t * gains[0]


class HelperDefaults(_Block):
    """A helper method and a helper function called without their mutable defaults (read at trace time)."""

    def __init__(self, helper: str):
        super().__init__()
        self.helper = helper

    def gain(self, y, cfg={"gain": 1.0}):  # noqa: B006 - the pattern under test
        return y * cfg["gain"]

    def forward(self, x):
        y = self.body(x)
        return self.gain(y) if self.helper == "method" else _gained(y)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("helper", ["method", "function"])
def test_mutable_default_of_a_helper_is_not_baked_in(helper, flatten):
    original, converted, report = _convert(_wrapped(HelperDefaults(helper)), flatten=flatten)
    _not_traced(report, "mutable default")
    edit = (lambda v: HelperDefaults.gain.__defaults__[0].__setitem__("gain", v)) if helper == "method" else \
        (lambda v: _gained.__defaults__[0].__setitem__(0, v))
    edit(3.0)
    try:
        with torch.no_grad():
            _close(converted(_t(2, 4, 8, 8)), original(_t(2, 4, 8, 8)))
    finally:
        edit(1.0)


_OWN_RNG = random.Random(0)


def _draw_random():
    import random

    return 2.0 if random.random() < 0.5 else 1.0


def _draw_randint():
    from random import randint

    return randint(1, 4)


def _draw_own_generator():
    return _OWN_RNG.uniform(0.5, 2.0)


def _draw_numpy():
    import numpy as np

    return float(np.random.rand())


def _read_clock():
    import time

    return 1.0 + time.perf_counter() % 1.0


_DRAWS = {"random.random": _draw_random, "random.randint": _draw_randint, "own Random": _draw_own_generator,
          "numpy.random": _draw_numpy, "time": _read_clock}


class NondeterministicGain(_Block):
    """A forward drawing a Python random number or reading the clock: a trace would keep one draw forever."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def forward(self, x):
        return self.body(x) * _DRAWS[self.source]()


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("source", ["random.random", "random.randint", "own Random", "numpy.random", "time"])
def test_nondeterministic_reads_are_not_baked_in(source, flatten):
    import numpy as np

    original, converted, report = _convert(_wrapped(NondeterministicGain(source)), flatten=flatten)
    assert not report.fused
    assert any("calls" in r.detail for r in report.rows), report.rows
    if source != "time":
        x = _t(2, 4, 8, 8)
        outputs = []
        for model in (original, converted):
            random.seed(7)
            np.random.seed(7)
            _OWN_RNG.seed(7)
            with torch.no_grad():
                outputs.append([model(x) for _ in range(3)])
        for a, b in zip(*outputs):
            _close(b, a)


class RandintGain(_Block):
    def forward(self, x):
        return self.body(x) * random.randint(1, 4)


def test_nondeterministic_reads_found_while_a_profiler_holds_the_hook():
    sys.setprofile(lambda frame, event, arg: None)
    try:
        _, _, report = _convert(_wrapped(RandintGain()), flatten=False)
    finally:
        sys.setprofile(None)
    assert not report.fused
    assert any("random.randint" in r.detail for r in report.rows), report.rows


ACTIVATION = doubled  # a module-level alias a forward calls, rebound by a user after convert
LAMBDA_ACTIVATION = lambda t: t * 2  # noqa: E731 - code pickle cannot carry by reference


class CallsGlobalCode(_Block):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        y = self.body(x)
        if self.name == "ACTIVATION":
            return ACTIVATION(y)
        if self.name == "doubled":
            return doubled(y)
        return LAMBDA_ACTIVATION(y)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("name", ["ACTIVATION", "doubled", "LAMBDA_ACTIVATION"])
def test_module_level_code_rebound_after_convert(name, flatten):
    # fx ran the function the name held while tracing; a name rebound later must not leave the graph behind.
    original, converted, report = _convert(_wrapped(CallsGlobalCode(name)), flatten=flatten)
    assert report.fused, report.notes
    _exact_without_fallback(original, converted)
    copies = _copies(converted)  # (the lambda's guard cannot follow a pickle: it misses, the call is exact)
    old = _set_global(name, torch.sigmoid)
    try:
        with torch.no_grad():
            for model in (converted, *copies):
                _close(model(_t(2, 4, 8, 8)), original(_t(2, 4, 8, 8)))
    finally:
        _set_global(name, old)
    with torch.no_grad():
        for model in copies:
            _close(model(_t(2, 4, 8, 8)), original(_t(2, 4, 8, 8)))


def test_code_guard_pickles_by_reference_where_it_can():
    assert model_code.CodeRef(doubled).__reduce__() == (model_code.CodeRef, (doubled,))
    assert model_code.CodeRef(LAMBDA_ACTIVATION).__reduce__()[0] is model_code.lost_code
    assert model_code.lost_code().obj is not model_code.lost_code().obj



class PostActivation(_Block):
    def post(self, y):
        return y * 2

    def forward(self, x):
        return self.post(self.body(x))


class PostActivationSub(PostActivation):
    pass


_ORIGINAL_POST = PostActivation.post


def _sigmoid_post(self, y):
    return torch.sigmoid(y)


def _fused_and_exact(block, flatten):
    """The block converted (wrapped in a Sequential), fused, exact, and every guard holding."""
    original, converted, report = _convert(_wrapped(block), flatten=flatten)
    assert report.fused, report.notes
    _exact_without_fallback(original, converted)
    return original, converted


def _fallback_calls(model) -> int:
    tables = (fusedconv.graph.specialize.guard_table(m) for m in model.modules())
    return sum(t.fallback_calls for t in tables if t is not None)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("where", ["instance", "defining class", "subclass"])
def test_method_replaced_after_convert(where, flatten):
    # The trace ran `self.post` once and kept what it did: a method shadowed on the instance or patched on a class
    # after convert must not leave the graph behind (it did: off by 0.5-0.9 in float64).
    original, converted = _fused_and_exact(PostActivationSub(), flatten)
    models = (converted, *_copies(converted))
    x = _t(2, 4, 8, 8)
    if where == "instance":
        for model in (original, *models):
            model[1].post = types.MethodType(_sigmoid_post, model[1])
    else:
        (PostActivation if where == "defining class" else PostActivationSub).post = _sigmoid_post
    try:
        with torch.no_grad():
            for model in models:
                _close(model(x), original(x))
    finally:
        PostActivation.post = _ORIGINAL_POST
        PostActivationSub.__dict__.get("post") and delattr(PostActivationSub, "post")
    if where != "instance":
        # Restored: the guards of the copy and of the unpickled model (the method pickles by reference) hold again.
        with torch.no_grad():
            for model in models:
                before = _fallback_calls(model)
                _close(model(x), original(x))
                assert _fallback_calls(model) == before


class ClassLevelCode(_Block):
    @property
    def gain(self):
        return 2.0

    @staticmethod
    def act(y):
        return y * 2

    def forward(self, x):
        return self.act(self.body(x)) * self.gain


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("name, replacement", [("gain", property(lambda self: 3.0)),
                                               ("act", staticmethod(torch.sigmoid))])
def test_property_and_staticmethod_replaced_after_convert(name, replacement, flatten):
    original, converted, report = _convert(_wrapped(ClassLevelCode()), flatten=flatten)
    assert report.fused, report.notes
    models = (converted, *_copies(converted))
    x = _t(2, 4, 8, 8)
    with torch.no_grad():  # a property or staticmethod has no name pickle could find it by: found through the class
        for model in models:
            _close(model(x), original(x))
            assert _fallback_calls(model) == 0
    saved = ClassLevelCode.__dict__[name]
    setattr(ClassLevelCode, name, replacement)
    try:
        with torch.no_grad():
            for model in models:
                _close(model(x), original(x))
    finally:
        setattr(ClassLevelCode, name, saved)


def test_class_attribute_reference_pickles_through_its_class():
    ref = model_code.ClassAttrRef(ClassLevelCode, "gain")
    assert ref.__reduce__() == (model_code.ClassAttrRef, (ClassLevelCode, "gain"))
    assert copy.deepcopy(ref) is ref
    saved = ClassLevelCode.gain
    ClassLevelCode.gain = property(lambda self: 3.0)
    try:  # the class no longer holds what the guard compares against: pickled, it is a reference to nothing
        assert ref.__reduce__()[0] is model_code.lost_code
    finally:
        ClassLevelCode.gain = saved


class SuperPost(PostActivation):
    def post(self, y):
        return super().post(y) + 1


class SuperPostTwoArgs(PostActivation):
    def post(self, y):
        return super(SuperPostTwoArgs, self).post(y) + 1


@pytest.mark.parametrize("profiler_held", [False, True])
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("block", [SuperPost, SuperPostTwoArgs])
def test_base_method_called_through_super_replaced_after_convert(block, flatten, profiler_held):
    # `super().post` is looked up in the class's MRO, not through the instance: no attribute read records it, so the
    # method it found is guarded from the code that ran (or, with the profiler hook taken, the code it can reach).
    if profiler_held:
        sys.setprofile(lambda frame, event, arg: None)
    try:
        original, converted, report = _convert(_wrapped(block()), flatten=flatten)
    finally:
        sys.setprofile(None)
    assert report.fused, report.notes
    models = (converted, *_copies(converted))
    x = _t(2, 4, 8, 8)
    with torch.no_grad():
        for model in models:  # (the base method pickles by reference: the unpickled guard holds too)
            _close(model(x), original(x))
            assert _fallback_calls(model) == 0
    PostActivation.post = _sigmoid_post
    try:
        with torch.no_grad():
            for model in models:
                _close(model(x), original(x))
    finally:
        PostActivation.post = _ORIGINAL_POST


def test_super_lookups_found_in_the_bytecode():
    assert model_code._super_attrs(SuperPost.post.__code__) == ((None, "post"),)
    assert model_code._super_attrs(SuperPostTwoArgs.post.__code__) == (("SuperPostTwoArgs", "post"),)
    assert model_code._super_attrs(PostActivation.forward.__code__) == ()


def scaled_by(t, gain=1.0, *, offset=0.0):
    return t * gain + offset


class DefaultsOfCalledCode(_Block):
    def post(self, y, gain=1.0):
        return y * gain

    def forward(self, x):
        return scaled_by(self.post(self.body(x)))


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("edit", ["method __defaults__", "function __defaults__", "function __kwdefaults__"])
def test_defaults_of_called_code_edited_after_convert(edit, flatten):
    # The trace used the defaults its calls left out (`gain=1.0`): replacing them afterwards (flat: off by 1.5 in
    # float64) is seen by the guard of the code that holds them.
    original, converted = _fused_and_exact(DefaultsOfCalledCode(), flatten)
    fn, attr, value = {"method __defaults__": (DefaultsOfCalledCode.post, "__defaults__", (3.0,)),
                       "function __defaults__": (scaled_by, "__defaults__", (-2.0,)),
                       "function __kwdefaults__": (scaled_by, "__kwdefaults__", {"offset": 0.5})}[edit]
    saved = getattr(fn, attr)
    setattr(fn, attr, value)
    try:
        with torch.no_grad():
            _close(converted(_t(2, 4, 8, 8)), original(_t(2, 4, 8, 8)))
    finally:
        setattr(fn, attr, saved)
    before = _fallback_calls(converted)  # restored: the guard holds again
    with torch.no_grad():
        _close(converted(_t(2, 4, 8, 8)), original(_t(2, 4, 8, 8)))
    assert _fallback_calls(converted) == before


def test_plain_defaults():
    assert model_code.plain_defaults(scaled_by) == ((1.0,), (("offset", 0.0),))
    assert model_code.plain_defaults(DefaultsOfCalledCode.forward) is None
    assert model_code.plain_defaults(staticmethod(scaled_by)) == ((1.0,), (("offset", 0.0),))
    assert model_code.plain_defaults(lambda t, cfg=[1]: t) is None  # (a mutable default: guarded elsewhere)
