"""Graph-level conversion of a torch.export ExportedProgram: aten conv -> batch_norm (-> act) (-> add -> act)
chains become one `torch.ops.fusedconv.conv_bn_act` call.

An ExportedProgram has no Conv2d / BatchNorm modules to swap, only aten calls, so the module passes in
`dataflow.py` cannot see its chains. This pass works on the program's unlifted module (`ep.module()`: an
fx.GraphModule whose parameters and buffers are `get_attr` nodes), rewrites the graph there, and exports the
rewritten module again with `torch.export.export` (example inputs from the program itself, dynamic dimensions
from its range constraints). Re-exporting is the public, version-stable way to get a valid program back: the
graph signature, state dict and fake-tensor metadata are all rebuilt by torch, and the op's fake kernel is
checked on the way.

Recognised, on torch 2.11 .. 2.14 (training IR from `torch.export.export`, core ATen after
`run_decompositions`):
  conv   aten.conv2d.default / .padding ("valid", symmetric "same"), aten.convolution.default
         (transposed=False); 4-d input and weight
  bn     aten.batch_norm.default (training=False), aten._native_batch_norm_legit_no_training.default,
         aten.native_batch_norm.default / aten._native_batch_norm_legit.default (training=False),
         aten._batch_norm_no_update.default — the tuple-returning ones only when just output 0 is used
  act    relu(_), hardtanh(_)(0, 6), leaky_relu(_), silu(_), hardswish(_), gelu(_), clamp(0[, 6]), clamp_min(0)
  add    aten.add.Tensor / aten.add_.Tensor (alpha 1) with a residual of the output's exact shape and dtype

A chain is rewritten only when it is exactly equivalent: each intermediate value has one user, the weight,
conv bias and BN tensors are parameters / buffers of the program (get_attr nodes), the residual does not
come from the chain, an in-place add writes into the chain's value, no mutating op runs between the chain's
first and last node, and the result keeps the original's dtype, shape and memory format. Everything else is
left alone and reported with the reason.

TorchScript (`convert_torchscript`): converted to an ExportedProgram with torch's TorchScript-to-export
converter, then as above; the result is an ExportedProgram, not TorchScript.
`decompose_fused` spells the op back in standard aten ops, for ONNX export and runtimes without fusedconv.
"""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.fx as fx

import fusedconv.ops  # noqa: F401 - registers torch.ops.fusedconv.conv_bn_act
from fusedconv.activations import ActivationSpec
from fusedconv.fold import bn_scale_shift
from fusedconv.report import ConversionReport

__all__ = ["KIND", "convert_exported", "convert_torchscript", "decompose_fused", "fuse_graph_module"]

KIND = "conv_bn_act"

aten = torch.ops.aten


def _overloads(*names: str) -> tuple:
    """The aten overloads that exist in this torch build (some private ones come and go between versions)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return tuple(found)


_CONV_OPS = _overloads("conv2d.default", "conv2d.padding", "convolution.default")
# BN ops returning one tensor, and those returning (out, save_mean, save_invstd, ...) of which we need out.
_BN_SINGLE = _overloads("batch_norm.default")
_BN_TUPLE = _overloads("_native_batch_norm_legit_no_training.default", "native_batch_norm.default",
                       "_native_batch_norm_legit.default", "_batch_norm_no_update.default")
_ADD_OPS = _overloads("add.Tensor")
_ADD_INPLACE = _overloads("add_.Tensor")
_PLAIN_ACTS = {op: name for names, name in (
    (("relu.default", "relu_.default"), "relu"),
    (("silu.default", "silu_.default"), "silu"),
    (("hardswish.default", "hardswish_.default"), "hardswish"),
) for op in _overloads(*names)}
_HARDTANH = _overloads("hardtanh.default", "hardtanh_.default")
_LEAKY = _overloads("leaky_relu.default", "leaky_relu_.default")
_GELU = _overloads("gelu.default", "gelu_.default")
_CLAMP = _overloads("clamp.default", "clamp_.default")
_CLAMP_MIN = _overloads("clamp_min.default", "clamp_min_.default")


def _bind(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in (aten calls mix positional and keyword)."""
    schema = node.target._schema
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _pair(v, name: str) -> list[int]:
    v = [v] if isinstance(v, int) else list(v)
    if len(v) == 1:
        v = v * 2
    if len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise _Skip(f"conv {name} {v!r} is not two integers")
    return v


