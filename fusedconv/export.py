"""ONNX export of a converted model with the BN fold baked into the Conv initializers.

Under tracing FusedConv2d computes its folded weight as `weight * scale` (so a traced graph never reads a stale
cache). torch.onnx keeps that product as a Mul over two initializers in front of each Conv, and its optimizer
does not fold tensors that large. `export_onnx` exports, then evaluates every node whose inputs are all
initializers (Mul, Reshape, Cast, ...) with onnx's reference evaluator and stores the result as an initializer, so
the graph holds only standard Conv (+ activation, + Add) nodes.
"""

from __future__ import annotations

import io
import os

import torch

from fusedconv.random_state import kept_random_states


def fold_constant_nodes(proto):
    """Replace nodes whose inputs are all initializers by initializers holding their outputs (in place)."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    kept, folded = [], 0
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type != "Constant" and (not inputs or not all(i in constants and i not in graph_inputs
                                                                  for i in inputs)):
            kept.append(node)
            continue
        if any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            kept.append(node)
            continue
        single = onnx.helper.make_model(
            onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None)
                                                        for o in node.output],
                                   [numpy_helper.from_array(constants[i], i) for i in inputs]),
            opset_imports=proto.opset_import)
        outputs = ReferenceEvaluator(single).run(None, {})
        for name, value in zip(node.output, outputs):
            constants[name] = value
            graph.initializer.append(numpy_helper.from_array(value, name))
        folded += 1
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return folded


def export_onnx(model: torch.nn.Module, args: tuple, path: str | os.PathLike | None = None, **kwargs):
    """torch.onnx.export (dynamo exporter) of `model` on `args`, constant-folded; saved to `path` if given.

    Returns the onnx ModelProto. Extra keyword arguments go to `torch.onnx.export`.
    """
    import onnx

    if not isinstance(args, tuple):
        args = (args,)
    with kept_random_states():  # the export's trace runs the forward's Python code (fusedconv/random_state.py)
        program = torch.onnx.export(model, args, dynamo=True, verbose=False, **kwargs)
    buf = io.BytesIO()
    program.save(buf)
    proto = onnx.load_from_string(buf.getvalue())
    fold_constant_nodes(proto)
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto
