"""FusedConv2d calls from the whole-model flat forward (fusedconv/graph/flat.py): what they depend on checked once
per forward, then each call its route's ops (one oneDNN op, or F.conv2d and the epilogue), without the module
machinery.

A FusedConv2d call goes `nn.Module.__call__` → `FusedConv2d.forward` → `cpu.eager_forward`, whose per-call checks
(hooks, the module's tensors, their version counters and data pointers, the input's signature) touch a dozen Python
and C++ objects of that module. Between two convolutions of a whole model those are out of cache, and in a
mobilenet_v2 forward (52 such calls) the calls through the modules cost ~8 % of the forward at two threads against
the same checks run back to back once per forward (`python -m bench.cpu_flat_ab`, variant `fusedconv_module_calls`).
So the flat graph splits them:

* once per forward, `FusedLeaves.states()` (the graph's first call after the guard) checks what a direct call
  depends on. For the whole forward: it is *pure* (every leaf is a FusedConv2d, a fused affine layer, a
  BN-folded layer or a torch.nn layer of the class it was when the graph was built, none has forward hooks or an
  instance-level forward, the graph calls no function from outside torch, this package and Python's own modules
  (flat._fused_leaves), there are no global hooks, no torch function or dispatch mode is active
  (fusedconv/modes.py) and the forward's arguments hold no tensor subclass (`plain_arguments`): no user
  code runs during the forward that could change a module; the flat guard has already checked that no tracer or
  compiler runs), no gradient mode, no autocast region, the fast path and oneDNN on (`cpu.enabled`,
  `torch.backends.mkldnn.enabled`), FusedConv2d's op routing and the class-level forward / call of every leaf's
  class not patched.
  Per module: exactly a FusedConv2d, not compiled in place, no pre-pad, a folded
  weight, weight / scale / shift are the tensors it folded (and packed), with the same version counters and data
  pointers. It returns the modules' eager states (`cpu.EagerState`),
  None for a module that failed a check (all None when the forward is not pure);
* per call, `fused_call` checks what only the call knows: a plain CPU tensor whose signature (shape, strides,
  dtype; the residual's too) the module has validated and routed before (`EagerState.routes`), and runs that
  route: the oneDNN op where oneDNN accepted the module, else for the F.conv2d routes (NCHW input, small convs)
  `cpu.folded_call` (`cpu.copied_folded_call` for a small conv on a channel slice, `cpu.taps_call` for a conv to
  one output channel), the very code the module call runs for them. Anything else — no state, a new signature, another
  route, oneDNN raising — is the module call (`module(x, residual, residual_private)`), which validates, routes and
  records as usual.
"""
from __future__ import annotations

import sys

import torch

from fusedconv import autocast, cpu, ops
from fusedconv.bn_folded_layers import BN_FOLDED_LAYERS
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.graph.private_residual import global_observers
from fusedconv.modules import FusedConv2d

_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_USE_KERNEL = ops.use_kernel
_ONEDNN, _FOLDED, _FOLDED_CL = cpu.ONEDNN, cpu.FOLDED, cpu.FOLDED_CL
_FOLDED_COPY, _FOLDED_COPY_NCHW, _TAPS = cpu.FOLDED_COPY, cpu.FOLDED_COPY_NCHW, cpu.TAPS
# The class-level methods a module call runs: patched (instrumentation, a test), every call goes through them.
_FORWARD, _CALL, _CALL_IMPL = FusedConv2d.forward, FusedConv2d.__call__, FusedConv2d._call_impl


# What a direct call depends on outside the leaves: no gradient, no autocast region (its calls compute in the
# region's dtype: the module call handles them, fusedconv/autocast.py), the fast path and PyTorch's oneDNN switch
# on (cpu.mkldnn_enabled), no global hooks or torch function / dispatch modes, FusedConv2d's op routing and its
# class-level forward / call not patched, nor those of the other leaves' classes (a patched class-level forward is
# user code inside the forward) (`states()` and its frozen form check).
_OUTSIDE = ("(grad_enabled() or autocast_any() or not cpu.enabled or not mkldnn_enabled()"
            " or ops.use_kernel is not USE_KERNEL"
            " or global_observers() or FusedConv2d.forward is not FORWARD or FusedConv2d.__call__ is not CALL"
            " or FusedConv2d._call_impl is not CALL_IMPL or leaf_classes_patched())")

# FusedLeaves.freeze: `states` until two calls in a row answer the same states (by identity), then those, behind
# the checks of what lies outside the leaves.
_KEPT_SOURCE = f"""
def kept(states):
    found = last = None

    def frozen_states(*args):
        nonlocal found, last
        if found is not None:
            if {_OUTSIDE} or not plain_arguments(args):
                return NONE
            return found
        now = states(*args)
        if now is not NONE and last is not None and all(a is b for a, b in zip(now, last)):
            found = now
        last = now
        return now
    return frozen_states
"""


