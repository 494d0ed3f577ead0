"""The deny-list of miscompiled configs (kernels/denylist.py): matching by GPU, triton version, dtype and loop
variant, the pruning filter, merging new entries, and the committed file's format."""

from __future__ import annotations

import json

import pytest
import torch

triton = pytest.importorskip("triton")

from fusedconv.kernels import configs as kconfigs  # noqa: E402
from fusedconv.kernels import denylist  # noqa: E402


class _CudaLike:
    """Stands in for a CUDA tensor argument (no GPU here): what drop_denied reads of x_ptr."""

    is_cuda = True
    dtype = torch.float16
    device = torch.device("cuda", 0)


def _entry(config, **extra):
    return {"gpu": "NVIDIA H200", "triton": triton.__version__, "kernel": "gemm", "config": list(config), **extra}


def test_denied_matches_gpu_triton_dtype_and_path(tmp_path):
    path = str(tmp_path / "deny.json")
    assert denylist.add_entries([_entry((128, 128, 64, 8, 4), path="flatk"),
                                 _entry((64, 64, 64, 4, 4), dtype="bfloat16"),
                                 dict(_entry((16, 64, 64, 4, 4)), triton="0.0.1")], path) == 3
    assert denylist.add_entries([_entry((128, 128, 64, 8, 4), path="flatk")], path) == 0  # duplicate
    got = denylist.denied("NVIDIA H200", triton.__version__, "gemm", "float16", "flatk", path)
    assert got == {(128, 128, 64, 8, 4)}
    assert denylist.denied("NVIDIA H200", triton.__version__, "gemm", "bfloat16", "spatial", path) == {
        (64, 64, 64, 4, 4)}
    assert not denylist.denied("NVIDIA H100 80GB HBM3", triton.__version__, "gemm", "float16", "flatk", path)


def test_drop_denied_filters_cuda_launches_only(tmp_path):
    path = str(tmp_path / "deny.json")
    configs = kconfigs.autotune_configs(2)
    victim = configs[2]
    denylist.add_entries([_entry(denylist.config_tuple(victim), path="spatial")], path)
    args = {"x_ptr": _CudaLike(), "IS_1X1": False, "FLAT_K": False}
    kept = denylist.drop_denied(configs, args, gpu_name="NVIDIA H200", deny_file=path)
    assert victim not in kept and len(kept) == len(configs) - 1
    one_by_one = denylist.drop_denied(configs, dict(args, IS_1X1=True), gpu_name="NVIDIA H200", deny_file=path)
    assert len(one_by_one) == len(configs)  # the entry names the spatial loop only
    cpu_args = {"x_ptr": torch.empty(0, dtype=torch.float16)}
    assert denylist.drop_denied(configs, cpu_args, gpu_name="NVIDIA H200", deny_file=path) == configs


def test_everything_denied_is_an_error_not_a_wrong_kernel(tmp_path):
    path = str(tmp_path / "deny.json")
    configs = kconfigs.autotune_configs(2)[:2]
    denylist.add_entries([_entry(denylist.config_tuple(c)) for c in configs], path)
    with pytest.raises(RuntimeError, match="deny-list"):
        denylist.drop_denied(configs, {"x_ptr": _CudaLike()}, gpu_name="NVIDIA H200", deny_file=path)


def _keys_the_kernel_could_run(kernel: str) -> set:
    """Deny-list keys of every config a kernel has (before any pruning): what an entry must be one of."""
    from fusedconv.kernels import conv_tma, conv_tma_kxk

    if kernel in ("gemm", "streamk"):  # the GEMM / pointer stream-K kernels: config_tuple's 5 values
        return {tuple(denylist.config_tuple(c)) for c in kconfigs.autotune_configs(2) + kconfigs.autotune_configs(4)}
    if kernel == "tma1x1":  # data-parallel configs, their TMA-store twins and the persistent configs
        return {tuple(denylist.config_key(c)) for c in conv_tma.all_configs()}
    table = {"tma1x1_streamk": conv_tma.tma_configs, "tmakxk": conv_tma_kxk.dp_configs,
             "tmakxk_streamk": conv_tma_kxk.kxk_configs}[kernel]
    return {tuple(denylist.config_key(c)) for c in table(2) + table(4)}


def test_committed_denylist_is_well_formed():
    """Every committed entry names a GPU, a triton version, a kernel and a config that kernel has (TMA kernels
    key configs by config_key: 6-9 values; the GEMM kernels by config_tuple: 5), so none silently matches
    nothing."""
    with open(denylist.DENYLIST_PATH) as f:
        data = json.load(f)
    assert isinstance(data["entries"], list)
    for e in data["entries"]:
        assert {"gpu", "triton", "config"} <= set(e), e
        assert tuple(e["config"]) in _keys_the_kernel_could_run(e.get("kernel", "gemm")), e


def test_empty_denylist_needs_no_device(tmp_path):
    """With nothing denied, pruning never asks for the GPU name (torch.compile traces with fake CUDA tensors)."""
    configs = kconfigs.autotune_configs(2)
    path = str(tmp_path / "missing.json")
    assert denylist.drop_denied(configs, {"x_ptr": _CudaLike()}, deny_file=path) == configs
