"""Autotune results that survive: M bucketed to powers of two, and the tuned table exported / imported as JSON.

Triton's autotuner keeps its choices in `autotuner.cache`, a dict from the key tuple (the values of the `key`
arguments, then the dtypes of the tensor arguments) to a `triton.Config`. Two small changes, both from outside
the kernel:

- `bucket_m(autotuner, key_names)` replaces that dict by one that files every key under its M bucket (the next
  power of two). A new batch size then reuses the config tuned for its bucket instead of benchmarking every
  config again — which inside a CUDA-graph capture would fail. Any config is correct for any M (pruning caps
  tiles by the same power of two), so only speed can differ within a bucket.
- `export_table(autotuner)` / `import_table(autotuner, entries)` turn the cache into JSON-able entries and
  back, so `fusedconv.tuning` can persist it per GPU and triton version.
"""

from __future__ import annotations


def m_bucket(m: int) -> int:
    """The power of two >= m (M = N*OH*OW output rows); 0 stays 0."""
    m = int(m)
    return 0 if m <= 0 else 1 << (m - 1).bit_length()


class BucketedCache(dict):
    """A dict whose tuple keys are stored with the entry at `m_index` replaced by its M bucket."""

    def __init__(self, m_index: int, *args, **kwargs):
        super().__init__()
        self.m_index = m_index
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def _norm(self, key):
        if isinstance(key, tuple) and len(key) > self.m_index and isinstance(key[self.m_index], int) \
                and not isinstance(key[self.m_index], bool):
            return key[:self.m_index] + (m_bucket(key[self.m_index]),) + key[self.m_index + 1:]
        return key

    def __contains__(self, key):
        return super().__contains__(self._norm(key))

    def __getitem__(self, key):
        return super().__getitem__(self._norm(key))

    def __setitem__(self, key, value):
        super().__setitem__(self._norm(key), value)

    def get(self, key, default=None):
        return super().get(self._norm(key), default)


def bucket_m(autotuner, key_names) -> None:
    """Make `autotuner` share one tuned config per power-of-two bucket of its "M" key argument."""
    if "M" not in key_names:
        raise ValueError(f"key_names: expected an 'M' entry, got {list(key_names)}")
    if not isinstance(autotuner.cache, BucketedCache):
        autotuner.cache = BucketedCache(list(key_names).index("M"), autotuner.cache)


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value):
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def export_table(autotuner) -> list[dict]:
    """[{"key": [...], "config": {"kwargs", "num_warps", "num_stages"}}] for every tuned key."""
    out = []
    for key, cfg in dict(autotuner.cache).items():
        out.append({"key": _jsonable(key), "config": {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps,
                                                      "num_stages": cfg.num_stages}})
    return out


def import_table(autotuner, entries, allowed=None) -> int:
    """Fill `autotuner.cache` from `export_table` entries (keys already tuned here are kept); returns how many
    were added. `allowed(config) -> bool` can reject entries (e.g. configs on the deny-list)."""
    import triton

    added = 0
    for e in entries:
        key = _tupled(e["key"])
        if key in autotuner.cache:
            continue
        c = e["config"]
        cfg = triton.Config(dict(c["kwargs"]), num_warps=int(c["num_warps"]), num_stages=int(c["num_stages"]))
        if allowed is not None and not allowed(cfg):
            continue
        autotuner.cache[key] = cfg
        added += 1
    return added
