"""FusedConv2d.__call__ (fusedconv/modules.py) behaves exactly as nn.Module.__call__.

FusedConv2d skips nn.Module.__call__ when nothing needs it (no hooks of any kind, no jit tracing, no
module.compile(), nothing patched). Each test runs the same scenario twice, once as is and once with
FusedConv2d's own __call__ removed (`inherited_call`: the class then inherits nn.Module.__call__, patched or not,
exactly as any module does), and requires the same observable behaviour: hook calls and what they saw,
outputs (bit for bit), gradients, the graphs torch.jit.trace / torch.compile / torch.export / torch.fx record.
The outputs are also checked against nn.Conv2d -> nn.BatchNorm2d(eval) -> ReLU in float64.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

from fusedconv import cpu  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

TOL_FP32 = 1e-5
CL = torch.channels_last


@contextlib.contextmanager
def inherited_call():
    """FusedConv2d without its own __call__ (the reference behaviour: nn.Module.__call__ as inherited)."""
    own = FusedConv2d.__dict__["__call__"]
    del FusedConv2d.__call__
    try:
        assert FusedConv2d.__call__ is nn.Module.__call__
        yield
    finally:
        FusedConv2d.__call__ = own


def both_ways(scenario, *args):
    """scenario(*args) with FusedConv2d's __call__, then with the inherited one: (ours, reference)."""
    ours = scenario(*args)
    with inherited_call():
        reference = scenario(*args)
    return ours, reference


def make_block(seed=0):
    """(reference Conv2d -> BN -> ReLU, FusedConv2d) with the same weights."""
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Conv2d(4, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU()).eval()
    randomize_bn(ref, seed)
    return ref, FusedConv2d.from_modules(ref[0], ref[1], ref[2])


def reference64(ref, x):
    with torch.no_grad():
        return copy.deepcopy(ref).double()(x.double())


def inputs(fmt=torch.contiguous_format):
    torch.manual_seed(1)
    return torch.randn(2, 4, 7, 7).contiguous(memory_format=fmt)


def test_the_reference_differs_in_call_alone():
    # The comparisons below mean something only if FusedConv2d has its own __call__ and removing it leaves the
    # class otherwise the same.
    assert "__call__" in FusedConv2d.__dict__
    forward = FusedConv2d.forward
    with inherited_call():
        assert FusedConv2d.__call__ is nn.Module.__call__ and FusedConv2d.forward is forward
    assert FusedConv2d.__call__ is not nn.Module.__call__


def _module_hooks(fmt, later: bool):
    """Every per-module forward hook kind; `later`: registered after the module already ran its common call."""
    ref, module = make_block()
    x = inputs(fmt)
    seen = []
    if later:
        with torch.no_grad():
            module(x), module(x)
    module.register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
    module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(("pre_kw", sorted(kwargs))),
                                     with_kwargs=True)
    module.register_forward_hook(lambda m, args, out: seen.append(("post", out.clone())))
    module.register_forward_hook(lambda m, args, kwargs, out: out + 1.0, with_kwargs=True)
    with torch.no_grad():
        y = module(x)
        y_kw = module(x, residual=None)
    assert max_rel_error(y, reference64(ref, x * 2.0) + 1.0) < TOL_FP32
    return y, y_kw, seen


@pytest.mark.parametrize("later", [False, True], ids=["hooks-first", "hooks-after-calls"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_module_forward_hooks_fire_exactly_as_with_nn_module_call(fmt, later):
    (y, y_kw, seen), (y_ref, y_kw_ref, seen_ref) = both_ways(_module_hooks, fmt, later)
    assert torch.equal(y, y_ref) and torch.equal(y_kw, y_kw_ref)
    assert [s[0] for s in seen] == [s[0] for s in seen_ref] == ["pre_kw", "post", "pre_kw", "post"]
    assert seen[0][1] == [] and seen[2][1] == ["residual"]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seen, seen_ref) if a[0] == "post")