class _Skip(Exception):
    """A chain (or the part of it being matched) cannot be rewritten; the message is the report's reason."""


class _Chain:
    """One matched conv -> bn (-> act) (-> add -> act) chain of the graph and what the op call needs."""

    def __init__(self, conv: fx.Node):
        self.conv = conv
        self.nodes: list[fx.Node] = [conv]   # chain nodes in data-flow order (dead getitems in `extra`)
        self.extra: list[fx.Node] = []
        self.bn: fx.Node | None = None
        self.add: fx.Node | None = None
        self.residual: fx.Node | None = None
        self.act = ActivationSpec("identity")
        self.conv_args: dict = {}
        self.bn_args: dict = {}
        self.note = ""

    @property
    def value(self) -> fx.Node:
        return self.nodes[-1]

    def detail(self) -> str:
        parts = ["bn"] + (["add"] if self.add is not None else [])
        if not self.act.is_identity:
            parts.append(str(self.act))
        return "+".join(parts) + (f" ({self.note})" if self.note else "")


def _attr_target(node, what: str, allow_none: bool = True):
    """The get_attr target of a chain constant (None stays None); anything computed is refused."""
    if node is None and allow_none:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise _Skip(f"{what} is not a parameter or buffer of the program")
    return node.target


def _only_user(node: fx.Node, what: str) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 0:
        return None
    if len(users) > 1:
        raise _Skip(f"{what} output is used by {len(users)} nodes ({', '.join(u.name for u in users[:4])})")
    return users[0]


def _parse_conv(chain: _Chain) -> None:
    node = chain.conv
    a = _bind(node)
    if node.target is aten.convolution.default:
        if a.get("transposed"):
            raise _Skip("transposed convolution")
        if any(p != 0 for p in (a.get("output_padding") or [])):
            raise _Skip("convolution with output_padding")
    x, w, b = a["input"], a["weight"], a["bias"]
    xv, wv = _val(x), _val(w)
    if xv is None or wv is None:
        raise _Skip("conv input or weight has no shape metadata")
    if xv.dim() != 4 or wv.dim() != 4:
        raise _Skip(f"conv is not 2-d on a batched input (input {xv.dim()}-d, weight {wv.dim()}-d)")
    if not xv.is_floating_point() or wv.dtype != xv.dtype:
        raise _Skip(f"conv dtypes {xv.dtype} / {wv.dtype} are not one floating dtype")
    padding = a["padding"]
    if isinstance(padding, str):
        padding = _string_padding(padding, wv, _pair(a["dilation"], "dilation"), _pair(a["stride"], "stride"))
    chain.conv_args = {
        "x": x, "weight": w, "weight_target": _attr_target(w, "conv weight", allow_none=False),
        "bias_target": _attr_target(b, "conv bias"),
        "stride": _pair(a["stride"], "stride"), "padding": _pair(padding, "padding"),
        "dilation": _pair(a["dilation"], "dilation"), "groups": int(a["groups"]),
    }


