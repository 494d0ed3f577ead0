"""The K loops of the implicit-GEMM conv kernels (`conv_gemm.gemm_tile`), one @triton.jit helper each.

Each helper takes the fp32 accumulator of one BLOCK_M x BLOCK_N output tile, runs the K iterations
[k_start, k_end) of its loop shape and returns the accumulator. The kernel picks one by constexpr flags:

* `k_loop_1x1`: 1x1 kernel without padding, a plain GEMM over strided rows; K is the channels.
* `k_loop_taps`: every other conv with Cin_g >= 16. One flattened loop over (kh, kw) taps x channel chunks of
  BLOCK_K (one long loop for the software pipeliner). The tap and chunk are carried counters, advanced by
  scalar selects, so the loop has no integer division; the spatial bounds of all taps are tested once before
  the loop into a per-row bit set (bit t: tap t reads inside the image), so a tap's row mask is one AND.
* `k_loop_rows`: Cin_g < 16 with KW * Cin_g <= 64 (the RGB stems: 7 x 3 = 21, 3 x 3 = 9). One K step covers
  as many whole kernel rows as fit 32 columns (`row_k_rows`; ROW_WIDTH pads them to a power of two >= 16):
  one row of the 7x7 stem (21 of 32), the whole 3x3 stem kernel (27 of 32) in one step. The per-column
  decomposition (r, kw, c) of j and the width masks are loop-invariant and computed once, and every
  element's bounds for every step are one bit set, so an iteration adds a scalar row offset and tests a bit.
* `k_loop_flat`: the remaining small-Cin_g convs (KW * Cin_g > 64): K chunks over the flattened (kh, kw, c)
  index, decomposed per iteration (rare shapes; kept general).

Why the bounds are tested as they are: a padded conv reads outside the image at the border; those reads are
masked to zero, which is exactly zero padding.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def k_loop_1x1(acc, a_rows, w_cols, mask_m, mask_n, offs_k, k_start, k_end, CIN_G, sxc, swi,
               EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """1x1 conv: rows are fixed input pixels (no padding, always in bounds); K is channels only."""
    for it in range(k_start, k_end):
        c = it * BLOCK_K + offs_k
        a_ptrs = a_rows[:, None] + c[None, :] * sxc
        b_ptrs = w_cols[None, :] + c[:, None] * swi
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (c[None, :] < CIN_G), other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :] & (c[:, None] < CIN_G), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def k_loop_taps(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, offs_k, k_start, k_end, H, W, CIN_G,
                dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww,
                KH: tl.constexpr, KW: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Spatial conv, Cin_g >= 16: (kh, kw, channel-chunk) iterations with carried counters."""
    k_chunks = tl.cdiv(CIN_G, BLOCK_K)
    # Per-row bit set of the taps that read inside the image (rows past M: none). Up to 32 taps fit an int32,
    # up to 64 an int64; larger kernels test the bounds per iteration instead.
    USE_BITS: tl.constexpr = KH * KW <= 64
    BITS_TYPE: tl.constexpr = tl.int32 if KH * KW <= 32 else tl.int64
    if USE_BITS:
        tap_ok = tl.zeros([BLOCK_M], dtype=BITS_TYPE)
        for t in tl.static_range(KH * KW):
            ih = ih0 + (t // KW) * dil_h
            iw = iw0 + (t % KW) * dil_w
            inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            tap_ok = tap_ok | (inside.to(BITS_TYPE) << t)
    # The loop's first position (split-K slices start mid-way): the only division, once per program.
    tap = k_start // k_chunks
    c_off = (k_start - tap * k_chunks) * BLOCK_K
    kh = tap // KW
    kw = tap - kh * KW
    dh = kh * dil_h
    dw = kw * dil_w
    x_tap = dh * sxh + dw * sxw  # offset of this tap's input pixel from the row's (ih0, iw0)
    w_tap = kh * swh + kw * sww
    tap_bit = (tap * 0 + 1).to(BITS_TYPE) << tap.to(BITS_TYPE)
    # Loop-invariant 2-D pointer tiles at tap (0, 0), channel 0. An iteration adds one carried scalar offset
    # to each (a_off, b_off: this tap's offset plus the chunk's channels), so every vector of a tile costs one
    # wide add instead of re-deriving row + tap + channel per element.
    a_rows = x_rows + ih0 * sxh + iw0 * sxw
    a_base = a_rows[:, None] + offs_k[None, :] * sxc
    # A 128x128 tile at 4 warps has no registers left for the pointer tiles (it spilled 16-24 B): there A and B
    # are re-derived per iteration from the row / column pointers and the chunk's channels, as before.
    B_TILE: tl.constexpr = BLOCK_M * BLOCK_N < 128 * 128
    b_base = w_cols[None, :] + offs_k[:, None] * swi
    a_off = x_tap + c_off * sxc
    b_off = w_tap + c_off * swi
    # Offset steps. Within a tap: the next BLOCK_K channels. From a tap's last chunk (at span - BLOCK_K, span =
    # all its chunks) to the next tap in the kernel row, or to the first tap of the next kernel row: the tap
    # step minus the channels walked. Each is one select and one add per iteration.
    span = k_chunks * BLOCK_K
    a_chunk = BLOCK_K * sxc
    b_chunk = BLOCK_K * swi
    a_col_step = dil_w * sxw - (span - BLOCK_K) * sxc
    a_row_step = dil_h * sxh - (KW - 1) * dil_w * sxw - (span - BLOCK_K) * sxc
    b_col_step = sww - (span - BLOCK_K) * swi
    b_row_step = swh - (KW - 1) * sww - (span - BLOCK_K) * swi
    if USE_BITS and B_TILE:
        # Bits of the taps that end a kernel row: tap_bit against it says "row end" without a kw counter
        # (not for 128x128 tiles: with it their stream-K kernel spilled 8 B).
        row_end_bits = tl.zeros([1], dtype=BITS_TYPE).sum(0)
        for r in tl.static_range(KH):
            row_end_bits = row_end_bits | (row_end_bits * 0 + 1) << (r * KW + KW - 1)
    for _ in range(k_start, k_end):
        if USE_BITS:
            row_ok = (tap_ok & tap_bit) != 0
        else:
            ih = ih0 + dh
            iw = iw0 + dw
            row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if B_TILE:
            a_ptrs = a_base + a_off
            b_ptrs = b_base + b_off
        else:
            c = c_off + offs_k
            a_ptrs = (a_rows + (a_off - c_off * sxc))[:, None] + c[None, :] * sxc
            b_ptrs = (w_cols + (b_off - c_off * swi))[None, :] + c[:, None] * swi
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_ok = offs_k < CIN_G - c_off  # the chunk's channels that exist
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        # Advance (c-chunk, kw, kh) by scalar selects: no division, no branch in the loop.
        c_off += BLOCK_K
        next_tap = c_off >= CIN_G
        if USE_BITS and B_TILE:
            row_end = next_tap & ((tap_bit & row_end_bits) != 0)
        else:
            row_end = next_tap & (kw == KW - 1)
            kw = tl.where(next_tap, tl.where(row_end, 0, kw + 1), kw)
        c_off = tl.where(next_tap, 0, c_off)
        a_off += tl.where(next_tap, tl.where(row_end, a_row_step, a_col_step), a_chunk)
        b_off += tl.where(next_tap, tl.where(row_end, b_row_step, b_col_step), b_chunk)
        if USE_BITS:
            tap_bit = tl.where(next_tap, tap_bit << 1, tap_bit)
        else:
            dh += tl.where(row_end, dil_h, 0)
            dw = tl.where(next_tap, tl.where(row_end, 0, dw + dil_w), dw)
    return acc


@triton.jit
def row_k_rows(CIN_G, KH: tl.constexpr, KW: tl.constexpr):
    """Kernel rows one K step of the row-K loop covers: as many whole rows of KW * Cin_g as fit 32 columns,
    at least one, at most KH; the same rule as `configs.row_k_rows` on the host (which pads ROW_WIDTH to it).

    Why 32: the columns are gathered element by element, and a 64-wide step of the 7x7 stem (three rows)
    compiled to 298 loop instructions and 247 registers for no fewer instructions per tile than seven 32-wide
    steps at 140 and 128. A single kernel row wider than 32 keeps its own width (up to 64).
    """
    STEP_WIDTH: tl.constexpr = 32  # configs.ROW_K_MAX_WIDTH
    return tl.maximum(tl.minimum(STEP_WIDTH // (KW * CIN_G), KH), 1)


@triton.jit
def k_loop_rows(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, k_start, k_end, H, W, CIN_G,
                dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww,
                KH: tl.constexpr, KW: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_WIDTH: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Small Cin_g: one K step per group of `row_k_rows` kernel rows, covering all their (kh, kw, c)."""
    row_len = KW * CIN_G
    rows = row_k_rows(CIN_G, KH, KW)  # ROW_WIDTH >= rows * row_len (configs.row_width)
    # Column j of a step: kernel row j_r of the step's rows, then (kw, c). Decomposed once: loop-invariant.
    j = tl.arange(0, ROW_WIDTH)
    j_r = j // row_len
    j_rem = j - j_r * row_len
    j_kw = j_rem // CIN_G
    j_c = j_rem - j_kw * CIN_G
    j_ok = j < rows * row_len
    iw = iw0[:, None] + (j_kw * dil_w)[None, :]
    a_mask_w = mask_m[:, None] & j_ok[None, :] & (iw >= 0) & (iw < W)
    # Loop-invariant pointer tiles at kernel row 0: an iteration adds one scalar row offset to each.
    a_base = (x_rows + ih0 * sxh)[:, None] + (j_r * dil_h * sxh + j_c * sxc)[None, :] + iw * sxw
    b_cols = w_cols[None, :] + (j_r * swh + j_kw * sww + j_c * swi)[:, None]
    # The element gathers dominate this loop, so each element's mask for every step is precomputed into a
    # bit set (bit t: kernel row t of this element's column reads inside the image, and t < KH); an
    # iteration tests one bit per element instead of combining width and height bounds.
    USE_BITS: tl.constexpr = KH <= 31
    if USE_BITS:
        h_bits = tl.zeros([BLOCK_M], dtype=tl.int32)
        for t in tl.static_range(KH):
            ih_t = ih0 + t * dil_h
            h_bits = h_bits | (((ih_t >= 0) & (ih_t < H)).to(tl.int32) << t)
        a_bits = tl.where(a_mask_w, h_bits[:, None] >> j_r[None, :], 0)
        # The weight's rows: bit t of column j set while kernel row t + j_r exists (t + j_r < KH).
        b_bits = tl.where(j_ok, ((1 << KH) - 1) >> j_r, 0)
        step_bit = (k_start * 0 + 1) << (k_start * rows)
    # Carried scalar offsets of the step's first kernel row: no multiply per iteration.
    a_row = k_start * rows * dil_h * sxh
    b_row = k_start * rows * swh
    kh0 = k_start * rows
    for _ in range(k_start, k_end):
        if USE_BITS:
            a_mask = (a_bits & step_bit) != 0
            # The last step's rows past KH are outside the weight: masked (a zero A column would not cancel
            # a NaN read from past the weight).
            b_ok = (b_bits & step_bit) != 0
            step_bit = step_bit << rows
        else:
            ih = ih0[:, None] + ((kh0 + j_r) * dil_h)[None, :]
            a_mask = a_mask_w & (ih >= 0) & (ih < H) & ((kh0 + j_r) < KH)[None, :]
            b_ok = j_ok & (j_r < KH - kh0)
            kh0 += rows
        a = tl.load(a_base + a_row, mask=a_mask, other=0.0)
        b = tl.load(b_cols + b_row, mask=mask_n[None, :] & b_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_row += rows * dil_h * sxh
        b_row += rows * swh
    return acc


@triton.jit
def k_loop_flat(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, offs_k, k_start, k_end, H, W, CIN_G,
                dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww,
                KH: tl.constexpr, KW: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """Small Cin_g, wide kernel rows: K chunks over the flattened (kh, kw, c) index."""
    k_len = KH * KW * CIN_G
    for it in range(k_start, k_end):
        kk = it * BLOCK_K + offs_k
        c = kk % CIN_G
        tap = kk // CIN_G
        kh = tap // KW
        kw = tap - kh * KW
        k_ok = kk < k_len
        ih = ih0[:, None] + (kh * dil_h)[None, :]
        iw = iw0[:, None] + (kw * dil_w)[None, :]
        a_mask = mask_m[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_rows[:, None] + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=a_mask, other=0.0)
        b_ptrs = w_cols[None, :] + (c * swi + kh * swh + kw * sww)[:, None]
        b = tl.load(b_ptrs, mask=mask_n[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc
