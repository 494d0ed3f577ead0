"""`torch.jit.script` of a converted model: refused with an error that says why and what works instead.

TorchScript compiles Python source, and a converted model's fused layers and rewritten blocks run generated code
(guarded dispatch, the flat forward, the CPU routes) that it cannot compile: unhandled, scripting fails deep in
TorchScript with "Can't get source for <bound method forward of ...>" and a printout of the whole model. TorchScript
asks every module for its scriptable form first (`__prepare_scriptable__`, recursively over the submodules), so
each fusedconv class answers with this error instead. Tracing is unaffected: `torch.jit.trace` records the ops a
call runs and works on converted models, as do torch.export, ONNX export and torch.compile.
"""
from __future__ import annotations


def refuse_script(module) -> None:
    """The `__prepare_scriptable__` of every fusedconv module class: raises."""
    raise RuntimeError(
        f"torch.jit.script: {type(module).__name__} is a fusedconv module (a fused layer, or a block or model that "
        "fusedconv.convert or fusedconv.reparameterize rewrote), which runs Python code TorchScript cannot compile; "
        "use torch.jit.trace (or torch.export, ONNX export, torch.compile) on the converted model, or script the "
        "original model")