_PLAIN_VALUES = (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)


def plain_arguments(args) -> bool:
    """The forward's arguments (`args`, the graph's inputs) hold no tensor subclass, in lists, tuples or dicts
    either: every op a subclass instance takes part in runs its `__torch_function__`, user code inside the forward
    (which could edit a layer a direct call was checked for). Plain tensors and plain values pass; any other
    object counts as not plain (its attributes, which the graph may read, can be properties)."""
    for a in args:
        t = type(a)
        if t is _Tensor or t in _PLAIN_VALUES:
            continue
        if t is list or t is tuple:
            if not plain_arguments(a):
                return False
        elif t is not dict or not plain_arguments(a.values()):
            return False
    return True


def forward_hooked_source(d: str) -> str:
    """The source of an expression over a leaf's `__dict__` bound to `d`: truthy when it has forward hooks or
    pre-hooks. Its backward hooks are left out: `states()` answers only when gradients are off, and without
    gradients a module call does nothing with them (torch's BackwardHook passes the arguments through when no
    gradient is recorded, and a plain backward hook attaches to a grad_fn the output does not have)."""
    return f"({d}.get('_forward_pre_hooks') or {d}.get('_forward_hooks'))"


def pure_leaf(m) -> bool:
    """A leaf whose call runs no user code: a fused layer, a BN-folded layer or a torch.nn layer, of a class
    importable by its name (not a guarded subclass convert made; hooks are checked per forward)."""
    cls = type(m)
    if cls is FusedConv2d or cls in BN_FOLDED_LAYERS:
        return True
    mod = cls.__module__
    if not (isinstance(m, FusedAffineLayer) and mod.startswith("fusedconv.")) and not (
            mod.startswith("torch.nn.") or mod.startswith("torch.ao.nn.")):
        return False
    return getattr(sys.modules.get(mod), cls.__qualname__, None) is cls