def _always_called_hook():
    _, module = make_block()
    called = []
    module.register_forward_hook(lambda m, args, out: called.append(1), always_call=True)
    with torch.no_grad(), pytest.raises(ValueError, match="input: expected 4 channels"):
        module(torch.randn(1, 5, 7, 7))  # wrong channel count: forward raises
    return called


def test_always_called_forward_hook_runs_when_forward_raises():
    assert both_ways(_always_called_hook) == ([1], [1])


def _backward_hooks():
    _, module = make_block()
    grads = []
    module.register_full_backward_pre_hook(lambda m, grad_out: grads.append(("pre", grad_out[0].clone())))
    module.register_full_backward_hook(lambda m, grad_in, grad_out: grads.append(("post", grad_in[0].clone())))
    x = inputs().requires_grad_(True)
    module(x).square().sum().backward()
    return x.grad, grads


def test_backward_hooks_fire_exactly_as_with_nn_module_call():
    (g, hooks), (g_ref, hooks_ref) = both_ways(_backward_hooks)
    assert [h[0] for h in hooks] == [h[0] for h in hooks_ref] == ["pre", "post"]
    assert torch.equal(g, g_ref)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(hooks, hooks_ref))


def _global_hook(kind):
    _, module = make_block()
    x = inputs(CL)
    with torch.no_grad():  # the common call first: a global hook registered afterwards must still be seen
        module(x), module(x)
    seen = []
    if kind == "forward_pre":
        handle = nn_module.register_module_forward_pre_hook(lambda m, args: seen.append(type(m).__name__))
    elif kind in ("forward", "forward_always"):
        handle = nn_module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__),
                                                        always_call=kind == "forward_always")
    elif kind == "backward_pre":
        handle = nn_module.register_module_full_backward_pre_hook(lambda m, g: seen.append(type(m).__name__))
    else:
        handle = nn_module.register_module_full_backward_hook(lambda m, gi, go: seen.append(type(m).__name__))
    try:
        if kind.startswith("backward"):
            module(x.clone().requires_grad_(True)).sum().backward()
        else:
            with torch.no_grad():
                module(x)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("kind", ["forward_pre", "forward", "forward_always", "backward_pre", "backward"])
def test_global_hooks_fire_exactly_as_with_nn_module_call(kind):
    assert both_ways(_global_hook, kind) == (["FusedConv2d"], ["FusedConv2d"])


def _jit_trace():
    _, module = make_block()
    x = inputs(CL)
    with torch.no_grad():
        module(x)  # the eager state is filled first; tracing must not use it
        graph = torch.jit.trace(nn.Sequential(module), (x,), check_trace=False).inlined_graph
    return [(n.kind(), n.scopeName()) for n in graph.nodes()]


def test_jit_trace_records_the_same_graph_as_nn_module_call():
    """Ops and the module scopes nn.Module.__call__ records while tracing (through _slow_forward)."""
    nodes, nodes_ref = both_ways(_jit_trace)
    assert nodes == nodes_ref and ("aten::_convolution", "__module.0") in nodes
    assert not any("mkldnn" in kind for kind, _ in nodes)


