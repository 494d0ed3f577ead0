"""The K loops of the implicit-GEMM conv kernels (`conv_gemm.gemm_tile`), one @triton.jit helper each.

Each helper takes the fp32 accumulator of one BLOCK_M x BLOCK_N output tile, runs the K iterations
[k_start, k_end) of its loop shape and returns the accumulator. The kernel picks one by constexpr flags:

* `k_loop_1x1`: 1x1 kernel without padding, a plain GEMM over strided rows; K is the channels.
* `k_loop_taps`: every other conv with Cin_g >= 16. One flattened loop over (kh, kw) taps x channel chunks of
  BLOCK_K (one long loop for the software pipeliner). The tap and chunk are carried counters, advanced by
  scalar selects, so the loop has no integer division; the spatial bounds of all taps are tested once before
  the loop into a per-row bit set (bit t: tap t reads inside the image), so a tap's row mask is one AND.
* `k_loop_rows`: Cin_g < 16 with KW * Cin_g <= 64 (the RGB stem: 7 x 3 = 21). K runs over kernel rows kh; one
  K step covers a whole kernel row, all (kw, c) pairs padded up to ROW_WIDTH (a power of two >= 16), so the
  per-column decomposition (kw, c) = divmod(j, Cin_g) and the width masks are loop-invariant and computed
  once; an iteration only adds the row offset and tests the row's height bound.
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
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
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
    a_rows = x_rows + ih0 * sxh + iw0 * sxw
    # Counter steps: next tap in the kernel row, or first tap of the next kernel row.
    x_col_step = dil_w * sxw
    x_row_step = dil_h * sxh - (KW - 1) * dil_w * sxw
    w_row_step = swh - (KW - 1) * sww
    for _ in range(k_start, k_end):
        if USE_BITS:
            row_ok = (tap_ok & tap_bit) != 0
        else:
            ih = ih0 + dh
            iw = iw0 + dw
            row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c = c_off + offs_k
        a_ptrs = (a_rows + x_tap)[:, None] + c[None, :] * sxc
        b_ptrs = (w_cols + w_tap)[None, :] + c[:, None] * swi
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (c[None, :] < CIN_G), other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :] & (c[:, None] < CIN_G), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        # Advance (c-chunk, kw, kh) by scalar selects: no division, no branch in the loop.
        c_off += BLOCK_K
        next_tap = c_off >= CIN_G
        row_end = next_tap & (kw == KW - 1)
        c_off = tl.where(next_tap, 0, c_off)
        kw = tl.where(next_tap, tl.where(row_end, 0, kw + 1), kw)
        x_tap += tl.where(next_tap, tl.where(row_end, x_row_step, x_col_step), 0)
        w_tap += tl.where(next_tap, tl.where(row_end, w_row_step, sww), 0)
        if USE_BITS:
            tap_bit = tl.where(next_tap, tap_bit << 1, tap_bit)
        else:
            dh += tl.where(row_end, dil_h, 0)
            dw = tl.where(next_tap, tl.where(row_end, 0, dw + dil_w), dw)
    return acc


@triton.jit
def k_loop_rows(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, k_start, k_end, H, W, CIN_G,
                dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww,
                KW: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_WIDTH: tl.constexpr):
    """Small Cin_g: one K step per kernel row kh, covering all (kw, c) of the row (padded to ROW_WIDTH)."""
    j = tl.arange(0, ROW_WIDTH)
    j_kw = j // CIN_G  # loop-invariant: decomposed once
    j_c = j - j_kw * CIN_G
    j_ok = j < KW * CIN_G
    iw = iw0[:, None] + (j_kw * dil_w)[None, :]
    a_mask_w = mask_m[:, None] & j_ok[None, :] & (iw >= 0) & (iw < W)
    a_rows = x_rows[:, None] + iw * sxw + (j_c * sxc)[None, :]
    b_cols = w_cols[None, :] + (j_kw * sww + j_c * swi)[:, None]
    b_mask = mask_n[None, :] & j_ok[:, None]
    for kh in range(k_start, k_end):
        ih = ih0 + kh * dil_h
        h_ok = (ih >= 0) & (ih < H)
        a = tl.load(a_rows + (ih * sxh)[:, None], mask=a_mask_w & h_ok[:, None], other=0.0)
        b = tl.load(b_cols + kh * swh, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
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
