"""1x1 conv as a GEMM over TMA tensor descriptors (Hopper bulk-tensor copies), BN/residual/activation fused.

A stride-1, unpadded 1x1 conv on a dense channels_last input with a packed weight is exactly a GEMM
    y[M, Cout] = x[M, Cin] @ w[Cin, Cout],  M = N*H*W pixels,
and both operands are plain 2-D row-major matrices: x as [M, Cin] (row stride Cin), the packed weight as
[Cin, Cout] (row stride Cout). Each K step loads a BLOCK_M x BLOCK_K tile of x and a BLOCK_K x BLOCK_N tile of w
through host-built `TensorDescriptor`s; the hardware copy engine (TMA) moves whole tiles into shared memory with
no per-thread address arithmetic, and its out-of-bounds zero fill replaces every mask (M tail, K tail, N tail).
The epilogue (scale/shift, residual by its strides, activation, cast, store) is the pointer kernel's — or, in
the TMA_EPILOGUE configs, written through a descriptor of its own (below).

TMA-store epilogue (TMA_EPILOGUE): the output, dense channels_last, is the row-major matrix y[M, Cout]; the
launcher builds a 2-D descriptor of it (and of the residual when that has the same dense layout), and the tile
is written by one bulk-tensor store (`y_desc.store`), which clips rows >= M and columns >= Cout — no masks, no
per-thread addresses — and the residual tile read by one descriptor load. `tma_store_eligible` says when a
tensor can take such a descriptor (dense channels_last, 16-byte aligned base and rows); otherwise the launcher
passes None, and even a TMA_EPILOGUE config stores (or loads the residual) through pointers. The autotuner holds
a TMA_EPILOGUE twin of each large tile (`dp_configs`, TMA_EPILOGUE_MIN_TILE says which and why) and times it
against the pointer-store tile per shape; the twins are pruned where the launch has no output descriptor.

Persistent configs (PERSISTENT, 16-bit): a grid of PROGRAMS_PER_SM programs per SM, each walking the output tiles
in strides of the grid through one flattened, software-pipelined loop, so the next tiles' descriptor loads are in
flight during this tile's MMA and epilogue. ResNet's 1x1 convs have one to four K steps per tile, too few for a
one-tile program to hide its loads behind. On the H200 at batch 32 the best persistent config ran 8 of
ResNet-50's 12 stride-1 1x1 convs 1.02-1.55x faster than the best one-tile config, and the K-heavy layer3/4 ones
0.78-0.95x as fast (bench/results/nvidia-h200/2026-12-04-tma1x1.md): the autotuner times both kinds per shape.

When it applies (`tma_1x1_eligible`): 16-bit or fp32 CUDA/interpreter tensors, groups 1, kernel 1x1, stride 1,
padding 0, x dense channels_last, weight packed (`pack_weight`), no split-K, and every descriptor constraint:
16-byte aligned base pointers and 16-byte aligned row strides (Cin and Cout times the element size multiples
of 16). Anything else — unaligned strides included — runs the pointer kernel, never a faulting descriptor.

Stream-K layers (`schedule.choose_schedule`) run this K loop (`k_loop_tma_1x1`) and the pointer-store epilogue
(`epilogue_1x1`) in the stream-K kernel of `conv_tma_streamk` (its configs, `tma_configs`, have no twins);
split-K layers run the pointer kernel.

The descriptors' block shapes depend on the tile config, so the autotuner's configs carry a pre_hook that sets
them (operands, output and residual) before each launch (the descriptors are built once per call with a
placeholder block shape).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedconv.kernels import backend_log
from fusedconv.kernels.configs import constexpr_defaults, residual_spills
from fusedconv.kernels.conv_plan import _num_sms
from fusedconv.kernels.epilogue import epilogue_store, epilogue_tile

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host-side tensor descriptors: the pointer kernel covers everything
    TensorDescriptor = None

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) for 16-bit inputs; fp32 halves BLOCK_K.
_TMA_CONFIGS_16BIT = (
    (128, 256, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
)
_TMA_CONFIGS_32BIT = ((128, 128, 32, 3, 8), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4))
GROUP_M = 8
#: The persistent configs, 16-bit only: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, PROGRAMS_PER_SM).
#: They are for the memory-bound 1x1 convs (64-256 input channels: one to four K steps per tile), where cuDNN ran
#: 1.4-1.7x faster than the one-tile-per-program configs on the H200 (2026-12-04 GPU check). A persistent grid
#: must be resident all at once (a program that waits for a free SM runs its whole share of tiles late), so each
#: config's shared memory — stages x (A + B tiles), the output tile staged for its bulk store and the residual
#: tile loaded by descriptor — times PROGRAMS_PER_SM fits an SM's 228 KB; the sm_90 compile tests check the
#: compiled kernels' figure (tests/test_kernel_compile.py).
_PERSISTENT_CONFIGS_16BIT = (
    (128, 64, 64, 3, 4, 2),
    (128, 128, 64, 3, 8, 1),
    (64, 64, 64, 4, 4, 2),
)
#: Programs of a persistent launch under the interpreter (no SM count there): fewer than the tiles of the tests'
#: shapes, so each program walks several tiles.
INTERPRET_PERSISTENT_PROGRAMS = 3


@triton.jit
def _conv1x1_tma_kernel(
    a_desc, b_desc, y_desc, r_desc, scale_ptr, shift_ptr, res_ptr, y_ptr,
    M, CIN, COUT, OH, OW,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA_EPILOGUE: tl.constexpr = False, PERSISTENT: tl.constexpr = False, PROGRAMS_PER_SM: tl.constexpr = 1,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    k_steps = tl.cdiv(CIN, BLOCK_K)
    if PERSISTENT:
        # PROGRAMS_PER_SM programs per SM (the grid, `programs`) walk the tiles in strides of the grid. The tile
        # and K loops are flattened into one software-pipelined loop, so the descriptor loads of the next tiles
        # are in flight while this tile's MMA and epilogue run: with ResNet's 64-256 input channels a tile has
        # one to four K steps, and a one-tile program has nothing to overlap its loads with.
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), flatten=True):
            _tile_1x1(tile, num_pid_m, num_pid_n, k_steps, a_desc, b_desc, y_desc, r_desc, scale_ptr, shift_ptr,
                      res_ptr, y_ptr, M, COUT, OH, OW, srn, src, srh, srw, syn, syc, syh, syw, ACT_PARAM,
                      ACTIVATION, HAS_RESIDUAL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA_EPILOGUE)
    else:
        _tile_1x1(tl.program_id(0), num_pid_m, num_pid_n, k_steps, a_desc, b_desc, y_desc, r_desc, scale_ptr,
                  shift_ptr, res_ptr, y_ptr, M, COUT, OH, OW, srn, src, srh, srw, syn, syc, syh, syw, ACT_PARAM,
                  ACTIVATION, HAS_RESIDUAL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA_EPILOGUE)


@triton.jit
def _tile_1x1(tile, num_pid_m, num_pid_n, k_steps, a_desc, b_desc, y_desc, r_desc, scale_ptr, shift_ptr, res_ptr,
              y_ptr, M, COUT, OH, OW, srn, src, srh, srw, syn, syc, syh, syw, ACT_PARAM,
              ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
              TMA_EPILOGUE: tl.constexpr):
    """Output tile number `tile` (grouped GROUP_M rows of tiles at a time, for L2 reuse of the weight): its K
    loop and fused epilogue."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N

    acc = k_loop_tma_1x1(a_desc, b_desc, m0, n0, 0, k_steps, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if TMA_EPILOGUE and y_desc is not None:  # y_desc None: the output is not TMA-storable (tma_store_eligible)
        epilogue_1x1_tma_store(acc, m0, n0, y_desc, r_desc, scale_ptr, shift_ptr, res_ptr, y_ptr, M, COUT, OH, OW,
                               srn, src, srh, srw, ACT_PARAM, ACTIVATION, HAS_RESIDUAL, BLOCK_M, BLOCK_N)
    else:
        epilogue_1x1(acc, m0, n0, scale_ptr, shift_ptr, res_ptr, y_ptr, M, COUT, OH, OW, srn, src, srh, srw,
                     syn, syc, syh, syw, ACT_PARAM, ACTIVATION, HAS_RESIDUAL, BLOCK_M, BLOCK_N)


@triton.jit
def k_loop_tma_1x1(a_desc, b_desc, m0, n0, k_lo, k_hi, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 accumulator of the tile at rows m0, columns n0 over K steps [k_lo, k_hi) (BLOCK_K channels each)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi):
        # Tiles past M, CIN or COUT come back zero-filled: no masks in the loop.
        a = a_desc.load([m0, k * BLOCK_K])
        b = b_desc.load([k * BLOCK_K, n0])
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def epilogue_1x1(acc, m0, n0, scale_ptr, shift_ptr, res_ptr, y_ptr, M, COUT, OH, OW, srn, src, srh, srw,
                 syn, syc, syh, syw, ACT_PARAM, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fused epilogue of the GEMM tile at (m0, n0): rows are output pixels n*OH*OW + oh*OW + ow."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < COUT
    mask_mn = mask_m[:, None] & mask_n[None, :]
    ow_idx = offs_m % OW
    t = offs_m // OW
    oh_idx = t % OH
    n_idx = t // OH
    epilogue_store(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, n_idx * srn + oh_idx * srh + ow_idx * srw,
                   n_idx * syn + oh_idx * syh + ow_idx * syw, offs_n, src, syc, mask_n, mask_mn,
                   HAS_RESIDUAL, ACTIVATION, ACT_PARAM)


@triton.jit
def epilogue_1x1_tma_store(acc, m0, n0, y_desc, r_desc, scale_ptr, shift_ptr, res_ptr, y_ptr, M, COUT, OH, OW,
                           srn, src, srh, srw, ACT_PARAM, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fused epilogue of the tile at (m0, n0) written by one bulk-tensor store of the [M, COUT] output
    descriptor (the copy engine clips rows >= M and columns >= COUT: no masks, no per-thread addresses). The
    residual tile comes through `r_desc` when the residual has the output's dense layout, else by its strides."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT
    residual = 0.0
    if HAS_RESIDUAL:
        if r_desc is not None:
            residual = r_desc.load([m0, n0])
        else:
            offs_m = m0 + tl.arange(0, BLOCK_M)
            ow_idx = offs_m % OW
            t = offs_m // OW
            res_rows = (t // OH) * srn + (t % OH) * srh + ow_idx * srw
            residual = tl.load(res_ptr + res_rows[:, None] + (offs_n * src)[None, :],
                               mask=(offs_m < M)[:, None] & mask_n[None, :], other=0.0)
    y_desc.store([m0, n0], epilogue_tile(acc, scale_ptr, shift_ptr, offs_n, mask_n, residual, HAS_RESIDUAL,
                                         ACTIVATION, ACT_PARAM).to(y_ptr.dtype.element_ty))


def _set_block_shapes(nargs):
    """Autotune pre_hook: the descriptors' block shapes follow the config being launched (the output and
    residual descriptors, where the launch has them, take the output tile's)."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]
    for name in ("y_desc", "r_desc"):
        if nargs.get(name) is not None:
            nargs[name].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]


def tma_configs(dtype_bytes: int) -> list:
    """The pointer-store-epilogue configs (the stream-K kernels of conv_tma_streamk run these too)."""
    table = _TMA_CONFIGS_16BIT if dtype_bytes <= 2 else _TMA_CONFIGS_32BIT
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M}, num_stages=s,
                          num_warps=w, pre_hook=_set_block_shapes) for bm, bn, bk, s, w in table]


#: Tiles (BLOCK_M * BLOCK_N) at least this large also get a TMA-store-epilogue twin. Why only these: the
#: bulk store pays by replacing per-thread address arithmetic and masked vector stores, which grow with the
#: elements per thread (128 at 128x128 / 8 warps, 64 at 128x64 / 4 warps), while its fixed cost — staging the
#: tile in shared memory, a fence and the wait for the copy engine — does not; every twin also doubles that
#: tile's share of the autotuning time.
TMA_EPILOGUE_MIN_TILE = 128 * 128


def dp_configs(dtype_bytes: int) -> list:
    """The data-parallel kernel's autotune candidates: `tma_configs`, plus a TMA_EPILOGUE twin of each tile of
    at least TMA_EPILOGUE_MIN_TILE (same tile, output written by a bulk-tensor store)."""
    base = tma_configs(dtype_bytes)
    twins = [triton.Config({**c.kwargs, "TMA_EPILOGUE": True}, num_stages=c.num_stages, num_warps=c.num_warps,
                           pre_hook=_set_block_shapes)
             for c in base if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= TMA_EPILOGUE_MIN_TILE]
    return base + twins


def persistent_configs(dtype_bytes: int) -> list:
    """The persistent configs (PERSISTENT: a grid of PROGRAMS_PER_SM programs per SM walks the tiles in one
    pipelined loop), each with the TMA-store epilogue (pointer stores where the launch has no output descriptor).
    16-bit inputs only: fp32 / TF32 1x1 convs are twice the bytes per FLOP of fp16 and none of those timed so far
    was memory-bound enough for it (an empty list for 4-byte inputs)."""
    if dtype_bytes > 2:
        return []
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M, "TMA_EPILOGUE": True,
                           "PERSISTENT": True, "PROGRAMS_PER_SM": per_sm}, num_stages=s, num_warps=w,
                          pre_hook=_set_block_shapes) for bm, bn, bk, s, w, per_sm in _PERSISTENT_CONFIGS_16BIT]


def all_configs() -> list:
    """Every config the data-parallel TMA 1x1 kernel's autotuner holds (16-bit and 32-bit): `dp_configs` and
    `persistent_configs`."""
    return dp_configs(2) + dp_configs(4) + persistent_configs(2)


def programs(tiles: int, meta: dict, device) -> int:
    """The grid of one launch: one program per tile, or for a PERSISTENT config at most PROGRAMS_PER_SM per SM
    (INTERPRET_PERSISTENT_PROGRAMS under the interpreter)."""
    if not meta.get("PERSISTENT"):
        return tiles
    if device.type != "cuda":
        return min(tiles, INTERPRET_PERSISTENT_PROGRAMS)
    return min(tiles, _num_sms(device) * meta["PROGRAMS_PER_SM"])


def _prune_tma(configs, named_args, **kwargs):
    """Configs of the input's dtype class, tiles capped to the problem (as configs.prune_configs does); the
    TMA_EPILOGUE twins only where the launch has an output descriptor (`y_desc`, see tma_store_eligible); the
    persistent configs always (their epilogue stores through pointers without one)."""
    args = {**named_args, **kwargs}
    store_ok = args.get("y_desc") is not None
    dtype_bytes = args["a_desc"].base.element_size()
    own = {(c[0], c[1], c[2]) for c in (_TMA_CONFIGS_16BIT if dtype_bytes <= 2 else _TMA_CONFIGS_32BIT)}
    own_persistent = {c[:3] for c in _PERSISTENT_CONFIGS_16BIT} if dtype_bytes <= 2 else set()

    def cap(n):
        return max(16, 1 << (max(int(n), 1) - 1).bit_length())

    kept, seen = [], set()
    for c in configs:
        persistent = bool(c.kwargs.get("PERSISTENT"))
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) not in (own_persistent if persistent
                                                                                   else own):
            continue
        if c.kwargs.get("TMA_EPILOGUE") and not store_ok and not persistent:
            continue
        bm, bn = min(c.kwargs["BLOCK_M"], cap(args["M"])), min(c.kwargs["BLOCK_N"], cap(args["COUT"]))
        bk = min(c.kwargs["BLOCK_K"], cap(args["CIN"]))
        sig = (bm, bn, bk, c.num_stages, c.num_warps, bool(c.kwargs.get("TMA_EPILOGUE")), persistent,
               c.kwargs.get("PROGRAMS_PER_SM"))
        if args.get("HAS_RESIDUAL") and residual_spills(bm, bn, c.num_warps):
            continue  # accumulator + residual tile spill in the epilogue (configs.residual_spills)
        if sig not in seen:
            seen.add(sig)
            kept.append(triton.Config({**c.kwargs, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                      num_stages=c.num_stages, num_warps=c.num_warps, pre_hook=_set_block_shapes))
    from fusedconv.kernels.denylist import config_key, drop_denied

    # configs the GPU check found wrong on this GPU + triton (keyed by every config value: see denylist)
    return drop_denied(kept, {"IS_1X1": True}, kernel="tma1x1", tensor=args["a_desc"].base,
                       key=config_key)


def tma_1x1_eligible(x, weight, groups, stride, padding, split_k) -> bool:
    """Whether `conv1x1_tma` can run this conv (see the module docstring); False means: use the pointer kernel."""
    if TensorDescriptor is None or groups != 1 or split_k not in (None, 1):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False  # bulk-tensor copies are a Hopper (sm_90+) feature
    if tuple(weight.shape[2:]) != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0):
        return False
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    esize = x.element_size()
    if x.stride() != (h * w * cin, 1, w * cin, cin):  # dense channels_last
        return False
    if weight.stride(0) != 1 or weight.stride(1) != cout:  # packed: Cout innermost, rows of Cout
        return False
    if (cin * esize) % 16 or (cout * esize) % 16:  # TMA row strides must be 16-byte multiples
        return False
    return x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0 and n * h * w > 0


def tma_store_eligible(t) -> bool:
    """Whether the 4-D tensor `t` (an output, or a residual read like one) can go through a 2-D [N*H*W, C]
    tensor descriptor for the TMA-store epilogue: a CUDA tensor (sm_90+) or a CPU one (the interpreter), dense
    channels_last, a 16-byte aligned base and 16-byte rows (C times the element size a multiple of 16), at
    least one element. False means: the pointer stores / loads of `epilogue_store`, never a faulting descriptor
    (TensorDescriptor asserts the same alignment rules, on triton 3.6 and 3.8 alike)."""
    if TensorDescriptor is None or t is None or t.dim() != 4 or t.numel() == 0:
        return False
    if t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    n, c, h, w = t.shape
    if t.stride() != (h * w * c, 1, w * c, c):
        return False
    return (c * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _store_desc(t, block):
    """The [N*H*W, C] descriptor of an eligible NCHW-shaped, channels_last tensor (a view: no copy)."""
    n, c, h, w = t.shape
    return TensorDescriptor(t.permute(0, 2, 3, 1).reshape(n * h * w, c), [n * h * w, c], [c, 1], block)


def conv1x1_tma_launch(x, weight, scale, shift, residual, y, activation_id, act_param, tf32, res_stride, autotuned,
                       interpret_cfg=None):
    """Launch `_conv1x1_tma_kernel` on an eligible problem (the caller checked `tma_1x1_eligible`). The output
    (and the residual) get a descriptor where `tma_store_eligible`, else None: then every config, TMA_EPILOGUE
    twins included, stores (loads) through pointers. `interpret_cfg` may set TMA_EPILOGUE or PERSISTENT (and
    PROGRAMS_PER_SM) to force those variants."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    m = n * h * w
    x2d = x.permute(0, 2, 3, 1).reshape(m, cin)  # a view: x is dense channels_last
    w2d = weight.permute(1, 2, 3, 0).reshape(cin, cout)  # a view: the packed weight is (Cin, Cout) row-major
    first = interpret_cfg or {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}
    a_desc = TensorDescriptor(x2d, [m, cin], [cin, 1], [first["BLOCK_M"], first["BLOCK_K"]])
    b_desc = TensorDescriptor(w2d, [cin, cout], [cout, 1], [first["BLOCK_K"], first["BLOCK_N"]])
    y_desc = _store_desc(y, [first["BLOCK_M"], first["BLOCK_N"]]) if tma_store_eligible(y) else None
    r_desc = None
    if y_desc is not None and residual is not None and tma_store_eligible(residual):
        r_desc = _store_desc(residual, [first["BLOCK_M"], first["BLOCK_N"]])
    res = residual if residual is not None else y
    args = (a_desc, b_desc, y_desc, r_desc, scale, shift, res, y, m, cin, cout, h, w, *res_stride, *y.stride(),
            float(act_param))
    flags = dict(ACTIVATION=activation_id, HAS_RESIDUAL=residual is not None,
                 INPUT_PRECISION="tf32" if tf32 else "ieee")

    def grid(meta):
        return (programs(triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]), meta, x.device),)

    if interpret_cfg is not None:
        _conv1x1_tma_kernel[grid(interpret_cfg)](*args, **flags, **interpret_cfg)
    else:
        autotuned[grid](*args, **flags)
    if backend_log.active():  # reports tell the persistent configs apart (nothing to do on a plain launch)
        ran = interpret_cfg if interpret_cfg is not None else \
            getattr(getattr(autotuned, "best_config", None), "kwargs", {})  # the config that just ran
        if ran.get("PERSISTENT"):
            backend_log.refine("triton tma persistent")
    return y


_autotuned = None


def autotuned_kernel():
    """The autotuner around `_conv1x1_tma_kernel`, built on first GPU use."""
    global _autotuned
    if _autotuned is None:
        _autotuned = triton.autotune(configs=all_configs(),
                                     key=["M", "CIN", "COUT", "OW", "HAS_RESIDUAL", "ACTIVATION"],
                                     prune_configs_by={"early_config_prune": _prune_tma})(_conv1x1_tma_kernel)
    return _autotuned


def aot_variants() -> list[dict]:
    """The TMA kernel's configs described for ahead-of-time compile tests (format: configs.aot_variants), with
    `expects_tma` True: the sm_90 build must contain bulk-tensor copies (cp.async.bulk.tensor). Every pointer-store
    config per dtype (activation and residual rotating), and the TMA_EPILOGUE twins of fp16 and fp32 (bf16's
    would compile the same store path again) with `expects_tma_store`: the sm_90 build must store through a
    bulk-tensor copy (global.shared::cta) and not spill; and one twin launched without descriptors (`_nodesc`),
    which must compile to pointer stores."""
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    acts = list(ACTIVATION_IDS)
    variants = []
    turn = 0
    for dtype in ("float16", "bfloat16", "float32"):
        for cfg in dp_configs(4 if dtype == "float32" else 2):
            twin = bool(cfg.kwargs.get("TMA_EPILOGUE"))
            if twin and dtype == "bfloat16":
                continue
            act, residual = acts[turn % len(acts)], turn % 2 == 0
            turn += 1
            if twin:  # the residual through its descriptor wherever pruning lets a residual launch have the tile
                residual = not residual_spills(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps)
            variants.append(_aot_variant(dtype, cfg, act, residual))
    # A TMA_EPILOGUE config launched without output / residual descriptors (an output tma_store_eligible
    # refuses): must compile to the pointer stores and loads, with no bulk-tensor store.
    twin16 = next(c for c in dp_configs(2) if c.kwargs.get("TMA_EPILOGUE")
                  and not residual_spills(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps))
    variants.append(_aot_variant("float16", twin16, "relu", True, store_descs=False))
    # The persistent configs (16-bit only): fp16 with and without a residual, and one bf16.
    for i, cfg in enumerate(persistent_configs(2)):
        residual = i % 2 == 0 and not residual_spills(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps)
        variants.append(_aot_variant("float16", cfg, acts[i % len(acts)], residual))
    variants.append(_aot_variant("bfloat16", persistent_configs(2)[0], "silu", False))
    return variants


def _aot_variant(dtype: str, cfg, act: str, residual: bool, store_descs: bool = True) -> dict:
    """One aot_variants entry: `cfg` compiled as a real launch specialises it (dense channels_last tensors:
    unit channel strides constexpr 1, 16-divisible pointers, channel counts and strides; output and residual
    descriptors as the launcher builds them, or none with `store_descs` False)."""
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    t = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    twin = bool(cfg.kwargs.get("TMA_EPILOGUE"))
    sig = {"a_desc": f"tensordesc<{t}[{bm},{bk}]>", "b_desc": f"tensordesc<{t}[{bk},{bn}]>",
           "y_desc": f"tensordesc<{t}[{bm},{bn}]>", "r_desc": f"tensordesc<{t}[{bm},{bn}]>",
           "scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": f"*{t}", "y_ptr": f"*{t}"}
    for name in ("M", "CIN", "COUT", "OH", "OW", "srn", "src", "srh", "srw", "syn", "syc", "syh", "syw"):
        sig[name] = "i32"
    sig["ACT_PARAM"] = "fp32"
    constexprs = dict(ACTIVATION=ACTIVATION_IDS[act], HAS_RESIDUAL=residual,
                      INPUT_PRECISION="tf32" if dtype == "float32" else "ieee")
    constexprs.update({**constexpr_defaults(_conv1x1_tma_kernel), **cfg.kwargs})  # the kernel's where cfg has none
    if not residual or not store_descs:  # the launcher passes no residual descriptor then
        constexprs["r_desc"] = None
    if not store_descs:
        constexprs["y_desc"] = None
    for name in constexprs:
        sig[name] = "constexpr"
    # Channels_last unit strides are specialised to constexpr 1 by real launches.
    for unit in ("src", "syc"):
        sig[unit] = "constexpr"
        constexprs[unit] = 1
    sig = {name: sig[name] for name in _conv1x1_tma_kernel.arg_names}  # parameter order
    divisible = tuple(a for a in ("scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "CIN", "COUT", "srn", "srh",
                                  "srw", "syn", "syh", "syw") if sig[a] != "constexpr")
    return {
        "name": f"tma_conv1x1_{act}_{'res_' if residual else ''}{t}_m{bm}n{bn}k{bk}s{cfg.num_stages}"
                f"w{cfg.num_warps}{'_tmastore' if twin else ''}{'' if store_descs else '_nodesc'}"
                f"{'_persistent_p%d' % cfg.kwargs['PROGRAMS_PER_SM'] if cfg.kwargs.get('PERSISTENT') else ''}",
        "fn": _conv1x1_tma_kernel, "signature": sig, "constexprs": constexprs,
        "attrs": {(_conv1x1_tma_kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible},
        "divisible_by_16": divisible, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
        "dtype": dtype, "expects_tensor_cores": True, "expects_tma": True, "expects_tma_store": twin and store_descs,
        "programs_per_sm": cfg.kwargs["PROGRAMS_PER_SM"] if cfg.kwargs.get("PERSISTENT") else None,
    }
