"""Which schedule a conv GEMM launches with — data-parallel tiles, split-K or stream-K — from a cost model.

The schedule is a launch decision, not an autotuned one: split-K needs a workspace and a second kernel,
stream-K another kernel with a workspace and tile counters, so the launcher fixes it per shape and SM count
before the autotuner (whose key includes it) picks tiles.

The model (an H100-class part; only ratios matter): programs of a tile shape run in waves on `num_sms` SMs,
each at the per-SM share of the fp16 dense tensor-core rate times the tile shape's efficiency (smaller tiles
re-read more operands per FLOP and issue more instructions per MMA).

* Data-parallel / split-K (`estimate_time`): ceil(tiles * split / num_sms) waves of programs that each run
  ceil(k_iters / split) K steps; a split adds the fp32 workspace round trip through HBM (written once, read
  once by the epilogue kernel) and the epilogue launch.
* Stream-K (`estimate_streamk_time`, kernel in conv_streamk): every program runs ceil(tiles * k_iters /
  num_sms) K steps — no wave quantisation — and the program that completes a shared tile reads the other
  contributors' fp32 partial tiles from L2 on its critical path (k_iters / steps-per-program of them on
  average), at its per-SM share of the L2 bandwidth. Counters are self-resetting (no memset launch).

`choose_schedule` takes the fastest, and stream-K or a split only when it wins clearly (the model is coarse):
ResNet-50 stage 3/4 3x3 at batch 32 (0.74 / 0.39 waves of 128x128 tiles on 132 SMs) get stream-K; layers
whose tiles already fill whole waves stay data-parallel.
"""

from __future__ import annotations

_PEAK_FLOPS = 750e12
_HBM_BYTES_PER_S = 3e12
# L2 read bandwidth shared by all SMs (H100-class, measured figures are ~5.5-7 TB/s: the low end).
_L2_BYTES_PER_S = 5.5e12
_EPILOGUE_LAUNCH_S = 1.5e-6


def tile_efficiency(block_m: int, block_n: int) -> float:
    """Relative per-SM tensor-core rate of a BLOCK_M x BLOCK_N tile: its operand intensity (FLOP per byte of
    A and B fed to the MMAs, BM·BN / (BM + BN)) against a 128x128 tile's, to the power 0.7 (fits the usual
    Hopper GEMM picture: 64x128 ~0.75, 64x64 ~0.6, 128x128 and larger 1.0)."""
    return min(1.0, (block_m * block_n / (block_m + block_n)) / 64.0) ** 0.7


_TILE_EFFICIENCY = tuple((bm, bn, tile_efficiency(bm, bn)) for bm, bn in ((128, 128), (64, 128), (64, 64)))
_SPLITS = (1, 2, 4, 8, 16)
# A schedule other than plain data-parallel must beat it by this factor to be chosen.
_CLEAR_WIN = 0.95
#: Largest stream-K tile (BLOCK_M * BLOCK_N): sizes the per-program workspace slots.
STREAMK_MAX_TILE = 128 * 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def estimate_time(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int, split: int,
                  block_k: int = 64) -> tuple[float, tuple[int, int]]:
    """Modelled seconds of a data-parallel conv GEMM with `split` K slices, and the tile that achieves it."""
    per_sm = _PEAK_FLOPS / max(num_sms, 1)
    best = (float("inf"), (128, 128))
    for bm, bn, eff in _TILE_EFFICIENCY:
        tiles = _cdiv(m, bm) * _cdiv(cout_g, bn) * groups * split
        waves = _cdiv(tiles, max(num_sms, 1))
        t = waves * (2.0 * bm * bn * block_k * _cdiv(k_iters, split)) / (per_sm * eff)
        if split > 1:
            t += 2.0 * split * m * cout_g * groups * 4 / _HBM_BYTES_PER_S + _EPILOGUE_LAUNCH_S
        if t < best[0]:
            best = (t, (bm, bn))
    return best


def estimate_streamk_time(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int,
                          block_k: int = 64) -> tuple[float, tuple[int, int]]:
    """Modelled seconds of the stream-K schedule on `num_sms` programs, and the tile that achieves it."""
    per_sm = _PEAK_FLOPS / max(num_sms, 1)
    l2_per_sm = _L2_BYTES_PER_S / max(num_sms, 1)
    best = (float("inf"), (128, 128))
    for bm, bn, eff in _TILE_EFFICIENCY:
        tiles = _cdiv(m, bm) * _cdiv(cout_g, bn) * groups
        per_prog = _cdiv(tiles * k_iters, max(num_sms, 1))
        t = per_prog * (2.0 * bm * bn * block_k) / (per_sm * eff)
        if per_prog % k_iters:  # some tiles are shared: the completing program reads the others' partials
            t += (k_iters / per_prog) * bm * bn * 4 / l2_per_sm
        if t < best[0]:
            best = (t, (bm, bn))
    return best


def choose_split_k(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int) -> int:
    """Number of K slices of the data-parallel kernel: the power of two (1..16) with the lowest
    `estimate_time` on `num_sms` SMs.

    Deterministic (a function of the shape and the SM count only; the epilogue sums slices in a fixed order).
    A split only counts when each slice keeps at least 4 K iterations, so the pipeline still has work.
    """
    if m <= 0 or cout_g <= 0 or num_sms <= 0 or k_iters < 8:
        return 1
    best_split, best_time = 1, estimate_time(m, cout_g, groups, k_iters, num_sms, 1)[0]
    for split in _SPLITS[1:]:
        if k_iters // split < 4:
            break
        t = estimate_time(m, cout_g, groups, k_iters, num_sms, split)[0]
        if t < best_time * _CLEAR_WIN:  # a split must win clearly: the model is coarse
            best_split, best_time = split, t
    return best_split


def choose_schedule(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int) -> tuple[str, int]:
    """("stream_k", num_sms) or ("split_k", slices) — slices 1 is the plain data-parallel grid.

    Stream-K when its modelled time beats the best split-K choice clearly; it needs at least 4 K steps per
    tile (a shorter K is memory-bound: spreading it buys nothing) and a GPU (num_sms > 0).
    """
    split = choose_split_k(m, cout_g, groups, k_iters, num_sms)
    if m <= 0 or cout_g <= 0 or num_sms <= 0 or k_iters < 4:
        return "split_k", split
    t_split = estimate_time(m, cout_g, groups, k_iters, num_sms, split)[0]
    if estimate_streamk_time(m, cout_g, groups, k_iters, num_sms)[0] < t_split * _CLEAR_WIN:
        return "stream_k", num_sms
    return "split_k", split
