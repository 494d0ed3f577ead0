"""Tuning that survives (kernels/tuning_cache.py, fusedconv/tuning.py): M buckets in the autotuner's cache, the
tuned table's JSON round trip, and the autotuner the launcher builds using the bucketed cache."""

from __future__ import annotations

import importlib
import json
import types

import pytest

triton = pytest.importorskip("triton")

from fusedconv import tuning  # noqa: E402
from fusedconv.kernels import configs as kconfigs  # noqa: E402
from fusedconv.kernels import tuning_cache  # noqa: E402


def test_m_bucket_is_next_power_of_two():
    assert [tuning_cache.m_bucket(m) for m in (1, 2, 3, 49, 64, 65, 100352)] == [1, 2, 4, 64, 64, 128, 131072]


def test_bucketed_cache_shares_one_entry_per_bucket():
    cache = tuning_cache.BucketedCache(0)
    cfg = object()
    cache[(3136, 64, "torch.float16")] = cfg  # batch 1 of a 56x56 layer
    assert (4096, 64, "torch.float16") in cache and cache[(2500, 64, "torch.float16")] is cfg
    assert cache.get((4097, 64, "torch.float16")) is None  # the next bucket is tuned on its own
    assert (3136, 128, "torch.float16") not in cache  # other key entries still count
    assert list(cache) == [(4096, 64, "torch.float16")]


def test_launcher_autotuner_uses_buckets():
    mod = importlib.import_module("fusedconv.kernels.conv_bn_act")
    if mod.interpreting():
        pytest.skip("the autotuner is only built for real kernels")
    tuner = mod._get_autotuned_kernel()
    assert isinstance(tuner.cache, tuning_cache.BucketedCache)
    assert tuner.cache.m_index == kconfigs.AUTOTUNE_KEY.index("M")


def test_table_round_trip_and_deny_filter(tmp_path):
    source = types.SimpleNamespace(cache=tuning_cache.BucketedCache(0))
    a, b = kconfigs.autotune_configs(2)[:2]
    source.cache[(100352, 64, True, "torch.float16")] = a
    source.cache[(49, 512, False, "torch.bfloat16")] = b
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"entries": tuning_cache.export_table(source)}))
    target = types.SimpleNamespace(cache=tuning_cache.BucketedCache(0))
    entries = json.loads(path.read_text())["entries"]
    denied = {(b.kwargs["BLOCK_M"], b.kwargs["BLOCK_N"], b.kwargs["BLOCK_K"], b.num_warps, b.num_stages)}
    from fusedconv.kernels import denylist

    assert tuning_cache.import_table(target, entries, allowed=lambda c: denylist.config_tuple(c) not in denied) == 1
    got = target.cache[(100000, 64, True, "torch.float16")]  # same bucket as 100352
    assert (got.kwargs, got.num_warps, got.num_stages) == (a.kwargs, a.num_warps, a.num_stages)
    assert (49, 512, False, "torch.bfloat16") not in target.cache


def test_table_name_and_dir(monkeypatch, tmp_path):
    assert tuning.table_name("NVIDIA H200", "3.6.0") == "nvidia-h200--triton-3.6.0.json"
    monkeypatch.setenv("FUSEDCONV_TUNING_DIR", str(tmp_path))
    assert tuning.tuning_dir() == str(tmp_path)
