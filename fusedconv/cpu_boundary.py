"""Channels_last at a converted model's boundary on CPU: the layout change happens once, when the model is entered.

On CPU the fast route of FusedConv2d (one oneDNN conv with the activation and residual add fused, fusedconv/cpu.py)
needs channels_last input, while most users feed NCHW. `convert()` therefore installs two hooks on the converted
model's root module:

- entering: plain CPU float32 4-d inputs (positional or keyword arguments, not nested in containers) that are
  NCHW are made channels_last, once, and 5-d NCDHW clips channels_last_3d; every layer inside then sees that layout
  from the layer before it (PyTorch's pooling, add, upsample, concat ... keep the layout), so no layer converts
  anything (a FusedConv3d takes its one-op oneDNN route only inside such a switched call, cpu_conv3d.switched);
  clips the caller already made channels_last_3d (PyTorch's CPU guide suggests it) are switched as given, without a
  copy, and their outputs handed back as the model returns them;
- leaving: 4-d / 5-d outputs that came out channels_last / channels_last_3d are made contiguous again, so the caller
  gets the layout the original model returns for NCHW input (`.view()` on an output keeps working).

An arbitrary model may not be layout-agnostic (a `.view()` inside forward fails on channels_last; code may depend on
strides), so the switch is checked before it is used: the first call with each input signature (argument
positions, shapes) runs the model both ways — NCHW as given, then channels_last — and the switch is taken for
that signature only when the channels_last run succeeds, gives the same outputs (the convert self-check tolerance)
and, after the outputs are turned back, the same output strides, and when it pays: at least one conv took the oneDNN
route in the channels_last run (a model whose convs are all small enough to stay on F.conv2d, cpu.small_conv_macs,
runs them faster in NCHW; for a clip, a FusedConv3d's route). Otherwise that signature stays in NCHW and the
layers take their F.conv2d route. A decision to switch holds while the model is the one it was checked on
(`_unchanged`): no fused layer's tensors converted since (`.to(memory_format=torch.channels_last)` changes the layout
a layer answers in, fusedconv/layout.py), and the model still armed (no code reached into it, graph/reach.py) or
its module tree, classes, forwards, tensors and settings as then (`_tree`: a module replaced or added that reads its
input's layout, a weight replaced by a channels_last one, a flag assigned that turns on noise shaped like a feature
map, a Dropout turned on) — what its own forward replaces on every call (a counter, a running total) excepted; else
every signature is checked again on its next call, and a model found changed on three calls in a row (one that
changes itself on every call in a way the check cannot tell from an edit) runs as written, in NCHW, from then on.
Not seen: a change inside a setting's value (an element appended to a list) or outside the model (a global its
forward reads). That first call therefore runs forward three times,
each from the same state of the global random generators (torch's, Python's, numpy's), so a forward that draws
random numbers returns on that call what the original returns for the same seed; a forward that draws from torch's
generator stays NCHW (a draw shaped like a feature map, `torch.randn_like(x)`, fills it in memory order: channels_last
would draw other numbers), and so does a model holding a torch.Generator of its own. What the two check forwards
change on the model's modules — buffers and plain tensor attributes (in place or replaced: a call counter, a running
statistic), public attributes (an int counter, a cache set on first use), parameters written in place — is put
back before the call runs (`_model_state`), so the call changes them once, as the original's would; other side
effects of a forward (files, prints) happen three times, once.
While forward hooks are registered on modules inside the model, or globally, or a torch function / dispatch mode
is active (fusedconv/modes.py), no check runs (a hook collecting features, a mode counting ops would see the call
three times): such a call runs as written, in NCHW, and the signature is checked on its first call without them.
Nothing changes when the input is already channels_last (an image), not float32, not on CPU, needs autograd, inside a
torch.autocast region or a torch.func transform (vmap, grad, ...), or while tracing / compiling / exporting (they
see the model as written).
`fusedconv.cpu.enabled = False` switches this off together with the oneDNN route, and so does PyTorch's own
`torch.backends.mkldnn.enabled = False` (or `torch.backends.mkldnn.flags(enabled=False)`) while it is off.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as _nn_module
from torch.utils._pytree import tree_flatten, tree_map

from fusedconv import autocast, cpu, cpu_conv3d, layout
from fusedconv.comparison import compare_outputs
from fusedconv.comparison import snapshot_outputs as _snapshot
from fusedconv.fused_layers import FusedConv1d, FusedConv2dPostBN, FusedConv3d
from fusedconv.fused_linear import FusedLinear
from fusedconv.fused_mixed import FusedMixedConv2d
from fusedconv.fused_transpose import FusedConvTranspose1d, FusedConvTranspose2d, FusedConvTranspose3d
from fusedconv.model_reach import armed, inside, instance_dict
from fusedconv.modules import FusedConv2d
from fusedconv.modes import user_modes
from fusedconv.random_state import random_states, set_random_states

ATTRIBUTE = "_fusedconv_layout_boundary"
# The stack entry of a switched call whose inputs were channels_last_3d clips already: switched, nothing restored.
_KEPT = "kept"
# Which entered calls switched layout, innermost last, per thread (hooks of nested models pair up in LIFO order);
# kept in cpu_conv3d, whose channels_last_3d route is taken only inside a switched call (cpu_conv3d.switched).
_active = cpu_conv3d.layout_calls


class LayoutBoundary:
    """Per converted model: input signature -> whether channels_last was checked to be safe for it, and what the
    signatures were checked on (`_unchanged`)."""

    changed_calls, pinned = 0, False  # (defaults for a boundary unpickled from a version without them)

    def __init__(self):
        self.checked: dict[tuple, bool] = {}
        self.conversions = None  # fusedconv.layout.conversions when the signatures were checked
        self.tree = None  # the model's modules, their classes and forwards then (`_tree`)
        self.own = {}  # what the checked forwards replaced: the model's own state, left out of `tree`
        self.frozen = False  # the model is a FrozenModel's private copy (fusedconv/frozen.py): it cannot change
        self.changed_calls = 0  # calls in a row that found the model changed since its check (`_checked`)
        self.pinned = False  # found changed on too many calls in a row: every call stays NCHW (`_checked`)

    def __repr__(self) -> str:
        return f"LayoutBoundary({len(self.checked)} signature(s) checked)"

    def __getstate__(self):
        # A copy or a pickle starts unchecked: its tree would hold the copied model's generated classes, which
        # pickle cannot name; the first call checks again.
        return {"checked": {}, "conversions": None, "tree": None, "own": {}, "frozen": self.frozen,
                "changed_calls": 0, "pinned": False}


def install(model: torch.nn.Module) -> None:
    """Add the boundary hooks to a converted model (once)."""
    if _enter in model._forward_pre_hooks.values():
        return
    model.__dict__[ATTRIBUTE] = LayoutBoundary()
    model.register_forward_pre_hook(_enter, with_kwargs=True)
    model.register_forward_hook(_leave, with_kwargs=True, always_call=True)


def _boundary(model) -> LayoutBoundary:
    # Created on demand too: a copy that kept the hooks but not the attribute (fx.GraphModule copies) rebuilds it.
    # (Read around the model's attribute protocol: the boundary is no way into its modules, graph/reach.py.)
    d = instance_dict(model)
    boundary = d.get(ATTRIBUTE)
    if boundary is None:
        boundary = d[ATTRIBUTE] = LayoutBoundary()
    return boundary


def layout_used(model: torch.nn.Module, *args, **kwargs) -> str:
    """The layout the converted model runs in for these inputs: 'channels_last' ('channels_last_3d' for 5-d
    inputs, also channels_last_3d clips as given) when the boundary switches them (checking it if needed), 'NCHW'
    ('NCDHW') for such inputs it does not switch, else 'as given'."""
    if getattr(type(model), "wraps_converted_model", False):
        model = model.__dict__["_model"]  # fusedconv.frozen.FrozenModel: the converted model it runs
    nchw = _nchw_inputs(args, kwargs)
    video = any(t.dim() == 5 for t in _switchable_inputs(args, kwargs))
    unswitched = ("NCDHW" if video else "NCHW") if nchw else "as given"
    if _enter not in model._forward_pre_hooks.values() or not _eligible(args, kwargs):
        return unswitched
    if _checked(model, _boundary(model), args, kwargs):
        return "channels_last_3d" if video else "channels_last"
    return unswitched


def _is_nchw(t) -> bool:
    """A plain float32 CPU image batch (N, C, H, W) or clip batch (N, C, D, H, W) in PyTorch's default layout."""
    return (type(t) is torch.Tensor and t.dtype == torch.float32 and t.is_cpu and 4 <= t.dim() <= 5
            and t.is_contiguous() and not t.is_contiguous(memory_format=_FORMATS[t.dim()]))