class FusedLeaves:
    """The leaves of one flat graph, seen from its FusedConv2d calls: which leaves are FusedConv2d (`fused`, leaf
    indices), which of those the graph calls only with a residual (`with_residual`), and whether every leaf is a
    pure one (`pure`, decided when the graph is built; `states()` checks that every leaf still has its class).
    `states()` is generated straight-line code over the leaves (closure cells, no loop): it runs on every forward.
    Pickles and deep-copies as its fields (the function is rebuilt)."""

    def __init__(self, leaves: tuple, fused: tuple, with_residual: frozenset, pure: bool):
        self.leaves = leaves
        # The classes `states()` checks, kept only for a pure graph (importable classes: they pickle by name).
        self.types = tuple(type(m) for m in leaves) if pure else None
        # The other leaves' classes with the forward / __call__ / _call_impl they had when the graph was built.
        self.class_methods = tuple((cls, cls.forward, cls.__call__, cls._call_impl) for cls in dict.fromkeys(
            t for t in self.types if t is not FusedConv2d)) if pure else ()
        self.fused = fused
        self.with_residual = with_residual
        self.pure = pure
        self.frozen = False  # `freeze()`
        self._compile()

    def freeze(self) -> None:
        """For leaves nothing else holds (FlatCheck.freeze): once two forwards in a row found the same states,
        `states()` keeps them and checks per forward only what lies outside the leaves (grad mode, the fast path
        switch, global hooks, FusedConv2d's class-level methods). A leaf's state changes only through the leaf
        (a hook, an edit of its tensors, `.to()`, `refresh()`), which nothing can reach."""
        self.frozen = True
        self._compile()

    def keep_anew(self) -> None:
        """Forget the states `kept_states` found (graph/reach.py `rearm`: a conversion inside the armed model made
        the leaves derive new ones); the next forwards find and keep the new ones as after convert."""
        self._compile()

    def _compile(self) -> None:
        n = len(self.leaves)
        none = (None,) * n
        if not self.pure or not self.fused:
            self.states = self.kept_states = lambda *args: none
            return
        lines = ["def states(*args):", f"    if {_OUTSIDE} or not plain_arguments(args):", "        return NONE"]
        lines += [f"    d{i} = l{i}.__dict__" for i in range(n)]
        # A forward hook or an instance-level forward on any leaf is user code running in the middle of the
        # forward, where it could edit a module a later direct call has already been checked for: no direct call
        # anywhere (every fused call then checks its own module as it runs).
        hooked = " or ".join(f"{forward_hooked_source(f'd{i}')} or 'forward' in d{i}" for i in range(n))
        lines += [f"    if {hooked}:", "        return NONE"]
        fused = set(self.fused)
        # A leaf that is not a FusedConv2d must still be of the (pure) class it had when the graph was built.
        others = [i for i in range(n) if i not in fused]
        if others:
            lines += ["    if " + " or ".join(f"type(l{i}) is not t{i}" for i in others) + ":", "        return NONE"]
        for i in self.fused:
            required = "" if i in self.with_residual else f" and not d{i}.get('residual_required')"
            lines += [
                f"    s = d{i}.get('_cpu_state')",
                f"    s{i} = None",
                f"    if (s is not None and s.weight is not None and type(l{i}) is FusedConv2d"
                f" and d{i}.get('_compiled_call_impl') is None and d{i}.get('pre_pad') is None{required}):",
                f"        w = d{i}['_parameters'].get('weight')",
                f"        b = d{i}['_buffers']",
                "        c = b.get('scale')",
                "        h = b.get('shift')",
                "        if (w is s.weight_src and c is s.scale_src and h is s.shift_src"
                " and s.snapshot == snapshot(w, c, h)):",
                f"            s{i} = s",
            ]
        lines.append("    return (" + "".join(f"s{i}, " if i in fused else "None, " for i in range(n)) + ")")
        names = ", ".join(f"l{i}" for i in range(n))
        types = ", ".join(f"t{i}" for i in range(n))
        src = "def make(leaves, types):\n" + f"    {names}, = leaves\n" + f"    {types}, = types\n" + \
            "".join(f"    {line}\n" for line in lines) + "    return states\n"
        namespace = {"grad_enabled": _grad_enabled, "autocast_any": autocast.any_enabled, "cpu": cpu, "ops": ops,
                     "mkldnn_enabled": cpu.mkldnn_enabled, "USE_KERNEL": _USE_KERNEL,
                     "global_observers": global_observers, "NONE": none, "FusedConv2d": FusedConv2d,
                     "FORWARD": _FORWARD, "CALL": _CALL, "CALL_IMPL": _CALL_IMPL, "snapshot": cpu._snapshot,
                     "plain_arguments": plain_arguments}
        methods = self.class_methods

        def leaf_classes_patched() -> bool:
            for cls, forward, call, call_impl in methods:
                if cls.forward is not forward or cls.__call__ is not call or cls._call_impl is not call_impl:
                    return True
            return False

        namespace["leaf_classes_patched"] = leaf_classes_patched
        exec(compile(src, "<fusedconv flat states>", "exec"), namespace)  # noqa: S102 - generated here
        self.states = namespace["make"](self.leaves, self.types)
        exec(compile(_KEPT_SOURCE, "<fusedconv frozen states>", "exec"), namespace)  # noqa: S102
        # What an armed model's forwards use until it escapes (graph/reach.py, FlatCheck.states).
        self.kept_states = namespace["kept"](self.states)
        if self.frozen:
            self.states = self.kept_states

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["states"], state["kept_states"]
        return state

    def __setstate__(self, state):
        state.setdefault("frozen", False)
        state.setdefault("class_methods", ())
        self.__dict__.update(state)
        self._compile()


def fused_call(state, module, x, residual=None, residual_private: bool = False):
    """`module(x, residual, residual_private)`, as that route's ops when `state` (from FusedLeaves.states) is given
    and the module routed the call's signature before: one oneDNN op (oneDNN accepted the module), or F.conv2d with
    the folded weight and the epilogue in place (`cpu.folded_call`: NCHW input, small convs, small convs on a copied
    channel slice), or the tap route of a conv to one output channel (`cpu.taps_call`) (module doc)."""
    if state is not None and type(x) is _Tensor and x.is_cpu:
        try:
            if residual is None:
                # The key eager_forward routes by (`cpu._route`), with no gradient needed (checked per forward).
                route = state.routes.get((x.shape, x.stride(), x.dtype, False))
                if route is _ONEDNN and state.onednn_ok:
                    return cpu._pointwise(x, state.packed, state.bias, *state.unary_tail)
            elif type(residual) is _Tensor:
                route = state.routes.get((x.shape, x.stride(), x.dtype, False, residual.shape, residual.stride(),
                                          residual.dtype, residual.device))
                if route is _ONEDNN and state.onednn_ok:
                    if residual_private and state.inplace_tail is not None and cpu._writable(x, residual):
                        return cpu._pointwise_binary_inplace(residual, x, state.packed, state.bias,
                                                             *state.inplace_tail)
                    return cpu.conv_act(x, state.packed, state.bias, state.onednn_args, residual)
            else:
                route = None
            if route is _FOLDED or route is _FOLDED_CL:
                return cpu.folded_call(state, route, x, residual)
            if route is _FOLDED_COPY or route is _FOLDED_COPY_NCHW:
                return cpu.copied_folded_call(state, route, x, residual)
            if route is _TAPS:
                return cpu.taps_call(state, x, residual)
        except RuntimeError:
            pass  # oneDNN refused: the module call below handles it (and takes F.conv2d from then on)
    return module(x, residual, residual_private)
