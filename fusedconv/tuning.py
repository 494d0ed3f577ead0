"""Warm-up: make every fused layer pick (autotune) its kernel config before timing or CUDA-graph capture.

The Triton kernels are autotuned per distinct problem shape and dtype the first time they meet it: that first
call benchmarks several configs (seconds, many launches and allocations). Inside a CUDA-graph capture that
benchmarking would be captured or fail, and inside a timed region it distorts the numbers, so run

    fusedconv.tuning.warmup(model, x)                   # model(x) once
    fusedconv.tuning.warmup(model, x_bs1, x_bs32)       # model(x_bs1), model(x_bs32): one call per shape
    fusedconv.tuning.warmup(model, (x, mask), {"y": y}) # model(x, mask), model(y=y)

once, after `convert(...)` and `.to(device, dtype)`, with inputs of every shape the model will see.

Tuning survives the process: on CUDA, `warmup` first loads the tuned table for this GPU and triton version
(the package's committed default under `fusedconv/tuned/`, then the user's table in `tuning_dir()`,
`~/.cache/fusedconv/` or $FUSEDCONV_TUNING_DIR), so known shapes are not benchmarked again, and afterwards
saves the table with whatever it tuned. The table also holds the launcher's per-launch-signature choice between
kernel families (pointer, TMA, cuDNN, and the filling stream-K schedule timed where the model's schedule
leaves the GPU short: `fusedconv.kernels.variant_choice`), so a restarted process does not time them again; a table whose choices are malformed or name an unknown kernel is refused with an error naming the
file and the entry. The GEMM kernel's autotuner buckets M (N*OH*OW) to powers of two
(`fusedconv.kernels.tuning_cache`), so a new batch size in a known bucket is not retuned either. Each
positional example is one forward call: a tensor is the single argument, a tuple/list is the positional
arguments, a dict the keyword arguments. Calls whose (shape, dtype, device, memory format) signature repeats an
earlier one are skipped. Runs under torch.no_grad(), does not change train/eval mode, and synchronises CUDA at
the end so the tuning is complete when it returns. On CPU it simply runs the model (and fills FusedConv2d's
folded-weight cache), which is harmless.
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn

from fusedconv.random_state import kept_random_states

__all__ = ["warmup", "load_tuning", "save_tuning", "tuning_dir"]

DEFAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def tuning_dir() -> str:
    """Where tuned tables are kept: $FUSEDCONV_TUNING_DIR, else ~/.cache/fusedconv."""
    return os.environ.get("FUSEDCONV_TUNING_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusedconv")


def table_name(gpu_name: str, triton_version: str) -> str:
    """File name of the table for one GPU model and triton version, e.g. 'nvidia-h200--triton-3.6.0.json'."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return f"{slug}--triton-{triton_version}.json"


def _gemm_autotuner():
    """The GEMM kernel's autotuner (built on demand), or None without triton / under the interpreter."""
    try:
        import importlib

        mod = importlib.import_module("fusedconv.kernels.conv_bn_act")
    except ImportError:
        return None
    if mod.interpreting():
        return None
    return mod._get_autotuned_kernel()


def _context(device) -> tuple[str, str]:
    import triton

    return torch.cuda.get_device_name(device), triton.__version__