def _string_padding(padding: str, wv: torch.Tensor, dilation: list[int], stride: list[int]) -> list[int]:
    """conv2d's padding="valid" / "same" as explicit numbers, when they are symmetric (else _Skip)."""
    if padding == "valid":
        return [0, 0]
    if padding != "same":
        raise _Skip(f"conv padding {padding!r} is not 'valid' or 'same'")
    total = [d * (k - 1) for d, k in zip(dilation, wv.shape[2:])]
    if not all(isinstance(t, int) for t in total) or any(t % 2 for t in total) or stride != [1, 1]:
        raise _Skip("conv padding='same' pads asymmetrically here (even kernel extent), which the op cannot express")
    return [t // 2 for t in total]


def _parse_bn(chain: _Chain, bn: fx.Node) -> None:
    a = _bind(bn)
    if a.get("training"):
        raise _Skip("batch norm in training mode (normalises with batch statistics)")
    if a.get("running_mean") is None or a.get("running_var") is None:
        raise _Skip("batch norm without running statistics")
    targets = {k: _attr_target(a.get(k), f"batch norm {k}") for k in ("weight", "bias", "running_mean",
                                                                     "running_var")}
    eps = a.get("eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise _Skip(f"batch norm eps {eps!r} is not a number")
    chain.bn_args = {**targets, "eps": float(eps)}
    chain.bn = bn
    chain.nodes.append(bn)
    if bn.target in _BN_TUPLE:
        # out, save_mean, save_invstd: only `out` may be read (the others are training by-products).
        outs = [u for u in bn.users if u.op == "call_function" and u.target is operator.getitem]
        if len(outs) != len(bn.users):
            raise _Skip(f"batch norm result {bn.name} is used other than by indexing")
        first = [u for u in outs if u.args[1] == 0]
        if len(first) != 1 or any(u.users for u in outs if u.args[1] != 0):
            raise _Skip("batch norm statistics outputs are used")
        chain.nodes.append(first[0])
        chain.extra.extend(u for u in outs if u.args[1] != 0)


def _activation(node: fx.Node, value: fx.Node) -> ActivationSpec | None:
    """The epilogue activation `node` computes on `value`, or None when it is not one."""
    t = node.target
    if node.op != "call_function" or not hasattr(t, "_schema"):
        return None
    if t in _PLAIN_ACTS or t in _HARDTANH or t in _LEAKY or t in _GELU or t in _CLAMP or t in _CLAMP_MIN:
        a = _bind(node)
        if a.get("self") is not value:
            return None
        if t in _PLAIN_ACTS:
            return ActivationSpec(_PLAIN_ACTS[t])
        if t in _HARDTANH:
            return ActivationSpec("relu6") if (a["min_val"], a["max_val"]) == (0, 6) else None
        if t in _LEAKY:
            slope = a["negative_slope"]
            ok = isinstance(slope, (int, float)) and not isinstance(slope, bool) and math.isfinite(slope)
            return ActivationSpec("leaky_relu", float(slope)) if ok else None
        if t in _GELU:
            approx = a.get("approximate", "none")
            return {"none": ActivationSpec("gelu"), "tanh": ActivationSpec("gelu_tanh")}.get(approx)
        if t in _CLAMP:
            lo, hi = a.get("min"), a.get("max")
            if lo == 0 and hi is None and not isinstance(lo, bool):
                return ActivationSpec("relu")
            if lo == 0 and hi == 6 and not isinstance(lo, bool) and not isinstance(hi, bool):
                return ActivationSpec("relu6")
            return None
        if t in _CLAMP_MIN:
            lo = a.get("min")
            return ActivationSpec("relu") if lo == 0 and not isinstance(lo, bool) else None
    return None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Symbolic sizes compare by their expression: equal names mean provably equal, anything else is refused.
    return a.dim() == b.dim() and all(str(i) == str(j) for i, j in zip(a.shape, b.shape))


def _residual(add: fx.Node, value: fx.Node) -> fx.Node:
    """The other operand of an add of the chain's value, or _Skip when the add cannot join the epilogue."""
    a = _bind(add)
    if a.get("alpha", 1) != 1:
        raise _Skip(f"add {add.name} has alpha={a['alpha']!r}")
    lhs, rhs = a["self"], a["other"]
    if lhs is value and rhs is value:
        raise _Skip(f"add {add.name} adds the chain's value to itself")
    if add.target in _ADD_INPLACE and lhs is not value:
        raise _Skip(f"in-place add {add.name} writes into the residual, not the chain's value")
    other = rhs if lhs is value else lhs
    if not isinstance(other, fx.Node):
        raise _Skip(f"add {add.name} adds a constant {other!r}, not a residual tensor")
    ov, vv = _val(other), _val(value)
    if ov is None or vv is None:
        raise _Skip(f"add {add.name} operands have no shape metadata")
    if not _same_shape(ov, vv) or ov.dtype != vv.dtype:
        raise _Skip(f"add {add.name} residual {tuple(ov.shape)} {ov.dtype} is not the chain's exact shape and "
                    f"dtype {tuple(vv.shape)} {vv.dtype} (the epilogue does not broadcast or promote)")
    return other


def _match(conv: fx.Node, claimed: set) -> _Chain:
    chain = _Chain(conv)
    _parse_conv(chain)
    bn = _only_user(conv, "conv")
    if bn is None or bn.op != "call_function" or bn.target not in _BN_SINGLE + _BN_TUPLE:
        raise _Skip("not followed by an inference batch norm" + (f" (followed by {bn.name})" if bn else ""))
    if _bind(bn)["input"] is not conv:
        raise _Skip(f"conv output is not the input of batch norm {bn.name}")
    _parse_bn(chain, bn)
    # The BN's value may have several users (the fused call then feeds them all); the activation / add
    # join the epilogue only when they are its one user.
    nxt = _only_user_or_none(chain.value)
    if nxt is not None and nxt not in claimed:
        spec = _activation(nxt, chain.value)
        if spec is not None:
            chain.act = spec
            chain.nodes.append(nxt)
        elif nxt.op == "call_function" and nxt.target in _ADD_OPS + _ADD_INPLACE:
            try:
                residual = _residual(nxt, chain.value)
            except _Skip as e:  # the conv + bn are still fused; the add stays a separate op
                chain.note = f"add not fused: {e}"
            else:
                chain.add, chain.residual = nxt, residual
                chain.nodes.append(nxt)
                after = _only_user_or_none(nxt)
                if after is not None and after not in claimed:
                    spec = _activation(after, nxt)
                    if spec is not None:
                        chain.act = spec
                        chain.nodes.append(after)
    _check_order(chain)
    _check_output_format(chain)
    return chain


def _only_user_or_none(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _alias_root(value):
    """The node whose storage `value` shares: followed back through views, in-place ops (their schemas mark
    the aliased argument) and tuple indexing. Different roots cannot alias (custom ops never return views)."""
    node = value
    for _ in range(10_000):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return node
        if node.target is operator.getitem:  # an element of a tuple result: as the whole result (conservative)
            node = node.args[0]
            continue
        schema = getattr(node.target, "_schema", None)
        out = schema.returns[0].alias_info if schema is not None and schema.returns else None
        if out is None:
            return node
        src = None
        for arg, v in zip(schema.arguments, _bind(node).values()):
            if arg.alias_info is not None and set(arg.alias_info.before_set) & set(out.before_set):
                src = v
                break
        if not isinstance(src, fx.Node):
            return node
        node = src
    return node


def _written(node: fx.Node) -> list:
    """The arguments a mutating aten call writes to (empty for everything else)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    return [v for arg, v in zip(schema.arguments, _bind(node).values())
            if arg.alias_info is not None and arg.alias_info.is_write]


def _check_order(chain: _Chain) -> None:
    """The fused call reads x, the weight and the residual where the chain's last node was, while the
    original read x and the weight at the conv and the residual at the add: a write to any of them (or to a
    view of them) after its original read and before the chain's end would change what the call reads."""
    inside = set(chain.nodes) | set(chain.extra)
    roots = {_alias_root(chain.conv_args["x"]), _alias_root(chain.conv_args["weight"])}
    node = chain.conv.next
    while node is not chain.value and node.op != "root":
        if node is chain.add:
            roots.add(_alias_root(chain.residual))
        if node not in inside:
            for v in _written(node):
                if _alias_root(v) in roots:
                    raise _Skip(f"{node.name} ({node.target}) writes into an input of the chain before its end")
        node = node.next


def _check_output_format(chain: _Chain) -> None:
    from fusedconv.kernels.reference import output_memory_format

    xv, out = _val(chain.conv_args["x"]), _val(chain.value)
    if out is None:
        raise _Skip("chain output has no shape metadata")
    if out.dtype != xv.dtype:
        raise _Skip(f"chain output dtype {out.dtype} differs from the conv's {xv.dtype}")
    fmt = output_memory_format(xv)
    try:
        same = out.is_contiguous(memory_format=fmt)
    except Exception:  # noqa: BLE001 - symbolic strides that cannot be decided: refuse rather than guess
        same = False
    if not same:
        raise _Skip(f"chain output layout is not the {fmt} layout the fused op produces")


def _fresh_attr(gm: fx.GraphModule, owner: str, name: str) -> str:
    base = f"{owner}.{name}" if owner else name
    target, i = base, 0
    while _has_attr(gm, target):
        i += 1
        target = f"{base}_{i}"
    return target


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    obj = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _get_attr(gm: torch.nn.Module, target: str | None):
    if target is None:
        return None
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_buffer(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    mod = gm
    for part in owner.split(".") if owner else ():
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    mod.register_buffer(name, value)


def _scope(conv: fx.Node) -> str:
    """The module path that held the conv (e.g. "layer1.0" for layer1.0.conv1.weight), "" if unknown."""
    try:
        weight = _bind(conv)["weight"]
    except Exception:  # noqa: BLE001 - only used for the report
        return ""
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return ""
    return weight.target.rpartition(".")[0].rpartition(".")[0]


def _rewrite(gm: fx.GraphModule, chain: _Chain, replaced: dict) -> None:
    """Splice the op call in where the chain's last node was; `replaced` maps the last nodes of chains already
    rewritten to their op calls (this chain's input or residual may be one of them)."""
    ca, ba = chain.conv_args, chain.bn_args
    xv = _val(ca["x"])
    dtype = torch.float64 if xv.dtype == torch.float64 else torch.float32  # the epilogue's accumulator dtype
    scale, shift = bn_scale_shift(_get_attr(gm, ba["running_mean"]), _get_attr(gm, ba["running_var"]),
                                  _get_attr(gm, ba["weight"]), _get_attr(gm, ba["bias"]), ba["eps"],
                                  _get_attr(gm, ca["bias_target"]), dtype=dtype)
    device = _get_attr(gm, ca["weight_target"]).device
    owner = ca["weight_target"].rpartition(".")[0]
    # New buffers next to the conv's weight (layer1.0.conv1.fused_scale): the state dict stays readable.
    scale_target = _fresh_attr(gm, owner, "fused_scale")
    _set_buffer(gm, scale_target, scale.to(device))
    shift_target = _fresh_attr(gm, owner, "fused_shift")
    _set_buffer(gm, shift_target, shift.to(device))
    last = chain.value
    graph = gm.graph
    with graph.inserting_before(last):
        scale_node = graph.get_attr(scale_target)
        shift_node = graph.get_attr(shift_target)
        fused = graph.call_function(torch.ops.fusedconv.conv_bn_act.default, (
            replaced.get(ca["x"], ca["x"]), ca["weight"], scale_node, shift_node,
            replaced.get(chain.residual, chain.residual), ca["stride"], ca["padding"],
            ca["dilation"], ca["groups"], chain.act.name, chain.act.param))
    fused.meta.update({k: v for k, v in last.meta.items() if k in ("val", "tensor_meta", "stack_trace",
                                                                    "nn_module_stack")})
    last.replace_all_uses_with(fused)
    replaced[last] = fused
    for node in reversed(chain.nodes):
        if node is chain.bn:
            for dead in chain.extra:  # unused statistics outputs of a tuple-returning BN go first
                graph.erase_node(dead)
        attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        graph.erase_node(node)
        for a in attrs:
            if not a.users:
                graph.erase_node(a)


def _delete_unused_attrs(gm: fx.GraphModule, before: set[str]) -> None:
    """Drop the parameters / buffers only the removed BN calls read (they would stay in the state dict)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:  # reads nothing uses (e.g. a BN's num_batches_tracked)
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    emptied = set()
    for target in sorted(before - used):
        owner, _, name = target.rpartition(".")
        mod = _get_attr(gm, owner) if owner else gm
        if isinstance(mod, torch.nn.Module) and (name in mod._parameters or name in mod._buffers):
            delattr(mod, name)
            emptied.add(mod)
    for mod in emptied:
        # A BN's step counter is in the state dict but never read in eval: drop it once its BN is gone.
        left = set(mod._parameters) | set(mod._buffers)
        if left == {"num_batches_tracked"} and not mod._modules:
            delattr(mod, "num_batches_tracked")


def fuse_graph_module(gm: fx.GraphModule, report: ConversionReport | None = None) -> ConversionReport:
    """Rewrite every provable aten conv -> bn (-> act) (-> add -> act) chain of `gm` (an unlifted exported
    module: parameters as get_attr nodes) into `torch.ops.fusedconv.conv_bn_act`, in place."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm: expected a torch.fx.GraphModule, got {type(gm).__name__}")
    report = ConversionReport() if report is None else report
    before = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    claimed: set = set()
    chains = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target not in _CONV_OPS:
            continue
        try:
            chain = _match(node, claimed)
        except _Skip as e:
            report.add(_scope(node), (node.name,), KIND, "skipped", str(e))
            continue
        except Exception as e:  # noqa: BLE001 - an unexpected graph shape must not abort the whole conversion
            report.add(_scope(node), (node.name,), KIND, "skipped", f"not understood ({type(e).__name__}: {e})")
            continue
        claimed.update(chain.nodes)
        chains.append(chain)
    replaced: dict = {}
    for chain in chains:
        names = tuple(n.name for n in chain.nodes if n.target is not operator.getitem)
        try:
            _rewrite(gm, chain, replaced)
        except ValueError as e:  # statistics fold refused (non-finite, negative variance)
            report.add(_scope(chain.conv), names, KIND, "skipped", str(e))
            continue
        report.add(_scope(chain.conv), names, KIND, "fused", chain.detail())
    _delete_unused_attrs(gm, before)
    gm.graph.lint()
    gm.recompile()
    return report


# --------------------------------------------------------------------------------------- ExportedProgram
def _concrete_dim(d, ranges: dict) -> int:
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    if isinstance(hint, int):
        return hint
    expr = getattr(getattr(d, "node", None), "expr", None)
    vr = ranges.get(expr)
    lower = int(vr.lower) if vr is not None and math.isfinite(float(vr.lower)) else 2
    return max(lower, 2)


def _in_spec(ep, gm: fx.GraphModule):
    """The pytree spec of the program's (args, kwargs)."""
    spec = getattr(gm, "_in_spec", None)
    return spec if spec is not None else ep.call_spec.in_spec


def _example_inputs(ep, gm: fx.GraphModule) -> tuple[tuple, dict]:
    """(args, kwargs) to export `gm` with: the program's stored example inputs, else zeros of its input shapes."""
    try:
        stored = ep.example_inputs
    except Exception:  # noqa: BLE001 - older programs may not record them
        stored = None
    if stored is not None:
        args, kwargs = stored
        return tuple(args), dict(kwargs)
    leaves = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            shape = [_concrete_dim(d, ep.range_constraints) for d in v.shape]
            leaves.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
        elif isinstance(v, (int, float, bool, str)) or v is None:
            leaves.append(v)
        else:  # a SymInt input
            leaves.append(_concrete_dim(v, ep.range_constraints))
    args, kwargs = torch.utils._pytree.tree_unflatten(leaves, _in_spec(ep, gm))
    return tuple(args), dict(kwargs)


def _dynamic_shapes(ep, gm: fx.GraphModule):
    """The program's symbolic input dimensions as Dim specs (one Dim per symbol, shared where shared)."""
    if not ep.range_constraints:
        return None
    from torch.export import Dim

    dims: dict[str, object] = {}
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            specs.append(None)
            continue
        spec = {}
        for i, d in enumerate(v.shape):
            if isinstance(d, int):
                continue
            expr = d.node.expr
            if not getattr(expr, "is_Symbol", False):
                spec[i] = Dim.AUTO  # a derived size (e.g. 2 * s0): let export rediscover the relation
                continue
            name = str(expr)
            if name not in dims:
                vr = ep.range_constraints.get(expr)
                lo = int(vr.lower) if vr is not None and math.isfinite(float(vr.lower)) else 0
                hi = int(vr.upper) if vr is not None and math.isfinite(float(vr.upper)) else None
                dims[name] = Dim(name, min=lo, max=hi) if hi is not None else Dim(name, min=lo)
            spec[i] = dims[name]
        specs.append(spec or None)
    nested_args, nested_kwargs = torch.utils._pytree.tree_unflatten(specs, _in_spec(ep, gm))
    names = list(inspect.signature(gm.forward).parameters)
    shapes = dict(zip(names, nested_args))
    shapes.update(nested_kwargs)
    return shapes


def _random_like(args: tuple, kwargs: dict, seed: int = 0) -> tuple[tuple, dict]:
    """The example inputs with every floating tensor replaced by seeded normal values (zeros hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)

    def fill(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype).to(v.device)
        return v

    return torch.utils._pytree.tree_map(fill, (args, kwargs))


def _self_check(ep, converted, args: tuple, kwargs: dict, report: ConversionReport) -> None:
    from fusedconv.convert import SELF_CHECK_TOLERANCE, compare_outputs  # the same rule as convert(check)

    args, kwargs = _random_like(args, kwargs)
    with torch.no_grad():
        ref = torch.utils._pytree.tree_flatten(ep.module()(*args, **kwargs))
        ref = ([t.detach().clone() if isinstance(t, torch.Tensor) else t for t in ref[0]], ref[1])
        err, tol = compare_outputs(converted.module()(*args, **kwargs), *ref)
    report.max_rel_error = err
    if err > tol:
        raise RuntimeError(f"convert_exported: the converted program's outputs differ from the original's by "
                           f"{err:.3e} (max |diff| / max |original|), above the tolerance {tol:g} "
                           f"(per dtype: {({str(k): v for k, v in SELF_CHECK_TOLERANCE.items()})}); "
                           f"please report this as a bug.\n{report}")


def _export(gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic_shapes, report: ConversionReport):
    """torch.export.export of the rewritten module. A program whose recorded dimension ranges are wider than
    its graph's own guards (e.g. one converted from TorchScript, whose H and W may be 2 although the graph
    needs 3) fails with a constraint violation; it is then exported again with Dim.AUTO for its symbolic
    dimensions, which lets torch derive the ranges, and the new ranges are noted in the report."""
    with torch.no_grad():
        try:
            return torch.export.export(gm, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:
            if dynamic_shapes is None or "Constraints violated" not in str(e):
                raise
        from torch.export import Dim

        auto = torch.utils._pytree.tree_map(lambda d: Dim.AUTO if not isinstance(d, int) else d, dynamic_shapes,
                                            is_leaf=lambda d: d is None or not isinstance(d, (dict, list, tuple)))
        out = torch.export.export(gm, args, kwargs or None, dynamic_shapes=auto, strict=False)
    ranges = ", ".join(f"{k}: [{v.lower}, {v.upper}]" for k, v in out.range_constraints.items()) or "none"
    report.notes.append(f"the program's dimension ranges did not match its graph; re-derived by torch.export "
                        f"(Dim.AUTO): {ranges}")
    return out


def convert_exported(ep, *, check: bool = False, return_report: bool = False):
    """Fuse the conv -> batch_norm (-> act) (-> + residual -> act) chains of a torch.export ExportedProgram.

    Returns a new ExportedProgram (the input is not modified; unchanged weights are shared with it, not
    copied) in which each provably equivalent chain is one `torch.ops.fusedconv.conv_bn_act` call with the BN
    folded into fp32 `scale` / `shift` buffers (float64 for a float64 conv); the program is re-exported from
    its rewritten module with its own example inputs (zeros of its input shapes when it stores none) and
    dynamic dimensions. A program in the core-ATen dialect (after `run_decompositions`) is decomposed again,
    so the result stays in that dialect. When nothing can be fused the input program itself is returned.

    `check=True` runs both programs on seeded random inputs of the example shapes and stores the maximum
    relative error in `report.max_rel_error`; a RuntimeError is raised above `fusedconv.convert`'s
    per-dtype tolerance. With `return_report=True` returns `(program, report)`.
    Loading a saved converted program needs `import fusedconv` first (it registers the op).
    """
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"ep: expected a torch.export.ExportedProgram (torch.export.export / torch.export.load), "
                        f"got {type(ep).__name__}")
    gm = ep.module()  # a fresh unlifted module: rewriting it leaves the input program untouched
    report = fuse_graph_module(gm)
    if not report.fused:
        report.notes.append("no chain was fused: the program is returned unchanged")
        return (ep, report) if return_report else ep
    args, kwargs = _example_inputs(ep, gm)
    dynamic_shapes = _dynamic_shapes(ep, gm)
    try:
        out = _export(gm, args, kwargs, dynamic_shapes, report)
        if getattr(ep, "dialect", "TRAINING") != "TRAINING":
            out = out.run_decompositions()
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(f"convert_exported: re-exporting the rewritten program failed "
                           f"({type(e).__name__}: {first}); the original program is unchanged") from e
    if check:
        _self_check(ep, out, args, kwargs, report)
    return (out, report) if return_report else out


def _conv_bn_act_decomposition(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation,
                               act_param):
    from fusedconv.kernels.reference import conv_bn_act_ref

    return conv_bn_act_ref(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, activation=activation, act_param=act_param, residual=residual)


def decompose_fused(ep):
    """The program with every `fusedconv.conv_bn_act` call spelled in standard aten ops (conv2d, then the
    fp32 scale / shift / residual / activation epilogue): for consumers that do not know the op, e.g.
    `torch.onnx.export(decompose_fused(ep), ...)` or a runtime without fusedconv installed."""
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"ep: expected a torch.export.ExportedProgram, got {type(ep).__name__}")
    return ep.run_decompositions({torch.ops.fusedconv.conv_bn_act.default: _conv_bn_act_decomposition})


# --------------------------------------------------------------------------------------------- TorchScript
def convert_torchscript(path_or_module, example_inputs, *, check: bool = False, return_report: bool = False):
    """Fuse the conv -> batch_norm chains of a TorchScript module (a `torch.jit.save` file or a loaded /
    scripted / traced module) and return the result as a torch.export ExportedProgram.

    TorchScript code cannot be rewritten in place safely, so the module is first converted to an
    ExportedProgram with torch's TorchScript-to-export converter (`torch._export.converter.TS2EPConverter`,
    a private API present in torch 2.4 .. 2.14) on `example_inputs` (a tensor or a tuple of positional
    arguments), then passed to `convert_exported`. The converter keeps the spatial dimensions dynamic and
    specialises dimensions whose example size is 0 or 1 (use a batch of 2 or more for a dynamic batch).
    The module must be in eval mode. Save the result with `torch.export.save` (a `.pt2` file).
    """
    if isinstance(path_or_module, (str, bytes)) or hasattr(path_or_module, "__fspath__"):
        import os

        path = os.fsdecode(path_or_module)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path_or_module: expected a TorchScript file, got {path!r} (no such file)")
        try:
            module = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise ValueError(f"path_or_module: expected a TorchScript file (torch.jit.save), got {path!r} which "
                             f"torch.jit.load cannot read ({type(e).__name__})") from e
    elif isinstance(path_or_module, torch.jit.ScriptModule):
        module = path_or_module
    else:
        raise TypeError(f"path_or_module: expected a TorchScript file path or a torch.jit.ScriptModule, got "
                        f"{type(path_or_module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"example_inputs: expected a tensor or a tuple of positional arguments, got "
                        f"{type(example_inputs).__name__}")
    training = [name or "<root>" for name, m in module.named_modules() if m.training]
    if training:
        raise RuntimeError(f"path_or_module: expected a TorchScript module in eval mode (call .eval() before "
                           f"torch.jit.save, or pass the loaded module after .eval()), got {len(training)} "
                           f"module(s) in training mode, e.g. {training[0]!r}")
    try:
        from torch._export.converter import TS2EPConverter
    except ImportError as e:
        raise RuntimeError(f"convert_torchscript: this torch ({torch.__version__}) has no TorchScript-to-export "
                           "converter (torch._export.converter); export the source model instead") from e
    import warnings

    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The converter warns about every unused BN step counter it copies; nothing the user can act on.
            warnings.filterwarnings("ignore", message="Manually populate")
            ep = TS2EPConverter(module, tuple(example_inputs)).convert()
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(f"convert_torchscript: converting the TorchScript module to an ExportedProgram failed "
                           f"({type(e).__name__}: {first})") from e
    return convert_exported(ep, check=check, return_report=return_report)
