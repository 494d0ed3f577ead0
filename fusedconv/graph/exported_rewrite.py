"""Splice one `torch.ops.fusedconv.conv_bn_act` call in place of each matched aten chain of an exported graph
module, with the BN folded into fp32 `scale` / `shift` buffers (the rewriting half of `exported.py`)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import fusedconv.ops  # noqa: F401 - registers torch.ops.fusedconv.conv_bn_act
from fusedconv.fold import bn_scale_shift
from fusedconv.graph.exported_chains import _CONV_OPS, _bind, _Chain, _match, _Skip, _val
from fusedconv.report import ConversionReport

KIND = "conv_bn_act"


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
