"""The `.pt` file `fusedconv convert -o FILE.pt` writes: the fused state_dict plus the spec that rebuilds the
architecture, and `load_converted(path)`, which turns one back into a module."""

from __future__ import annotations

import os

from fusedconv.model_specs import CONVERTED_FORMAT, build_model, run_convert

CONVERTED_VERSION = 1


def module_structure(model) -> list[tuple[str, str]]:
    """(name, class) of every module: what a rebuilt conversion must reproduce for a state_dict to fit."""
    return [(n, type(m).__module__ + "." + type(m).__qualname__) for n, m in model.named_modules()]


def save_converted(path: str, fused_model, *, spec: str, input_size, report=None) -> None:
    """Write the fused state_dict plus what is needed to rebuild the module (see load_converted)."""
    import torch

    import fusedconv

    payload = {
        "format": CONVERTED_FORMAT,
        "version": CONVERTED_VERSION,
        "fusedconv_version": fusedconv.__version__,
        "spec": spec,
        "input_size": list(input_size),
        "structure": [list(t) for t in module_structure(fused_model)],
        "report": report.to_dict() if report is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in fused_model.state_dict().items()},
    }
    torch.save(payload, path)


def load_converted(path: str, *, trust_pickle: bool = False, map_location="cpu"):
    """Rebuild a model written by `fusedconv convert ... -o model.pt`: an eval-mode module with fused layers.

    The architecture is rebuilt from the saved spec, converted again, checked to have exactly the saved module
    structure, then the saved fused state_dict is loaded strictly. Only tensors and plain data are unpickled.
    """
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: expected a file written by `fusedconv convert -o FILE.pt`, got {path!r} "
                                "(no such file)")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CONVERTED_FORMAT:
        raise ValueError(f"path: expected a fusedconv-converted .pt file, got {path!r} (no {CONVERTED_FORMAT!r} "
                         "marker; was it written by `fusedconv convert`?)")
    if payload.get("version") != CONVERTED_VERSION:
        raise ValueError(f"path: expected format version {CONVERTED_VERSION}, got {payload.get('version')!r}")
    model = build_model(payload["spec"], trust_pickle=trust_pickle)
    fused, _ = run_convert(model, example_inputs=(torch.zeros(*payload["input_size"]),))
    saved = [tuple(t) for t in payload["structure"]]
    now = module_structure(fused)
    if saved != now:
        diff = next(((a, b) for a, b in zip(saved, now) if a != b), (saved[len(now):len(now) + 1],
                                                                      now[len(saved):len(saved) + 1]))
        raise ValueError(f"path: the saved conversion of {payload['spec']!r} does not match this fusedconv's "
                         f"conversion (first difference: saved {diff[0]}, now {diff[1]}); re-run fusedconv convert")
    fused.load_state_dict(payload["state_dict"], strict=True)
    return fused.eval()
