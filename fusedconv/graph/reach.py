"""A converted model no one outside has reached into yet: its forward skips the checks of its modules and tensors.

The whole-model flat forward checks on every call that nothing it depends on changed (graph/flat.py: every
module on its paths, their hooks and the attributes their code read; graph/flat_fused.py: each fused layer's
tensors). On CPU at batch 1 the objects those checks read are out of the caches after the previous forward: ~0.6 ms
of mobilenet_v2's ~8 ms (`python -m bench.cpu_gap`), the gap between the converted model and a frozen one
(fusedconv/frozen.py). Yet a module, parameter or buffer of a model convert returned can only change through a
reference to it, and the only way to one is through the model: convert made a private copy (unless inplace=True),
and its forward hands no module or tensor of its own to other code (arming's conditions below). So until some code
reaches into the model, no edit can have happened, and the checks can keep only what lies outside the model: the
class-level terms (a class's forward patched), the call pattern, gradient and autocast mode, global hooks — what
a FrozenModel checks.

`arm(model)` (convert's last step) makes the root's class a subclass of its guarded class (`watched_class`) whose
`__getattribute__` notices a reach: reading the root's `__dict__`, `_modules`, `_parameters`, `_buffers`, or any
other attribute of its instance dict whose value is not a plain value (a list of blocks, a tensor attribute,
fusedconv's guard table) — which every nn.Module method and `__getattr__` does to get to a submodule, parameter or
buffer (`model.layer1`, `model.parameters()`, `state_dict()`, `modules()`, `apply`, `train()`, `copy.copy`,
pickling, `fusedconv.refresh`). The root's hook tables (run live by nn.Module's call) and plain values (`training`)
are no reach, nor are `repr(model)` and `model.eval()` on a model in eval mode throughout whose modules have no
`train()` of their own (nothing to change). Nor is a conversion — `to()`, `cpu()`, `cuda()`, `float()`, `double()`,
`half()`, `bfloat16()`, `requires_grad_()` — where it runs no user code (every module's `_apply` nn.Module's or a
fused layer's, plain tensors, no torch function / dispatch mode, the class's own method nn.Module's): it runs inside
the model, hands out nothing but the model itself, and `rearm` then drops the states the forwards kept (the fused
layers derive new ones from the converted tensors) and arms the model anew where its full tree check holds.
On the first reach the model `escape`s, for good: its class goes back to the guarded class and every later forward
runs the full checks, exactly as an unarmed model does. A forward also
escapes the model where code other than fusedconv's sees its tensors or modules during the call: gradients on
(autograd records the parameters, `grad_fn.next_functions` hands them out), a torch function / dispatch mode or a
tensor subclass among the arguments (their hooks see every op's operands), and a call the flat forward does not
cover (the model's own forward runs, user code over its children: among them every call under a tracer or compiler,
which read the model, and every call with global module hooks).

fusedconv's own reads that hand nothing out are no reach: the generated dispatch and flat graph read the guard table
through `model_reach.instance_dict`, and the CPU layout boundary's first-call check reads the model `inside` its
scope (this thread's reads only; under a debugger, tracer or profiler, whose code runs between any two lines, the
model escapes instead). Not noticed, so not supported on an armed model: reading its internals around Python's
attribute protocol (`object.__getattribute__(model, "_modules")`, `gc.get_referents(model)`), as for any object
that guards its state. (torch.compile's own attribute reads go through the protocol: a compiled function that edits
the model escapes it, tests/test_reach.py.)
"""
from __future__ import annotations

from _thread import get_ident

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_globals

from fusedconv.fused_layers import FusedAffineLayer, FusedConv3d
from fusedconv.graph.flat import flat_check
from fusedconv.graph.flat_fused import plain_arguments
from fusedconv.graph.patterns import forward_params
from fusedconv.graph.private_residual import global_hooks
from fusedconv.graph.specialize import _GUARDS, forward_signature
from fusedconv.model_reach import REACH as _REACH, Reach, armed, escape, inside, instance_dict
from fusedconv.modes import user_modes
from fusedconv.modules import FusedConv2d