class _Capture:
    """A torch.compile backend that keeps the FX graphs Dynamo hands it and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _call_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def _compiled(with_hook):
    ref, module = make_block()
    x = inputs(CL)
    with torch.no_grad():
        module(x)  # eager state filled before compiling: Dynamo must not trace the eager CPU path
    fired = []
    if with_hook:
        module.register_forward_hook(lambda m, args, out: fired.append(1))
    capture = _Capture()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            y = torch.compile(module, backend=capture, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert len(capture.graphs) == 1
    assert max_rel_error(y, reference64(ref, x)) < TOL_FP32
    return y, _call_targets(capture.graphs[0]), fired


@pytest.mark.parametrize("with_hook", [False, True])
def test_torch_compile_records_the_same_graph_as_nn_module_call(with_hook):
    (y, targets, fired), (y_ref, targets_ref, fired_ref) = both_ways(_compiled, with_hook)
    assert targets == targets_ref and torch.equal(y, y_ref)
    assert not any("mkldnn" in t for t in targets) and any("conv2d" in t for t in targets)
    assert fired == fired_ref == ([1] if with_hook else [])


def test_module_compile_runs_the_compiled_call():
    ref, module = make_block()
    x = inputs(CL)
    with torch.no_grad():
        module(x)
    capture = _Capture()
    torch._dynamo.reset()
    module.compile(backend=capture)
    try:
        with torch.no_grad():
            y = module(x)
    finally:
        torch._dynamo.reset()
    assert len(capture.graphs) == 1  # the call went through module.compile()'s compiled call
    assert max_rel_error(y, reference64(ref, x)) < TOL_FP32


def _exported(strict):
    ref, module = make_block()
    x = inputs(CL)
    with torch.no_grad():
        module(x)
    program = torch.export.export(nn.Sequential(module), (x,), strict=strict)
    with torch.no_grad():
        y = program.module()(x)
    assert max_rel_error(y, reference64(ref, x)) < TOL_FP32
    stacks = [[v[0] for v in (n.meta.get("nn_module_stack") or {}).values()] for n in program.graph.nodes
              if n.op == "call_function"]
    return _call_targets(program.graph_module), stacks


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_records_the_same_graph_as_nn_module_call(strict):
    (targets, stacks), (targets_ref, stacks_ref) = both_ways(_exported, strict)
    assert targets == targets_ref and not any("mkldnn" in t for t in targets)
    assert stacks == stacks_ref and stacks[0] == ["", "0"]  # the ops are attributed to the FusedConv2d


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, FusedConv2d) or super().is_leaf_module(m, qualname)


def _fx_traced():
    ref, module = make_block()
    x = inputs()
    with torch.no_grad():
        module(x)
    root = nn.Sequential(module)
    graph = _LeafTracer().trace(root)
    with torch.no_grad():
        y = fx.GraphModule(root, graph)(x)
    assert max_rel_error(y, reference64(ref, x)) < TOL_FP32
    return [(n.op, str(n.target)) for n in graph.nodes]


def test_fx_tracer_sees_the_call_as_a_module_call():
    """torch.fx patches nn.Module.__call__ while it traces; FusedConv2d must go through the patched call."""
    nodes, nodes_ref = both_ways(_fx_traced)
    assert nodes == nodes_ref and ("call_module", "0") in nodes


# The call's own fast path (FusedConv2d.__call__ runs the eager CPU path itself for a lone `module(x)`, without
# forward's frame) is taken only where forward would do exactly that: not for an instance-level or subclass forward,
# a residual-required module or a module with a pre-pad. Each case below would compute something else if it were.

def _warm(module, x):
    with torch.no_grad():
        module(x)  # the eager state filled: the next call of the same signature is the cached one


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_an_instance_forward_replaces_the_fast_path(fmt):
    def scenario():
        ref, module = make_block()
        x = inputs(fmt)
        _warm(module, x)
        seen = []
        original = module.forward

        def patched(t):
            seen.append(t.shape)
            return original(t) * 2

        module.forward = patched
        with torch.no_grad():
            y = module(x)
        assert max_rel_error(y, 2 * reference64(ref, x)) < TOL_FP32
        return y, seen

    (y, seen), (y_ref, seen_ref) = both_ways(scenario)
    assert seen == seen_ref == [torch.Size([2, 4, 7, 7])] and torch.equal(y, y_ref)


def test_a_subclass_forward_replaces_the_fast_path():
    class Doubled(FusedConv2d):
        def forward(self, x, residual=None, residual_private=False):
            return super().forward(x, residual, residual_private) * 2

    def scenario():
        ref, module = make_block()
        module.__class__ = Doubled
        x = inputs()
        _warm(module, x)
        with torch.no_grad():
            y = module(x)
        assert max_rel_error(y, 2 * reference64(ref, x)) < TOL_FP32
        return y

    y, y_ref = both_ways(scenario)
    assert torch.equal(y, y_ref)


def test_a_residual_required_module_called_without_residual_raises():
    def scenario():
        _, module = make_block()
        x = inputs()
        _warm(module, x)  # a cached signature: the fast path would run the conv without its add
        module.residual_required = True
        with torch.no_grad(), pytest.raises(TypeError, match="missing argument 'residual'") as err:
            module(x)
        return str(err.value)

    ours, reference = both_ways(scenario)
    assert ours == reference


def test_a_pre_pad_is_applied_by_every_call():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, stride=2, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(6).eval(), 3)

    def reference(x):  # TF "SAME" at stride 2 on an even input pads (0, 1, 0, 1)
        with torch.no_grad():
            return torch.relu(copy.deepcopy(bn).double()(F.conv2d(F.pad(x.double(), (0, 1, 0, 1)),
                                                                     conv.weight.double(), None, 2)))

    def scenario():
        module = FusedConv2d.from_modules(conv, bn, nn.ReLU())
        module = FusedConv2d(module.weight, module.scale, module.shift, stride=2, activation="relu",
                             pre_pad=(0, 1, 0, 1))
        x = inputs()[:, :, :6, :6].contiguous()
        _warm(module, x)
        with torch.no_grad():
            y = module(x)
        assert y.shape == (2, 6, 3, 3) and max_rel_error(y, reference(x)) < TOL_FP32
        return y

    y, y_ref = both_ways(scenario)
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_a_cpu_autocast_region_after_cached_calls_computes_as_the_original(fmt, monkeypatch):
    # The oneDNN route (forced for this small conv) computes in float32 whatever the region says: a cached call
    # taking it inside the region would hand back float32 where the original conv answers bfloat16.
    monkeypatch.setattr(cpu, "small_conv_macs", 0)

    def scenario():
        ref, module = make_block()
        x = inputs(fmt)
        _warm(module, x)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
            y_orig = ref(x)
        assert y.dtype == y_orig.dtype == torch.bfloat16
        assert max_rel_error(y, reference64(ref, x)) < 3e-2
        return y

    y, y_ref = both_ways(scenario)
    assert torch.equal(y, y_ref)


def test_the_autocast_query_and_its_fallback_agree_with_torch():
    # cpu.eager_forward asks the dispatch key directly; a PyTorch without that query gets the public one.
    def answers():
        return (cpu._autocast_off(cpu._AUTOCAST_CPU), cpu._cpu_autocast_query(cpu._AUTOCAST_CPU),
                not torch.is_autocast_enabled("cpu"))

    assert answers() == (True, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert answers() == (False, False, False)
        with torch.autocast("cpu", enabled=False):
            assert answers() == (True, True, True)


def test_a_call_the_eager_path_declines_checks_once_and_computes_as_forward(monkeypatch):
    """An input that requires grad takes the differentiable general path: the call goes there straight from its own
    eager-path check (before, forward checked a second time), with forward's result and gradient."""
    real = cpu.eager_forward
    checks = []
    monkeypatch.setattr(cpu, "eager_forward", lambda *a, **k: checks.append(1) or real(*a, **k))

    def scenario():
        ref, module = make_block()
        x = inputs().requires_grad_()
        checks.clear()
        y = module(x)
        y.sum().backward()
        assert max_rel_error(y, reference64(ref, x.detach())) < TOL_FP32
        return y.detach(), x.grad, len(checks)

    (y, grad, n), (y_ref, grad_ref, n_ref) = both_ways(scenario)
    assert n == n_ref == 1 and torch.equal(y, y_ref) and torch.equal(grad, grad_ref)
