"""Configs known to compute wrong results on a given GPU with a given triton version: never autotuned there.

Triton has miscompiled conv-like loops for some tile / warp combinations before (e.g. flattened-K loops with
8 warps), and a wrong config the autotuner happens to find fastest would make a model silently wrong. The GPU
check (`python -m bench --gpu-check`) runs every candidate config against a float64 reference and records the
ones that fail in `denylist.json` beside this file (committed). `prune_configs` drops them for launches on a
matching device and triton version.

An entry: {"gpu": "NVIDIA H200", "triton": "3.6.0", "kernel": "gemm" (or "streamk", the pointer stream-K
kernel), "config": [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages] (the TMA kernels "tma1x1", "tmakxk" and
their stream-K forms "tma1x1_streamk", "tmakxk_streamk": every config value, `config_key`, so a TMA-store-epilogue
twin — its TMA_EPILOGUE=True an extra value — is denied apart from its pointer-store tile), optional "dtype"
("float16", ...) and "path" ("1x1", "flatk", "spatial") narrowing it, and the evidence ("layer", "error",
"date")}. A GPU name matches exactly (torch.cuda.get_device_name); a triton version matches exactly.
"""

from __future__ import annotations

import functools
import json
import os

DENYLIST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "denylist.json")


@functools.lru_cache(maxsize=None)
def _entries(path: str) -> tuple[dict, ...]:
    if not os.path.isfile(path):
        return ()
    with open(path) as f:
        data = json.load(f)
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON object with an 'entries' list")
    return tuple(entries)


def load(path: str = DENYLIST_PATH) -> list[dict]:
    """Every entry of the deny-list file (an empty list when there is no file)."""
    return list(_entries(path))


def denied(gpu: str, triton_version: str, kernel: str, dtype: str | None = None, path: str | None = None,
           deny_file: str = DENYLIST_PATH) -> frozenset[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples denied for this launch."""
    out = set()
    for e in _entries(deny_file):
        if e.get("gpu") != gpu or e.get("triton") != triton_version or e.get("kernel", "gemm") != kernel:
            continue
        if e.get("dtype") not in (None, dtype) or e.get("path") not in (None, path):
            continue
        out.add(tuple(int(v) for v in e["config"]))
    return frozenset(out)


def config_tuple(cfg) -> tuple[int, int, int, int, int]:
    """A triton.Config of the GEMM kernel as the deny-list's config key."""
    kw = cfg.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)


def add_entries(new: list[dict], deny_file: str = DENYLIST_PATH) -> int:
    """Merge `new` entries into the file (deduplicated on gpu, triton, kernel, config, dtype, path); returns how
    many were added."""
    entries = load(deny_file)
    key = lambda e: (e.get("gpu"), e.get("triton"), e.get("kernel", "gemm"), tuple(e["config"]), e.get("dtype"),
                     e.get("path"))
    have = {key(e) for e in entries}
    added = [e for e in new if key(e) not in have]
    if added:
        entries += added
        with open(deny_file + ".tmp", "w") as f:
            json.dump({"schema": 1, "entries": entries}, f, indent=1)
            f.write("\n")
        os.replace(deny_file + ".tmp", deny_file)
        _entries.cache_clear()
    return len(added)


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def launch_path(args: dict) -> str:
    """The GEMM kernel's loop variant for a launch's arguments: "1x1", "flatk" or "spatial"."""
    return "1x1" if args.get("IS_1X1") else ("flatk" if args.get("FLAT_K") else "spatial")


def config_key(cfg) -> tuple[int, ...]:
    """Any kernel's triton.Config as a deny-list key: its int kwargs in order, then num_warps, num_stages (the
    TMA kernels' entries use this form; the GEMM / stream-K kernels keep `config_tuple`)."""
    return (*(int(v) for v in cfg.kwargs.values()), cfg.num_warps, cfg.num_stages)


def drop_denied(configs, args: dict, *, gpu_name: str | None = None, deny_file: str = DENYLIST_PATH,
                kernel: str = "gemm", tensor=None, key=config_tuple):
    """`configs` without the ones denied for this launch's GPU, triton version, dtype and loop variant.

    Only CUDA launches are filtered (the interpreter runs one fixed config). Raises when every config is denied
    rather than run a known-wrong kernel.
    """
    x = args.get("x_ptr") if tensor is None else tensor
    if not getattr(x, "is_cuda", False) or not _entries(deny_file):
        return configs  # nothing to drop: no GPU name lookup (fake CUDA tensors during tracing have no device)
    import triton

    if gpu_name is None:
        try:
            gpu_name = _gpu_name(x.device.index if x.device.index is not None else 0)
        except (RuntimeError, AssertionError):  # no driver: nothing can launch here anyway
            return configs
    deny = denied(gpu_name, triton.__version__, kernel, str(x.dtype).replace("torch.", ""), launch_path(args),
                  deny_file)
    if not deny:
        return configs
    kept = [c for c in configs if key(c) not in deny]
    if not kept:
        raise RuntimeError(f"every autotune config of this conv is on the deny-list ({deny_file}) for this GPU "
                           f"and triton {triton.__version__}: no config is known to compute it correctly")
    return kept
