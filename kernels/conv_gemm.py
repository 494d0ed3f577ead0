"""The pointer implicit-GEMM conv kernel family: one output tile's K loop, the data-parallel kernel, split-K.

The convolution is computed as a GEMM without materialising im2col:
    M = N*OH*OW output pixels (rows), N = Cout/groups output channels (columns), K = KH*KW*Cin/groups.
`gemm_tile` computes the fp32 accumulator of one BLOCK_M x BLOCK_N tile of one group over a range of its K
iterations; the kernels around it only decide which tile and which K range a program owns:

* `_conv_gemm_kernel`: one program per output tile (grid axis 0, GROUP_M-swizzled), groups on axis 1, split-K
  slices on axis 2. With SPLIT_K == 1 it ends in the fused epilogue; otherwise each slice writes an fp32
  partial tile to a workspace and `_splitk_epilogue_kernel` sums the slices and finishes.
* `conv_streamk._conv_streamk_kernel` (its own file): a persistent stream-K schedule over the same tiles.

The K loops live in `conv_kloops` (one per loop shape, chosen by constexpr flags). A tiles are gathered from x
by strides: with channels_last input each row of the tile is a contiguous run of channels (the fast path);
NCHW works through the same code without a copy. B tiles come from the weight by its strides; `pack_weight`
stores it (KH, KW, Cin_g, Cout) so they are contiguous. The accumulator is fp32; fp32 inputs use TF32 when
`torch.backends.cudnn.allow_tf32` (as cuDNN would) else IEEE. The epilogue (`epilogue.epilogue_store`) applies
scale, shift, residual and the activation in fp32, then one cast and store in the output's strides.

Specialisations (constexprs): IS_1X1 (1x1 kernel without padding: a plain GEMM over strided rows, no spatial
masks), ROW_K / ROW_WIDTH (Cin_g < 16 and KW * Cin_g <= 64, e.g. the RGB stems: whole kernel rows per K step),
FLAT_K (other Cin_g < 16 spatial convs: K chunks over the flattened (kh, kw, c) index), neither (the per-tap
loop with carried counters), EVEN_K (Cin_g multiple of BLOCK_K: no channel masks), CH_ALIGN (8 when channel
counts and strides are multiples of 8 but not all of 16: the kernel restates them as multiples of 8 so the
compiler builds vector loads), USE_INT64 (offsets in int64, chosen by the launcher only when some tensor spans
more than 2^31 elements, so small problems keep cheap int32 math), SPLIT_K (see configs.choose_schedule).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedconv.kernels.conv_kloops import k_loop_1x1, k_loop_flat, k_loop_rows, k_loop_taps, row_k_rows
from fusedconv.kernels.epilogue import epilogue_store


@triton.jit
def k_iterations(CIN_G, KH: tl.constexpr, KW: tl.constexpr, IS_1X1: tl.constexpr, ROW_K: tl.constexpr,
                 FLAT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Number of K iterations of one output tile for the loop shape the flags select."""
    if IS_1X1:
        k_total = tl.cdiv(CIN_G, BLOCK_K)
    elif ROW_K:
        k_total = tl.cdiv(KH, row_k_rows(CIN_G, KH, KW))
    elif FLAT_K:
        k_total = tl.cdiv(KH * KW * CIN_G, BLOCK_K)
    else:
        k_total = KH * KW * tl.cdiv(CIN_G, BLOCK_K)
    return k_total


