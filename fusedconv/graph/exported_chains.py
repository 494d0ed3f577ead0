"""The aten conv -> batch_norm (-> act) (-> add -> act) chains of an exported graph module, and the checks that
each one is exactly equivalent to one `fusedconv.conv_bn_act` call (the matching half of `exported.py`).

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
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from fusedconv.activations import ActivationSpec

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