_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _nchw_inputs(args, kwargs) -> list:
    return [t for t in (*args, *kwargs.values()) if _is_nchw(t)]


def _is_clip_cl3d(t) -> bool:
    """A plain float32 CPU clip batch the caller already made channels_last_3d (PyTorch's CPU guide suggests it)."""
    return (type(t) is torch.Tensor and t.dtype == torch.float32 and t.is_cpu and t.dim() == 5
            and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous())


def _switchable_inputs(args, kwargs) -> list:
    """The inputs a switched call runs in channels_last: NCHW / NCDHW ones it converts, channels_last_3d clips it
    keeps as given (the layers inside then take their channels_last_3d route too)."""
    return [t for t in (*args, *kwargs.values()) if _is_nchw(t) or _is_clip_cl3d(t)]


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


# The innermost torch.func transform running (vmap, grad, jvp, ...), None outside them.
_functorch_transform = torch._C._functorch.peek_interpreter_stack


def _eligible(args, kwargs) -> bool:
    if not cpu.enabled or not cpu.mkldnn_enabled() or not cpu.available():
        return False
    if autocast.any_enabled():
        # Inside a torch.autocast region no fused layer takes the oneDNN route (fusedconv/autocast.py): nothing to
        # gain, and a layout decided there would stick to the signature's calls outside the region.
        return False
    if _functorch_transform() is not None:
        # Inside torch.func.vmap / grad / jacrev the inputs are functorch's wrapped tensors, whose layout cannot be
        # queried (vmap refuses `is_contiguous(memory_format=channels_last)`): the model as written.
        return False
    inputs = _switchable_inputs(args, kwargs)
    if not inputs:
        return False
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (*args, *kwargs.values())):
        return False  # the oneDNN route has no backward: autograd callers get the model as written
    return True