@triton.jit
def gemm_tile(pid_m, pid_n, g, k_start, k_end,
              x_ptr, w_ptr, H, W, OH, OW, M, CIN_G, COUT_G,
              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
              sxn, sxc, sxh, sxw, swo, swi, swh, sww,
              KH: tl.constexpr, KW: tl.constexpr,
              IS_1X1: tl.constexpr, ROW_K: tl.constexpr, ROW_WIDTH: tl.constexpr, FLAT_K: tl.constexpr,
              EVEN_K: tl.constexpr, USE_INT64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 accumulator of output tile (pid_m, pid_n) of group g over K iterations [k_start, k_end).

    Returns (acc, offs_m, n_idx, oh_idx, ow_idx, co, mask_n, mask_mn): the row decomposition, absolute output
    channels and masks the epilogue (or a partial-tile store) needs.
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < COUT_G
    if USE_INT64:
        # Every index that multiplies a stride becomes int64, so no product can wrap.
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        g = g.to(tl.int64)

    # Row (output pixel) decomposition, done once per tile.
    ow_idx = offs_m % OW
    t = offs_m // OW
    oh_idx = t % OH
    n_idx = t // OH
    ih0 = oh_idx * stride_h - pad_h
    iw0 = ow_idx * stride_w - pad_w
    co = g * COUT_G + offs_n  # absolute output channel

    x_rows = x_ptr + (n_idx * sxn + (g * CIN_G) * sxc)  # [BLOCK_M] pointers to channel 0 of this group
    w_cols = w_ptr + co * swo                            # [BLOCK_N] pointers to (co, 0, 0, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if IS_1X1:
        acc = k_loop_1x1(acc, x_rows + ih0 * sxh + iw0 * sxw, w_cols, mask_m, mask_n, offs_k, k_start, k_end,
                         CIN_G, sxc, swi, EVEN_K, INPUT_PRECISION, BLOCK_K)
    elif ROW_K:
        acc = k_loop_rows(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, k_start, k_end, H, W, CIN_G,
                          dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww, KH, KW, INPUT_PRECISION, ROW_WIDTH,
                          BLOCK_M)
    elif FLAT_K:
        acc = k_loop_flat(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, offs_k, k_start, k_end, H, W, CIN_G,
                          dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww, KH, KW, INPUT_PRECISION, BLOCK_K)
    else:
        acc = k_loop_taps(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, offs_k, k_start, k_end, H, W, CIN_G,
                          dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww, KH, KW, EVEN_K, INPUT_PRECISION,
                          BLOCK_M, BLOCK_N, BLOCK_K)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    return acc, offs_m, n_idx, oh_idx, ow_idx, co, mask_n, mask_mn


@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, ws_ptr,
    N, H, W, OH, OW, M, CIN_G, COUT_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM,
    KH: tl.constexpr, KW: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    IS_1X1: tl.constexpr, ROW_K: tl.constexpr, ROW_WIDTH: tl.constexpr, FLAT_K: tl.constexpr,
    EVEN_K: tl.constexpr, CH_ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_k = tl.program_id(2)
    if CH_ALIGN > 1:
        # The launcher checked these are multiples of CH_ALIGN (8): saying so lets the compiler build 16-byte
        # vector loads and the async copies of the software pipeline for channel counts like 24, 40, 56 that
        # Triton's own specialisation (multiples of 16 only) would leave as scalar 2-byte gathers.
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

    # GROUP_M swizzle: consecutive programs sweep GROUP_M row tiles per column tile, so the input rows they
    # gather stay in L2 while the weight columns are reused.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    k_total = k_iterations(CIN_G, KH, KW, IS_1X1, ROW_K, FLAT_K, BLOCK_K)
    k_per_split = tl.cdiv(k_total, SPLIT_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k_total)

    acc, offs_m, n_idx, oh_idx, ow_idx, co, mask_n, mask_mn = gemm_tile(
        pid_m, pid_n, g, k_start, k_end, x_ptr, w_ptr, H, W, OH, OW, M, CIN_G, COUT_G,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sxn, sxc, sxh, sxw, swo, swi, swh, sww,
        KH, KW, IS_1X1, ROW_K, ROW_WIDTH, FLAT_K, EVEN_K, USE_INT64, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    if SPLIT_K > 1:
        # Partial sums only: the non-linear epilogue needs the full K sum (done by _splitk_epilogue_kernel).
        # Workspace layout [SPLIT_K, M, Cout] fp32, contiguous.
        cout = COUT_G * tl.num_programs(1)
        ws_ptrs = ws_ptr + (pid_k * M + offs_m)[:, None] * cout + co[None, :]
        tl.store(ws_ptrs, acc, mask=mask_mn)
    else:
        epilogue_store(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, n_idx * srn + oh_idx * srh + ow_idx * srw,
                       n_idx * syn + oh_idx * syh + ow_idx * syw, co, src, syc, mask_n, mask_mn,
                       HAS_RESIDUAL, ACTIVATION, ACT_PARAM)


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr,
    M, COUT, OH, OW,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM,
    SPLIT_K: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K fp32 partial tiles of the workspace, then the full epilogue and the store."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < COUT
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: deterministic sums
        acc += tl.load(ws_ptr + (s * M + offs_m)[:, None] * COUT + offs_n[None, :], mask=mask_mn, other=0.0)
    ow_idx = offs_m % OW
    t = offs_m // OW
    oh_idx = t % OH
    n_idx = t // OH
    epilogue_store(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, n_idx * srn + oh_idx * srh + ow_idx * srw,
                   n_idx * syn + oh_idx * syh + ow_idx * syw, offs_n, src, syc, mask_n, mask_mn,
                   HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