__all__ = ["Reach", "arm", "armed", "escape", "inside", "rearm", "watched_class"]
_grad_enabled = torch.is_grad_enabled

# Instance attributes of an nn.Module that are no way into its modules or tensors: its own hook tables (the
# root's hooks run live on every call, and a hook that reads the model reaches it like any code), the names of its
# non-persistent buffers, its compiled call.
_SAFE = frozenset((
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    "_non_persistent_buffers_set", "_compiled_call_impl", "training",
))
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)
_WATCHED: dict[type, type] = {}


def seen_from_outside(args) -> bool:
    """Whether code other than fusedconv's sees the model's tensors or modules during a call the flat graph runs
    (module doc): gradients on, a torch function / dispatch mode, a tensor subclass among the arguments. (Under a
    tracer or compiler, or with global module hooks, the flat guard fails and the fallback escapes the model.)"""
    return _grad_enabled() or user_modes() or not plain_arguments(args)


def _getattribute(base):
    def __getattribute__(self, name):
        value = base(self, name)
        if name in _SAFE:
            return value
        d = instance_dict(self)
        if name == "__dict__" or (name in d and not isinstance(value, _PLAIN)):
            reach = d.get(_REACH)
            if reach is not None and reach.inside != get_ident():
                escape(self)
        return value
    return __getattribute__


def _forward_source(params) -> str:
    """The watched class's forward: the guarded forward (specialize._forward_source), after escaping the model
    where the call is seen from outside."""
    head, body, names = forward_signature(params)
    return (f"def forward({head}):\n"
            f"    if _fusedconv_seen(({', '.join(names)}{',' if names else ''})):\n"
            f"        _fusedconv_escape(_fusedconv_self)\n"
            f"    return _fusedconv_instance_dict(_fusedconv_self)[{_GUARDS!r}].dispatch({body})\n")


# `train` methods whose call with mode=False on a module already in eval mode changes nothing and runs no user code.
_QUIET_TRAIN = frozenset({nn.Module.train, FusedConv2d.train, FusedAffineLayer.train})


def _methods(guarded: type) -> dict:
    """`eval()` / `train(False)` and `repr()` of an armed model, which read it without handing anything out."""
    original = guarded.__fusedconv_original__

    def train(self, mode: bool = True):
        # Already in eval mode throughout, with no train() of its own anywhere: nothing to do, and no reach.
        if mode is False:
            with inside(self):
                quiet = original.train in _QUIET_TRAIN and all(
                    not m.training and (m is self or type(m).train in _QUIET_TRAIN) for m in self.modules())
            if quiet:
                return self
        return guarded.train(self, mode)

    def __repr__(self):
        with inside(self):
            return guarded.__repr__(self)

    train.__doc__ = guarded.train.__doc__
    methods = {"train": train, "__repr__": __repr__}
    for name in _CONVERSIONS:
        if getattr(original, name) is getattr(nn.Module, name):  # a class's own `to()` is user code: a reach
            methods[name] = _conversion(getattr(guarded, name))
    return methods


# nn.Module methods that convert the model's tensors in place of themselves (`_apply` with torch's own function) or
# set their flags, and hand nothing out: run inside an armed model, they leave it armed (`rearm`).
_CONVERSIONS = ("to", "cpu", "cuda", "float", "double", "half", "bfloat16", "requires_grad_")
# `_apply` methods that run no user code: nn.Module's, and fusedconv's fused layers' (which keep their epilogue's
# precision and drop their derived state).
_LIBRARY_APPLY = frozenset({nn.Module._apply, FusedConv2d._apply, FusedAffineLayer._apply, FusedConv3d._apply})
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def _converts_without_user_code(model: nn.Module) -> bool:
    """A conversion of `model` (`_CONVERSIONS`) runs no code but torch's and fusedconv's: every module's `_apply` is
    a library one (none set on an instance), every parameter, gradient and buffer is a plain tensor (a subclass's
    `__torch_function__` would see it), and no torch function / dispatch mode is active."""
    if user_modes():
        return False
    for m in model.modules():
        d = instance_dict(m)
        if type(m)._apply not in _LIBRARY_APPLY or "_apply" in d:
            return False
        for p in d["_parameters"].values():
            if p is not None and (type(p) not in _PLAIN_TENSORS
                                  or (p.grad is not None and type(p.grad) is not torch.Tensor)):
                return False
        if any(b is not None and type(b) is not torch.Tensor for b in d["_buffers"].values()):
            return False
    return True