def _signature(args, kwargs) -> tuple:
    def key(t):
        return tuple(t.shape) if _is_nchw(t) else ("channels_last_3d", *t.shape) if _is_clip_cl3d(t) else None
    return (tuple(key(t) for t in args), tuple((k, key(v)) for k, v in kwargs.items() if key(v) is not None))


def _to_channels_last(args, kwargs):
    def convert(t):
        return t.contiguous(memory_format=_FORMATS[t.dim()]) if _is_nchw(t) else t
    return tuple(convert(t) for t in args), {k: convert(v) for k, v in kwargs.items()}


def _restore(output):
    def back(t):
        if (isinstance(t, torch.Tensor) and 4 <= t.dim() <= 5 and not t.is_contiguous()
                and t.is_contiguous(memory_format=_FORMATS[t.dim()])):
            return t.contiguous()
        return t
    return tree_map(back, output)


def _may_pay(model, dims: set) -> bool:
    """A layer that could take a oneDNN route for these inputs exists: a FusedConv2d for 4-d inputs, a FusedConv3d
    for 5-d ones. Without one the check is not run (a 2-D model fed clips it reshapes into frames would run its
    first call three times for nothing)."""
    kinds = ((FusedConv2d,) if 4 in dims else ()) + ((FusedConv3d,) if 5 in dims else ())
    return any(isinstance(m, kinds) for m in model.modules())


def _routes_onednn(model, dims: set) -> bool:
    """Some layer took a oneDNN route in the switched run: a FusedConv2d when 4-d inputs were switched, a
    FusedConv3d's channels_last_3d route when 5-d ones were."""
    return any((4 in dims and cpu.routes_onednn(m)) or (5 in dims and cpu_conv3d.routed(m))
               for m in model.modules())


