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


def _closure_block(kind: str):
    """A block class made by a factory whose forward reads the factory's variables (closure cells), and a function
    that changes them afterwards: rebinding (`nonlocal`) or editing in place."""
    scale = 1.0
    gains = [1.0]
    offset = torch.zeros(1, dtype=torch.float64)

    class ClosureBlock(_Block):
        def forward(self, x):
            y = self.body(x)
            if kind == "value":
                return y * scale
            if kind == "list":
                return y * gains[0]
            return y + offset

    def change():
        nonlocal scale, offset
        scale = 3.0
        gains[0] = -2.0
        offset = torch.ones(1, dtype=torch.float64)

    return ClosureBlock, change


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("kind", ["value", "list", "tensor"])
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
    assert not report.fused
    assert any("reads a tensor's value" in text for text in [*report.notes, *(r.detail for r in report.rows)])
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