def _conversion(base):
    """An armed model's `base` (`to`, `cpu`, ...): run inside the model where it runs no user code, then `rearm`;
    otherwise a reach like any other."""

    def method(self, *args, **kwargs):
        with inside(self):
            plain = armed(self) is not None and _converts_without_user_code(self)
        if not plain:
            escape(self)
            return base(self, *args, **kwargs)
        try:
            with inside(self):
                out = base(self, *args, **kwargs)
        except BaseException:
            escape(self)  # converted in part, maybe: full checks from now on
            raise
        rearm(self)
        return out

    method.__name__, method.__qualname__, method.__doc__ = base.__name__, base.__qualname__, base.__doc__
    return method


def watched_class(guarded: type) -> type:
    """The subclass of a guarded class (graph/specialize.py) that notices a reach into its instances (module doc)."""
    cls = _WATCHED.get(guarded)
    if cls is None:
        params = forward_params(object.__new__(guarded.__fusedconv_original__))
        namespace = {"_fusedconv_defaults": [p.default for p in params], "_fusedconv_seen": seen_from_outside,
                     "_fusedconv_escape": escape, "_fusedconv_instance_dict": instance_dict}
        exec(compile(_forward_source(params), "<fusedconv watched forward>", "exec"), namespace)  # noqa: S102
        forward = namespace["forward"]
        forward.__doc__ = guarded.forward.__doc__
        cls = type(guarded.__name__, (guarded,), {
            "forward": forward, "__getattribute__": _getattribute(guarded.__getattribute__),
            "__fusedconv_unwatched__": guarded, "__module__": guarded.__module__,
            "__qualname__": guarded.__qualname__, **_methods(guarded)})
        _WATCHED[guarded] = cls
    return cls


def _registration_hooks() -> bool:
    g = _module_globals
    return bool(getattr(g, "_global_module_registration_hooks", None)
                or getattr(g, "_global_parameter_registration_hooks", None)
                or getattr(g, "_global_buffer_registration_hooks", None))


def rearm(model: nn.Module) -> bool:
    """After a conversion that ran inside an armed model and handed nothing out (`to()`, `half()`, ...): its fused
    layers dropped their derived states, so the kept ones go too (`FusedLeaves.keep_anew`), and the model is armed
    again where its full tree check still holds. Otherwise (or if it escaped meanwhile: another thread, a tracer) it
    stays escaped: full checks on every forward, and the exact fallback where they fail. Returns whether it did."""
    if armed(model) is None:
        return False
    escape(model)
    check = flat_check(model)
    if check is None or check.fused is None or not check.fn(model):
        return False
    check.fused.keep_anew()
    return arm(model)


def arm(model: nn.Module) -> bool:
    """Arm a converted model (module doc) whose flat forward allows it: a flat forward whose leaves run no user
    code (flat_fused.FusedLeaves.pure) and whose outputs are no tensor the model holds nor a view of one
    (`FlatCheck.returns_held`), no global hooks (a registration hook saw convert's new modules). Returns whether it
    did. Only for a model no one else holds a part of: convert's own copy."""
    d = instance_dict(model)
    check = flat_check(model)
    if check is None or check.fused is None or not check.fused.pure or check.returns_held or check.frozen:
        return False
    if global_hooks() or user_modes() or _registration_hooks() or armed(model) is not None:
        return False
    guarded = type(model)
    if getattr(guarded, "__fusedconv_original__", None) is None or "__fusedconv_unwatched__" in guarded.__dict__:
        return False
    reach = Reach()
    check.arm(reach)
    d[_REACH] = reach
    object.__setattr__(model, "__class__", watched_class(guarded))
    return True
