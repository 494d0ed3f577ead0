"""Graph-level conversion of a torch.export ExportedProgram: aten conv -> batch_norm (-> act) (-> add -> act)
chains become one `torch.ops.fusedconv.conv_bn_act` call.

An ExportedProgram has no Conv2d / BatchNorm modules to swap, only aten calls, so the module passes in
`dataflow.py` cannot see its chains. This pass works on the program's unlifted module (`ep.module()`: an
fx.GraphModule whose parameters and buffers are `get_attr` nodes), rewrites the graph there, and exports the
rewritten module again with `torch.export.export` (example inputs from the program itself, dynamic dimensions
from its range constraints). Re-exporting is the public, version-stable way to get a valid program back: the
graph signature, state dict and fake-tensor metadata are all rebuilt by torch, and the op's fake kernel is
checked on the way.

The chains recognised and the equivalence checks are in `exported_chains.py`, the graph rewrite in
`exported_rewrite.py`.

TorchScript (`convert_torchscript`): converted to an ExportedProgram with torch's TorchScript-to-export
converter, then as above; the result is an ExportedProgram, not TorchScript.
`decompose_fused` spells the op back in standard aten ops, for ONNX export and runtimes without fusedconv.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.fx as fx

import fusedconv.ops  # noqa: F401 - registers torch.ops.fusedconv.conv_bn_act
from fusedconv.comparison import SELF_CHECK_TOLERANCE, compare_outputs  # the same rule as convert(check)
from fusedconv.graph.exported_rewrite import KIND, fuse_graph_module
from fusedconv.report import ConversionReport

__all__ = ["KIND", "convert_exported", "convert_torchscript", "decompose_fused", "fuse_graph_module"]


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