def load_tuning(device=None, paths=None) -> int:
    """Load tuned configs and kernel-family choices for this GPU + triton (committed default, then the user's
    table) into the autotuner and `variant_choice`.

    Configs on the deny-list for this GPU are skipped. A table written for another GPU or triton version, or
    with malformed / unknown choices, raises ValueError naming the file. Returns how many entries were added."""
    tuner = _gemm_autotuner()
    if tuner is None or not torch.cuda.is_available():
        return 0
    from fusedconv.kernels import denylist, tuning_cache, variant_choice

    gpu, version = _context(device)
    name = table_name(gpu, version)
    denied = {e_cfg for e_cfg in (tuple(e["config"]) for e in denylist.load()
                                  if e.get("gpu") == gpu and e.get("triton") == version)}
    added = 0
    for path in paths or (os.path.join(DEFAULTS_DIR, name), os.path.join(tuning_dir(), name)):
        if os.path.isfile(path):
            with open(path) as f:
                table = json.load(f)
            if not isinstance(table, dict):
                raise ValueError(f"{path}: expected a tuning table (a JSON object), got {type(table).__name__}")
            for field, want in (("gpu", gpu), ("triton", version)):
                if table.get(field, want) != want:
                    raise ValueError(f"{path}: table is for {field} {table[field]!r}, this process runs {want!r}")
            choices = variant_choice.validate_choices(table.get("choices", []), path)  # before anything is used
            added += tuning_cache.import_table(tuner, table.get("entries", []),
                                               allowed=lambda c: denylist.config_tuple(c) not in denied)
            added += variant_choice.import_choices([{"key": k, "choice": v} for k, v in choices.items()], path)
    return added


def save_tuning(device=None, path: str | None = None) -> str | None:
    """Write the autotuner's table and the kernel-family choices for this GPU + triton (merged with what the
    file held); returns the path."""
    tuner = _gemm_autotuner()
    if tuner is None or not torch.cuda.is_available():
        return None
    from fusedconv.kernels import tuning_cache, variant_choice

    gpu, version = _context(device)
    path = path or os.path.join(tuning_dir(), table_name(gpu, version))
    entries, choices = {}, {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        entries = {json.dumps(e["key"]): e for e in old.get("entries", [])}
        choices = variant_choice.validate_choices(old.get("choices", []), path)
    for e in tuning_cache.export_table(tuner):
        entries[json.dumps(e["key"])] = e
    choices.update({e["key"]: e["choice"] for e in variant_choice.export_choices()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"gpu": gpu, "triton": version, "kernel": "conv_gemm", "entries": list(entries.values()),
                   "choices": [{"key": k, "choice": v} for k, v in sorted(choices.items())]}, f, indent=0)
    os.replace(path + ".tmp", path)
    return path


def _as_call(example) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def _signature(value):
    if isinstance(value, torch.Tensor):
        fmt = "cl" if value.dim() == 4 and not value.is_contiguous() and \
            value.is_contiguous(memory_format=torch.channels_last) else "std"
        return ("T", tuple(value.shape), value.dtype, str(value.device), fmt)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return ("V", repr(value))


def warmup(model: nn.Module, *example_inputs, persist: bool = True) -> nn.Module:
    """Run `model` once per distinct input signature under no_grad so every kernel autotunes now.

    See the module docstring for how examples map to calls. With `persist` (default) on CUDA, the tuned table
    for this GPU is loaded first and saved after (an unwritable cache directory is ignored). Returns `model`
    (unchanged) for chaining.
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model: expected an nn.Module or a callable, got {type(model).__name__}")
    if not example_inputs:
        raise ValueError("example_inputs: expected at least one example input (a tensor, a tuple of arguments "
                         "or a dict of keyword arguments), got none")
    seen = set()
    devices = set()
    cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for example in example_inputs
               for v in _tensors(example))
    if persist and cuda:
        load_tuning()
    # Its forwards are the tuner's, not the user's: the user's random generators are left as found.
    with torch.no_grad(), kept_random_states():
        for example in example_inputs:
            args, kwargs = _as_call(example)
            key = (_signature(args), _signature(kwargs))
            if key in seen:
                continue
            seen.add(key)
            for value in list(args) + list(kwargs.values()):
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    devices.add(value.device)
            model(*args, **kwargs)
    for device in devices:
        torch.cuda.synchronize(device)
    if persist and devices:
        try:
            save_tuning()
        except OSError:  # a read-only home directory must not break inference
            pass
    return model


def _tensors(example):
    args, kwargs = _as_call(example)
    return [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