def _same_outputs(nchw_out, cl_out) -> bool:
    """Same structure, values within the convert self-check tolerance, and the same strides."""
    try:
        err, tol = compare_outputs(cl_out, *_snapshot(nchw_out))
    except RuntimeError:
        return False
    if not err <= tol:
        return False
    ref, _ = tree_flatten(nchw_out)
    out, _ = tree_flatten(cl_out)
    return all(not isinstance(r, torch.Tensor) or _layout(r) == _layout(o) for r, o in zip(ref, out))


def _layout(t: torch.Tensor) -> tuple:
    # Strides of the dimensions longer than 1 (the others' strides are arbitrary and never matter to views).
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def _hooks_inside(model) -> bool:
    """Forward hooks that the check's extra forwards would run again: on any module below the root (the check calls
    the root's forward directly, so the root's own hooks run once either way), or registered globally."""
    g = _nn_module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model)


def _model_state(model) -> list:
    """What a forward may change on the model's modules: their public attributes (`self.calls += 1` on an int) and
    the tensors they hold — parameters, buffers and plain tensor attributes, with their values (a counter or a
    running statistic updated in place; a forward that edits a weight, which a check run again after the model
    changed would otherwise edit three times). (dict, name, value, version, copy) each; `_put_back` restores them
    after the check's extra forwards, so that the call itself changes them once, as the original's would."""
    out = []
    for m in model.modules():
        d = m.__dict__
        for owner in (d, d.get("_buffers") or {}, d.get("_parameters") or {}):
            for name, value in owner.items():
                if owner is d and (name.startswith("_") or name == "training"):
                    continue
                version = saved = None
                if isinstance(value, torch.Tensor):
                    try:
                        version, saved = value._version, value.detach().clone()
                    except RuntimeError:
                        pass  # an inference tensor: nothing can write into it outside inference mode
                out.append((owner, name, value, version, saved))
        out.append((d, None, frozenset(k for k in d if not k.startswith("_")), None, None))
    return out


def _put_back(state: list) -> dict:
    """Undo what the check's forwards changed in `_model_state`'s snapshot (attributes they added removed).
    Returns what they replaced or added: {id of the dict: (the dict, names)} (the model's own state, `_tree`)."""
    replaced = {}
    with torch.no_grad():
        for owner, name, value, version, saved in state:
            if name is None:  # the module's public attribute names: remove the ones a forward added
                for k in [k for k in owner if not k.startswith("_") and k not in value]:
                    del owner[k]
                    replaced.setdefault(id(owner), (owner, set()))[1].add(k)
                continue
            if owner.get(name, _MISSING) is not value:
                owner[name] = value
                replaced.setdefault(id(owner), (owner, set()))[1].add(name)
            if version is not None and value._version != version:
                value.copy_(saved)
    return replaced


_MISSING = object()


class _DrawsRandomNumbers(Exception):
    """The checked forward drew from torch's global generator (the signature stays NCHW)."""


# Classes whose instances' plain attributes cannot make a forward read its input's layout (or draw random numbers):
# fusedconv's own layers (their output layout follows fusedconv/layout.py whatever their settings; their derived
# caches, rebuilt for instance on a call under torch.inference_mode, are no edit), torch's plain containers and
# stateless elementwise activations. Exact classes only: a subclass may read anything.
_SETTINGS_FREE = frozenset({
    FusedConv2d, FusedConv1d, FusedConv2dPostBN, FusedConv3d, FusedConvTranspose1d, FusedConvTranspose2d,
    FusedConvTranspose3d, FusedLinear, FusedMixedConv2d, torch.nn.Sequential, torch.nn.ModuleList,
    torch.nn.ModuleDict, torch.nn.Identity, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU,
    torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.LeakyReLU})


