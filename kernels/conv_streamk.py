"""Stream-K schedule of the implicit-GEMM conv: a fixed grid of programs shares every tile's K iterations.

Why: a layer with fewer output tiles than SMs (ResNet-50 stage 3/4 3x3 at batch 32: 98 / 52 tiles of 128x128
on 132 SMs) leaves SMs idle for its whole run in the one-program-per-tile grid, and split-K only helps when the
split count happens to round the tile count up to whole waves. Stream-K flattens all tiles' K iterations into
one range (tile-major: tile t owns iterations [t * K_TILE, (t + 1) * K_TILE)) and gives each of the P
programs (P = the SM count) a balanced contiguous slice — floor(total / P) iterations, the first total % P
programs one more — so every SM runs the same number of MMA steps, give or take one.

A program walks the tiles its slice touches. A tile it covers whole ends in the fused epilogue at once. A tile
shared with other programs: each contributor stores its fp32 partial tile into its own workspace slot (slot 0
for the segment that starts its slice, slot 1 for the one that ends it — a program touches at most one shared
tile at each end), then adds its iteration count to the tile's counter with an acq_rel atomic. The contributor
that completes the count sums every contributor's partial in program order — fixed, so the result does not
depend on which program arrived last — and runs the epilogue. Nobody waits on anybody (no spin loops): the
schedule needs no co-residency and runs unchanged in Triton's sequential CPU interpreter. The completing
program resets the counter to 0, so a counter buffer is clean again after every launch (the autotuner reruns
a launch with the same arguments).

Workspace: [P * 2, WS_TILE] fp32 (WS_TILE: the largest tile the autotuner may run for the launch — the
launcher prunes the configs as the autotuner does — a constexpr the kernel checks its tile against at compile
time); counters: one int32 per
tile of the smallest stream-K tile. Both are small and L2-resident on the layers this schedule is chosen for
(see configs.choose_schedule).

The slice split (`streamk_slice`), the partial-tile fix-up (`streamk_fixup`) and the host-side buffers
(`tile_counters`, `partial_workspace`) are shared with the TMA-descriptor stream-K kernels (`conv_tma_streamk`),
which differ only in how a tile's K range is loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedconv.kernels.conv_gemm import gemm_tile, k_iterations
from fusedconv.kernels.epilogue import _tracing, epilogue_store


@triton.jit
def _conv_streamk_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, ws_ptr, count_ptr,
    N, H, W, OH, OW, M, CIN_G, COUT_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM, GROUPS,
    KH: tl.constexpr, KW: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    IS_1X1: tl.constexpr, ROW_K: tl.constexpr, ROW_WIDTH: tl.constexpr, FLAT_K: tl.constexpr,
    EVEN_K: tl.constexpr, CH_ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WS_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A workspace slot holds WS_TILE fp32 values (the launcher's allocation): a larger tile cannot compile.
    tl.static_assert(BLOCK_M * BLOCK_N <= WS_TILE)
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    if CH_ALIGN > 1:
        # As in conv_gemm._conv_gemm_kernel: restate 8-aligned channel counts / strides for vector loads.
        CIN_G = (CIN_G // CH_ALIGN) * CH_ALIGN
        COUT_G = (COUT_G // CH_ALIGN) * CH_ALIGN
        sxn = (sxn // CH_ALIGN) * CH_ALIGN
        sxh = (sxh // CH_ALIGN) * CH_ALIGN
        sxw = (sxw // CH_ALIGN) * CH_ALIGN
        swi = (swi // CH_ALIGN) * CH_ALIGN
        swh = (swh // CH_ALIGN) * CH_ALIGN
        sww = (sww // CH_ALIGN) * CH_ALIGN
        syn = (syn // CH_ALIGN) * CH_ALIGN
        syh = (syh // CH_ALIGN) * CH_ALIGN
        syw = (syw // CH_ALIGN) * CH_ALIGN
        srn = (srn // CH_ALIGN) * CH_ALIGN
        srh = (srh // CH_ALIGN) * CH_ALIGN
        srw = (srw // CH_ALIGN) * CH_ALIGN

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    tiles_per_group = num_pid_m * num_pid_n
    k_tile = k_iterations(CIN_G, KH, KW, IS_1X1, ROW_K, FLAT_K, BLOCK_K)
    base, extra, start, end, t_lo, t_hi = streamk_slice(tiles_per_group * GROUPS * k_tile, k_tile, pid, num_progs)

    # Tiles this program's slice touches (an empty range when the slice is empty).
    for t in range(t_lo, t_hi):
        tile_lo = t * k_tile
        k_lo = tl.maximum(start, tile_lo) - tile_lo
        k_hi = tl.minimum(end, tile_lo + k_tile) - tile_lo
        g = t // tiles_per_group
        r = t - g * tiles_per_group
        pid_m = r // num_pid_n
        pid_n = r - pid_m * num_pid_n
        acc, offs_m, n_idx, oh_idx, ow_idx, co, mask_n, mask_mn = gemm_tile(
            pid_m, pid_n, g, k_lo, k_hi, x_ptr, w_ptr, H, W, OH, OW, M, CIN_G, COUT_G,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sxn, sxc, sxh, sxw, swo, swi, swh, sww,
            KH, KW, IS_1X1, ROW_K, ROW_WIDTH, FLAT_K, EVEN_K, USE_INT64, INPUT_PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_K)
        res_rows = n_idx * srn + oh_idx * srh + ow_idx * srw
        y_rows = n_idx * syn + oh_idx * syh + ow_idx * syw
        acc, finish = streamk_fixup(acc, t, tile_lo, k_lo, k_hi, k_tile, start, base, extra, pid, ws_ptr, count_ptr,
                                    WS_TILE, BLOCK_M, BLOCK_N)
        if finish:  # the tile's full K sum is in acc: one epilogue site for whole and completed shared tiles
            epilogue_store(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, res_rows, y_rows, co, src, syc, mask_n,
                           mask_mn, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)


@triton.jit
def streamk_slice(total, k_tile, pid, num_progs):
    """(base, extra, start, end, t_lo, t_hi): program `pid`'s contiguous share [start, end) of `total` flattened
    (tile-major, `k_tile` per tile) K iterations and the tiles [t_lo, t_hi) it touches.

    Balanced: every program gets `base` = total // num_progs iterations and the first `extra` = total % num_progs
    one more, so no program runs a step more than ceil(total / num_progs) and, unlike equal slices of that
    ceiling, none is left short or idle while others work (with more programs than iterations the last ones
    get none: an empty tile range). Computed once per program, outside every K loop."""
    base = total // num_progs
    extra = total - base * num_progs
    start = pid * base + tl.minimum(pid, extra)
    end = start + base + (pid < extra).to(tl.int32)
    t_lo = start // k_tile
    t_hi = tl.where(end > start, (end + k_tile - 1) // k_tile, t_lo)
    return base, extra, start, end, t_lo, t_hi


@triton.jit
def streamk_owner(unit, base, extra):
    """The program whose `streamk_slice` holds flattened iteration `unit` (the first `extra` slices have
    base + 1 iterations, the rest base)."""
    long_end = extra * (base + 1)
    in_long = unit < long_end
    # one runtime division, not one per branch (tl.where evaluates both)
    return tl.where(in_long, 0, extra) + (unit - tl.where(in_long, 0, long_end)) // tl.where(
        in_long, base + 1, tl.maximum(base, 1))


@triton.jit
def streamk_fixup(acc, t, tile_lo, k_lo, k_hi, k_tile, start, base, extra, pid, ws_ptr, count_ptr,
                  WS_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(acc, finish) for tile t after this program's K iterations [k_lo, k_hi) of it (of k_tile).

    A tile covered whole finishes at once. A shared tile's partial goes to this program's workspace slot and
    its iteration count to the tile's counter; the contributor that completes the count sums every
    contributor's partial in program order, resets the counter and finishes (acc then holds the full sum).
    Every stream-K kernel (pointer gathers or TMA loads) ends its per-tile K range with this."""
    finish = (k_lo == 0) & (k_hi == k_tile)
    if not finish:
        # The segment that starts this program's slice goes to slot 0, the one that ends it to slot 1.
        slot = 2 * pid + (tile_lo + k_lo != start).to(tl.int32)
        # Built here, not before the tile loop: a BLOCK_M x BLOCK_N index tensor live across the K loop
        # costs a register per accumulator element.
        tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(ws_ptr + slot * WS_TILE + tile_offs, acc)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        done = tl.atomic_add(count_ptr + t, k_hi - k_lo, sem="acq_rel")
        tl.debug_barrier()
        finish = done + (k_hi - k_lo) == k_tile
        if finish:
            # Last contributor: sum all contributors' partials in program order (deterministic), then
            # reset the counter for the next launch.
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # num_stages=1: a software-pipelined prefetch of whole fp32 tiles would only add registers.
            # (`base`, `extra`: the slice split of `streamk_slice`; contributor c's slice starts at
            # c * base + min(c, extra), and its end segment is in slot 1 when that lies before this tile.)
            c_first = streamk_owner(tile_lo, base, extra)
            c_last = streamk_owner(tile_lo + k_tile - 1, base, extra)
            for c in tl.range(c_first, c_last + 1, num_stages=1):
                c_slot = 2 * c + (c * base + tl.minimum(c, extra) < tile_lo).to(tl.int32)
                acc += tl.load(ws_ptr + c_slot * WS_TILE + tile_offs, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + t, 0, sem="relaxed")
    return acc, finish


# --------------------------------------------------------------------------------------------- host side
# Self-resetting tile counters, one zeroed buffer per (device, stream): launches on one stream run in order,
# and each launch leaves its counters at 0 again.
_tile_counters: dict = {}


def tile_counters(device, numel: int) -> torch.Tensor:
    """An int32 buffer of at least `numel` zeros for a stream-K launch's tile counters (cached per stream on
    CUDA; fresh while tracing or capturing a CUDA graph, where no memory may be cached)."""
    if device.type != "cuda" or _tracing():
        return torch.zeros(numel, dtype=torch.int32, device=device)
    if torch.cuda.is_current_stream_capturing():
        # Never cache memory from a graph's private pool; the capture records a memset instead.
        return torch.zeros(numel, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    buf = _tile_counters.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(max(numel, 1024), dtype=torch.int32, device=device)
        _tile_counters[key] = buf
    return buf


def partial_workspace(programs: int, ws_tile: int, device) -> torch.Tensor:
    """The fp32 partial-tile slots of a stream-K launch: two per program (the shared tile at each end of
    its slice), `ws_tile` values each (the kernel's WS_TILE)."""
    return torch.empty((2 * programs, ws_tile), dtype=torch.float32, device=device)