def _tree(model, own: dict | None = None) -> tuple[list, list]:
    """The model's modules (each once, depth first) and what their forwards may read besides: each one's class, its
    class's forward and a forward set on the instance, its parameters and buffers, and — but for the classes in
    `_SETTINGS_FREE` — every value in its instance dict (its settings: a flag that turns noise on, `training` that
    turns a Dropout on). What a module replaced, added or removed, a class patched, a tensor replaced (its strides
    set the layout of a conv's output) or a setting assigned changes; not what changes inside a value (an element
    appended to a list attribute), nor what the forward reads from outside the model (a global), nor a hook
    registered (a hook collecting features sees the same values, in channels_last, while the switch holds).
    Left out: what the model's own forward replaces on every call (`own`: {id of an instance, `_parameters` or
    `_buffers` dict: (that dict, held so that its id stays its own, names)}, what the layout check saw its
    forwards replace or add: a call counter, a running total, a cache), which is the model's state, not an edit.
    Returned as their ids (compared: by identity, whatever `__eq__` a class defines) and the objects themselves
    (kept with the ids, so no id can be reused by another object while they are compared against).
    (A walk over the `_modules` dicts: `model.modules()` took 150 us on mobilenet_v2's 213 modules; this walk
    155 us without the settings and tensors, 250 us with them.)"""
    objects, stack, seen = [], [model], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        d = instance_dict(m)
        cls = type(m)
        # (Empty tables add nothing: one that fills up lengthens the list, which then compares unequal.)
        params, buffers = d["_parameters"], d["_buffers"]
        if own and (id(d) in own or id(params) in own or id(buffers) in own):
            objects += _values(params, _left_out(own, params))
            objects += _values(buffers, _left_out(own, buffers))
            settings = _values(d, _left_out(own, d))
        else:
            if params:
                objects += params.values()
            if buffers:
                objects += buffers.values()
            settings = d.values()
        if m is model:
            # An armed root's class (graph/reach.py) counts as the class it goes back to when reached, and
            # fusedconv's own state on the root (the reach state a reach replaces, this boundary) is no setting.
            cls = cls.__dict__.get("__fusedconv_unwatched__", cls)
            objects += _values(d, {k for k in d if k.startswith("_fusedconv")} | (_left_out(own, d) or set()))
        elif cls not in _SETTINGS_FREE:
            objects += settings
        objects += (m, cls, getattr(cls, "forward", None), d.get("forward"))
        stack += [c for c in d["_modules"].values() if c is not None]
    return list(map(id, objects)), objects


def _left_out(own: dict | None, d: dict):
    entry = own.get(id(d)) if own else None
    return entry[1] if entry is not None and entry[0] is d else None


def _values(d: dict, left_out) -> list:
    return list(d.values()) if not left_out else [v for k, v in d.items() if k not in left_out]


def _unchanged(model, boundary: LayoutBoundary) -> bool:
    """Whether the model is still the one its signatures were checked on: no fused layer converted since (a weight
    moved to channels_last changes the layout its layer answers in, fusedconv/layout.py), and either armed (no code
    has reached into it since convert, so nothing in it can have changed: graph/reach.py), or a frozen model's
    private copy, or with the same module tree. Otherwise a module replaced by one that reads its input's layout,
    say, would see channels_last where the checked model never did."""
    if boundary.conversions != layout.conversions:
        return False
    if boundary.frozen or armed(model) is not None:
        return True
    return boundary.tree is not None and boundary.tree[0] == _tree(model, boundary.own)[0]


# A model found changed on this many calls in a row (its forward sets an attribute on every call, or its user
# does) stops switching: the checks would run its forward three times on every call.
_CHANGED_CALLS_BEFORE_PINNED = 3


def _checked(model, boundary: LayoutBoundary, args, kwargs) -> bool:
    if boundary.pinned:
        return False  # the model as written, in NCHW, from now on
    key = _signature(args, kwargs)
    ok = boundary.checked.get(key)
    # A signature kept in NCHW runs the model as written whatever changed; one to switch, or to check, first
    # makes sure that every decision kept was made on the model as it is now.
    if ok is not False and boundary.checked:
        if _unchanged(model, boundary):
            boundary.changed_calls = 0
        else:
            boundary.checked.clear()  # every signature is checked again, on the model as it is now
            boundary.changed_calls += 1
            if boundary.changed_calls >= _CHANGED_CALLS_BEFORE_PINNED:
                boundary.pinned = True
                return False
            ok = None
    if ok is None:
        with inside(model):  # fusedconv's own reads of the model (graph/reach.py)
            if not boundary.checked:
                boundary.conversions, boundary.own = layout.conversions, {}
            ok = _check(model, boundary, key, args, kwargs)
            # The model as checked (its own state as the check put it back), for `_unchanged`.
            boundary.tree = _tree(model, boundary.own)
    return ok


def _check(model, boundary: LayoutBoundary, key, args, kwargs) -> bool:
    """Check once per input signature that channels_last is safe and pays for `model`."""
    if _hooks_inside(model) or user_modes():
        # The check runs forward twice more, and a user's hook or torch function / dispatch mode (collecting
        # features, counting calls or FLOPs) would see this call three times: the call runs as written, and the
        # signature is checked on a call without them.
        return False
    if holds_a_generator(model):
        return False  # its draws could not be replayed for the call itself (fusedconv/random_state.py): NCHW
    dims = {t.dim() for t in _switchable_inputs(args, kwargs)}
    if not _may_pay(model, dims):
        boundary.checked[key] = False
        return False
    cl_args, cl_kwargs = _to_channels_last(args, kwargs)
    states = random_states()
    saved = _model_state(model)
    try:
        # Each check forward starts from the random states the call found, and the call itself too (below):
        # a forward that draws random numbers (noise injection, MC dropout) draws the same ones in both
        # layouts, so their outputs compare, and the call returns what the original model returns for the
        # same seed, leaving the generators where it would.
        with torch.no_grad():
            nchw_out = model.forward(*args, **kwargs)
            nchw_out = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, nchw_out)
            if not torch.equal(torch.get_rng_state(), states[0]):
                # The forward draws from torch's generator: a draw shaped like a feature map
                # (`torch.randn_like(x)`, dropout's mask) fills it in memory order, so channels_last draws other
                # numbers than the original's NCHW forward for the same seed, and one compared sample can
                # match by chance (an output a ReLU zeroed): NCHW, where every draw is the original's.
                raise _DrawsRandomNumbers
            set_random_states(states)
            # Run as a switched call runs (the layers' channels_last_3d route is taken only inside one).
            stack = _stack()
            stack.append(True)
            try:
                cl_out = model.forward(*cl_args, **cl_kwargs)
            finally:
                stack.pop()
            if _nchw_inputs(args, kwargs):
                cl_out = _restore(cl_out)  # what _leave hands back; clips given channels_last_3d are not
        # Channels_last pays only for convs it takes to oneDNN; where every conv is small enough to stay on
        # F.conv2d (cpu.small_conv_macs), NCHW is the faster layout for them (measured: squeezenet1_1 at 32x32
        # 1.15x slower than the original in channels_last).
        ok = _same_outputs(nchw_out, cl_out) and _routes_onednn(model, dims)
    except Exception:  # noqa: BLE001 - any failure in channels_last means: keep this signature in NCHW
        ok = False
    finally:
        set_random_states(states)
        # (The checks' updates of buffers, counters and caches undone: the call makes its own. What they replace
        # is the forward's own state, which `_tree` leaves out: a forward counting its calls is no edit.)
        for owner_id, (owner, names) in _put_back(saved).items():
            boundary.own.setdefault(owner_id, (owner, set()))[1].update(names)
    boundary.checked[key] = ok
    return ok


def holds_a_generator(model) -> bool:
    """A module of the model holds a torch.Generator of its own: draws from it could not be replayed."""
    return any(isinstance(v, torch.Generator) for m in model.modules() for v in m.__dict__.values())


def _stack() -> list:
    stack = getattr(_active, "stack", None)
    if stack is None:
        stack = _active.stack = []
    return stack


def _enter(model, args, kwargs):
    if _tracing():
        return None
    stack = _stack()
    stack.append(False)  # pushed before anything can raise, so _leave always pops this call's entry
    if not _eligible(args, kwargs) or not _checked(model, _boundary(model), args, kwargs):
        return None
    if not _nchw_inputs(args, kwargs):
        stack[-1] = _KEPT  # channels_last_3d clips as given: nothing to convert, nothing to turn back
        return None
    stack[-1] = True
    return _to_channels_last(args, kwargs)


def _leave(model, args, kwargs, output):
    if _tracing():
        return None
    stack = _stack()
    if not stack:
        return None
    entry = stack.pop()
    if not entry or entry is _KEPT or output is None:
        return None
    return _restore(output)
