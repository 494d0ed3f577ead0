"""Launch configurations of the implicit-GEMM conv kernel: autotune configs, pruning, split-K, AOT variants.

The conv is a GEMM with M = N*OH*OW output pixels, N = Cout/groups channels and K = KH*KW*Cin/groups, so the
config space follows the Triton matmul tutorial and Inductor's conv template: BLOCK_M x BLOCK_N output tiles
(128x256 / 256x128 / 128x128 with 8 warps for the big compute-bound layers, where Hopper's wgmma wants large
tiles; 64-wide and 32-wide tiles for small layers), BLOCK_K of 64 for 16-bit dtypes (32 for fp32, whose tiles
take twice the shared memory), 3-4 pipeline stages and a GROUP_M=8 swizzle for L2 reuse of the input tiles.

`autotune_configs(dtype_bytes)` returns the candidate list; `prune_configs(configs, named_args)` (the
autotuner's early_config_prune) caps each config's tiles to the problem (a 24-channel layer gets N = 32 tiles
rather than losing every candidate), applies the warp rule (spatial convs run at most SPATIAL_MAX_WARPS warps,
a guard against Triton's 8-warp miscompile of this loop shape) and the shared-memory budget, and removes
duplicates, so the tuning time per distinct shape stays small. The autotuner keys on the shape arguments and the tensor
dtypes, so every distinct layer shape / dtype is tuned once.

Which schedule a launch runs — the data-parallel grid, split-K (partial sums in an fp32 workspace, finished
by an epilogue kernel) or stream-K (`conv_streamk`: one program per SM, or up to two per SM, share all tiles'
K steps) — is a launch decision made by the cost model in `schedule` (`choose_schedule`, re-exported here with
`choose_split_k` and `estimate_time`): batch-1 long-K late-stage layers split K, batch-32 sub-wave layers
(ResNet-50 stage 3/4 3x3: 0.74 / 0.39 waves of 128x128 tiles on 132 SMs) run stream-K, and so do batch-1
short-K layers with a few more work units than SMs (one K step per program). `prune_streamk_configs` keeps the
stream-K kernel's tiles within its workspace slots (STREAMK_MAX_TILE); the small capped tiles those layers rate
(16x32, 16x64) are among them.

Under TRITON_INTERPRET=1 nothing is autotuned: `INTERPRET_CONFIG` (one small tile) is used directly.

`aot_variants()` lists every kernel variant x config for ahead-of-time compile tests.
"""

from __future__ import annotations

import triton
# The schedule cost model lives in `schedule`; re-exported here, where callers have always found it.
from fusedconv.kernels.schedule import (  # noqa: F401
    STREAMK_MAX_TILE, choose_schedule, choose_split_k, estimate_streamk_time, estimate_time)

#: The one config used under the interpreter (smallest tiles tl.dot accepts: interpreted time scales with size).
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}

# Shared memory a config may use (bytes): fits A100 (164 KiB) and H100 (228 KiB) with room for the epilogue's
# layout-conversion scratch.
_SMEM_BUDGET = 160 * 1024

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) for 16-bit inputs.
_CONFIGS_16BIT = (
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
    (16, 64, 64, 4, 4),
)
# fp32 (TF32 or IEEE) inputs: half the K depth for the same shared memory.
_CONFIGS_32BIT = (
    (128, 128, 32, 3, 8),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (16, 64, 32, 4, 4),
)

GROUP_M = 8


def autotune_configs(dtype_bytes: int) -> list[triton.Config]:
    """Candidate configs for inputs of `dtype_bytes` bytes per element (2: fp16/bf16, 4: fp32)."""
    table = _CONFIGS_16BIT if dtype_bytes <= 2 else _CONFIGS_32BIT
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M},
                      num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in table
    ]


def all_autotune_configs() -> list[triton.Config]:
    """Every config of both tables (the autotuner holds all of them; pruning picks per dtype and shape)."""
    return autotune_configs(2) + autotune_configs(4)


def block_k_values() -> frozenset[int]:
    """Every BLOCK_K a config may use (the launcher drops K masks only when all of them divide Cin/groups)."""
    return frozenset(row[2] for row in _CONFIGS_16BIT + _CONFIGS_32BIT)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


#: Largest warp count a spatial (non-1x1) config may use. Triton has miscompiled the flattened (kh, kw, c) K
#: loop at 8 warps (triton-lang/triton#1254; reproduced on an H100 in pytorch/pytorch#173068 with most outputs
#: wrong); Inductor caps its conv template at 4 warps for it. Until a GPU check validates 8-warp spatial
#: configs on real hardware, they run at 4 warps (tiles that would then spill are dropped).
SPATIAL_MAX_WARPS = 4
# Largest accumulator tile (BLOCK_M * BLOCK_N) one 4-warp program holds without spilling (128 fp32 / thread).
_MAX_TILE_4_WARPS = 128 * 128
# Accumulator elements per thread at which a tile with a residual spills in the epilogue (the 16-bit residual
# tile and the fp32 accumulator are live together: 128x128 at 4 warps, 128x256 at 8 warps, 256 B of stack on
# sm_90); such configs are dropped for residual launches, which keep the half-size tiles.
_RESIDUAL_MAX_ACC_PER_THREAD = 128
# Row cap of the element-gather loops (ROW_K, FLAT_K).
_GATHER_MAX_M = 64


def safe_num_warps(num_warps: int, is_1x1: bool) -> int:
    """The warp count a config may run with: 1x1 GEMMs keep theirs, spatial convs at most SPATIAL_MAX_WARPS."""
    return num_warps if is_1x1 else min(num_warps, SPATIAL_MAX_WARPS)


def residual_spills(block_m: int, block_n: int, num_warps: int) -> bool:
    """Whether a tile with a residual holds too many accumulator elements per thread to finish its epilogue
    without spilling (see _RESIDUAL_MAX_ACC_PER_THREAD); used by every conv kernel's pruning."""
    return block_m * block_n >= _RESIDUAL_MAX_ACC_PER_THREAD * 32 * num_warps


#: Widest K step of the row-K loop that packs several kernel rows; the kernel's `conv_kloops.row_k_rows` applies
#: the same rule (a test checks they agree), so ROW_WIDTH = row_width(...) always holds its rows.
ROW_K_MAX_WIDTH = 32


def row_k_rows(kh: int, kw: int, cin_g: int) -> int:
    """Kernel rows one K step of the row-K loop covers: as many whole rows of KW * Cin_g as fit
    ROW_K_MAX_WIDTH, at least one, at most KH (the 3x3 RGB stem: all three, one K step; the 7x7: one)."""
    return max(1, min(kh, ROW_K_MAX_WIDTH // (kw * cin_g)))


def row_width(kw: int, cin_g: int, kh: int) -> int:
    """K width of one step of the row-K loop: its `row_k_rows` kernel rows of KW * Cin_g, padded to a power
    of two >= 16. The kernel computes the same rows per step (`conv_kloops.row_k_rows`) and needs ROW_WIDTH
    at least this wide."""
    return _pow2_at_least_16(row_k_rows(kh, kw, cin_g) * kw * cin_g)


def prune_configs(configs, named_args, kernel: str = "gemm", **kwargs):
    """early_config_prune: the configs of this problem's dtype, capped to its M, N, K and to the warp rule.

    Tiles larger than the (power-of-two-rounded) problem would only waste work, so each block size is capped
    to its dimension (not dropped: a problem with 24 output channels still gets every tile shape, at N = 32);
    spatial convs run at most SPATIAL_MAX_WARPS warps (see there); configs over the shared-memory budget are
    dropped, and so are configs whose accumulator and residual tile would spill in the epilogue (residual
    launches with >= 128 accumulator elements per thread); duplicates after capping are removed. The row-K loop (ROW_K) fixes its own K width. Never
    returns an empty list.
    """
    args = {**named_args, **kwargs}
    from fusedconv.kernels.denylist import drop_denied

    configs = drop_denied(configs, args, kernel=kernel)  # configs the GPU check found wrong on this GPU + triton
    x = args["x_ptr"]
    dtype_bytes = x.element_size() if hasattr(x, "element_size") else 2
    table = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in autotune_configs(dtype_bytes)}
    is_1x1 = bool(args.get("IS_1X1", False))
    has_residual = bool(args.get("HAS_RESIDUAL", False))
    cap_m = _pow2_at_least_16(args["M"])
    if args.get("ROW_K") or args.get("FLAT_K"):
        # Small-Cin_g loops gather A element by element (2-byte loads): 128-row tiles double the gathers per
        # thread and exceed ~400 loop instructions; 64 rows keep the loop short and spill-free.
        cap_m = min(cap_m, _GATHER_MAX_M)
    cap_n = _pow2_at_least_16(args["COUT_G"])
    k_extent = args["CIN_G"] * args["KH"] * args["KW"] if args.get("FLAT_K") else args["CIN_G"]
    cap_k = _pow2_at_least_16(k_extent)
    own = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in table]
    kept, seen = [], set()
    for cfg in own:
        bm, bn = min(cfg.kwargs["BLOCK_M"], cap_m), min(cfg.kwargs["BLOCK_N"], cap_n)
        bk = args["ROW_WIDTH"] if args.get("ROW_K") else min(cfg.kwargs["BLOCK_K"], cap_k)
        warps = safe_num_warps(cfg.num_warps, is_1x1)
        if warps < cfg.num_warps and bm * bn > _MAX_TILE_4_WARPS:
            continue  # this tile needs 8 warps to hold its accumulator
        if has_residual and residual_spills(bm, bn, warps):
            continue  # accumulator + residual tile spill in the epilogue
        smem = (bm * bk + bk * bn) * dtype_bytes * cfg.num_stages
        if smem > _SMEM_BUDGET:
            continue
        sig = (bm, bn, bk, cfg.num_stages, warps)
        if sig not in seen:
            seen.add(sig)
            kept.append(triton.Config({**cfg.kwargs, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                      num_stages=cfg.num_stages, num_warps=warps))
    if not kept:  # only when even the smallest tile is over the shared-memory budget (very wide ROW_K rows)
        smallest = min(own or configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        kept = [triton.Config(dict(smallest.kwargs), num_stages=2,
                              num_warps=safe_num_warps(smallest.num_warps, is_1x1))]
    return kept


#: Autotuner key: the problem shape (and layout: sxc is 1 for channels_last), the residual flag (it narrows the
#: configs: `residual_spills`), plus the launch-time split-K and the loop / alignment flags the launcher
#: derives from shape and strides.
AUTOTUNE_KEY = ["M", "CIN_G", "COUT_G", "H", "W", "OW", "stride_h", "stride_w", "dil_h", "sxc", "syc", "KH", "KW",
                "HAS_RESIDUAL", "SPLIT_K", "IS_1X1", "ROW_K", "CH_ALIGN"]

#: The stream-K kernel's key: the same shape arguments (it has no SPLIT_K; its program count is the grid size, not an
#: argument, so the launcher keeps one autotuner per program count instead of a key entry).
STREAMK_AUTOTUNE_KEY = [k for k in AUTOTUNE_KEY if k != "SPLIT_K"]


def prune_streamk_configs(configs, named_args, **kwargs):
    """early_config_prune of the stream-K kernel: `prune_configs`, then only tiles that fit its workspace
    slots (BLOCK_M * BLOCK_N <= STREAMK_MAX_TILE). Never empty (the smallest kept tile always fits)."""
    kept = prune_configs(configs, named_args, kernel="streamk", **kwargs)
    fitting = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= STREAMK_MAX_TILE]
    if fitting:
        return fitting
    smallest = min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    return [triton.Config({**smallest.kwargs, "BLOCK_M": 64, "BLOCK_N": 64}, num_stages=smallest.num_stages,
                          num_warps=smallest.num_warps)]


def _kernel_signature(dtype: str, int64_strides: bool = False) -> dict[str, str]:
    """Triton signature of `_conv_gemm_kernel` for a given element type ('fp16', 'bf16', 'fp32')."""
    i = "i64" if int64_strides else "i32"
    sig = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
           "res_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "ws_ptr": "*fp32"}
    for name in ("N", "H", "W", "OH", "OW", "M", "CIN_G", "COUT_G", "stride_h", "stride_w", "pad_h", "pad_w",
                 "dil_h", "dil_w"):
        sig[name] = "i32"
    for name in ("sxn", "sxc", "sxh", "sxw", "swo", "swi", "swh", "sww", "srn", "src", "srh", "srw",
                 "syn", "syc", "syh", "syw"):
        sig[name] = i
    sig["ACT_PARAM"] = "fp32"
    for name in ("KH", "KW", "ACTIVATION", "HAS_RESIDUAL", "IS_1X1", "ROW_K", "ROW_WIDTH", "FLAT_K", "EVEN_K",
                 "CH_ALIGN", "USE_INT64", "INPUT_PRECISION", "SPLIT_K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
        sig[name] = "constexpr"
    return sig


def streamk_kernel_signature(dtype: str, int64_strides: bool = False) -> dict[str, str]:
    """Triton signature of `conv_streamk._conv_streamk_kernel`: the GEMM kernel's plus the tile counters and
    the group count, without SPLIT_K."""
    sig = {}
    for name, kind in _kernel_signature(dtype, int64_strides).items():
        if name == "SPLIT_K":
            continue
        sig[name] = kind
        if name == "ws_ptr":
            sig["count_ptr"] = "*i32"
        if name == "ACT_PARAM":
            sig["GROUPS"] = "i32"
        if name == "INPUT_PRECISION":
            sig["WS_TILE"] = "constexpr"
    return sig


# The fast path's layout: channels_last x / residual / output (channel stride 1) and the packed weight (Cout
# stride 1). Real launches get these as constexpr 1 through Triton's specialisation.
_UNIT_STRIDES = ("sxc", "swo", "src", "syc")
# Args a real channels_last launch on typical CNN shapes sees as multiples of 16 (Triton's "D" specialisation):
# without these hints the compiler cannot vectorise the loads, and the software pipeline (num_stages) is not
# applied, so the AOT build would not be the kernel that runs.
_DIVISIBLE_ARGS = ("x_ptr", "w_ptr", "scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "ws_ptr", "CIN_G", "COUT_G",
                   "sxn", "sxh", "sxw", "swi", "swh", "sww", "srn", "srh", "srw", "syn", "syh", "syw")

_EPILOGUE_DIVISIBLE = ("ws_ptr", "scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "COUT")


def _divisibility_attrs(fn, signature: dict, names) -> dict:
    """ASTSource `attrs`: {(arg index,): [["tt.divisibility", 16]]} for the non-constexpr args in `names`."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name in names if signature.get(name, "constexpr") != "constexpr"}


def aot_variants() -> list[dict]:
    """Every implicit-GEMM kernel variant x autotune config, described for ahead-of-time compilation.

    Each entry is a dict: `name` (unique, readable), `fn` (the @triton.jit JITFunction, not the autotuner),
    `signature` ({arg: "*fp16" | "i32" | "fp32" | "constexpr" ...}), `constexprs` ({arg: value}, block sizes,
    ACTIVATION id and flags included), `divisible_by_16` (names of the args a channels_last launch on typical
    layers has as multiples of 16 — pointers, channel counts, strides; mark them tt.divisibility=16 or the
    vectorised, software-pipelined loads are not built) and the same as ready ASTSource `attrs`
    ({(index,): [["tt.divisibility", 16]]}, triton >= 3.2 format), `num_warps`, `num_stages`, `dtype` (torch dtype name: "float16",
    "bfloat16", "float32") and `expects_tensor_cores` (True when the PTX must contain mma / wgmma: every 16-bit
    variant, and fp32 with TF32).

    Covered: for each dtype, every config of its table for the general (3x3, padded) and the 1x1 fast-path
    kernels — the activation, the residual flag and EVEN_K rotate over these entries so every activation and
    flag is compiled without multiplying the count (compile time is CI time); the split-K partial-sum kernel
    and its epilogue kernel; the flattened-K (small Cin) loop per dtype; the int64-offset variant; fp32 with
    IEEE precision.
    """
    import importlib

    conv_mod = importlib.import_module("fusedconv.kernels.conv_bn_act")
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    variants: list[dict] = []

    def add(name, dtype, cfg, *, kh=3, kw=3, act="relu", residual=True, is_1x1=False, flat_k=False, even_k=True,
            int64=False, precision=None, split_k=1, row_k=False, cin_g=None, ch_align=1, stream_k=False):
        if precision is None:  # as the launcher passes it: TF32 is the fp32 default; 16-bit dtypes ignore it
            precision = "tf32" if dtype == "float32" else "ieee"
        kwargs = dict(cfg.kwargs)
        if row_k:
            kwargs["BLOCK_K"] = row_width(kw, cin_g, kh)  # as prune_configs sets it
        constexprs = {"KH": kh, "KW": kw, "ACTIVATION": ACTIVATION_IDS[act], "HAS_RESIDUAL": residual,
                      "IS_1X1": is_1x1, "ROW_K": row_k, "ROW_WIDTH": row_width(kw, cin_g, kh) if row_k else 16,
                      "FLAT_K": flat_k, "EVEN_K": even_k, "CH_ALIGN": ch_align, "USE_INT64": int64,
                      "INPUT_PRECISION": precision, "SPLIT_K": split_k, **kwargs}
        signature = _kernel_signature(short[dtype], int64)
        # Small Cin_g (ROW_K / FLAT_K) or channel counts aligned to 8 only (CH_ALIGN): Cin_g and the pixel
        # strides are then not multiples of 16.
        narrow = ("CIN_G", "sxn", "sxh", "sxw")
        if ch_align > 1:
            narrow += ("COUT_G", "swi", "swh", "sww", "srn", "srh", "srw", "syn", "syh", "syw")
        divisible = tuple(a for a in _DIVISIBLE_ARGS if not ((flat_k or row_k or ch_align > 1) and a in narrow))
        # Launches specialise ints equal to 1 into constexprs: the channels_last / packed-weight unit strides.
        for unit in _UNIT_STRIDES:
            signature[unit] = "constexpr"
            constexprs[unit] = 1
        warps = safe_num_warps(cfg.num_warps, is_1x1)
        fn = conv_mod._conv_gemm_kernel
        if stream_k:  # the stream-K kernel: same arguments plus counters / groups / WS_TILE, no SPLIT_K
            fn = conv_mod._conv_streamk_kernel
            signature = {**streamk_kernel_signature(short[dtype], int64),
                         **{u: "constexpr" for u in _UNIT_STRIDES}}
            constexprs.pop("SPLIT_K")
            constexprs["WS_TILE"] = STREAMK_MAX_TILE
            divisible += ("count_ptr",)
        variants.append({
            "name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
            "attrs": _divisibility_attrs(fn, signature, divisible),
            "divisible_by_16": tuple(a for a in divisible if signature.get(a) != "constexpr"),
            "num_warps": warps, "num_stages": cfg.num_stages, "dtype": dtype,
            "expects_tensor_cores": dtype != "float32" or precision == "tf32",
        })

    acts = list(ACTIVATION_IDS)
    turn = 0
    for dtype in ("float16", "bfloat16", "float32"):
        for cfg in autotune_configs(4 if dtype == "float32" else 2):
            for kind in ("conv3x3", "conv1x1"):
                is_1x1 = kind == "conv1x1"
                warps = safe_num_warps(cfg.num_warps, is_1x1)
                if warps < cfg.num_warps and cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] > _MAX_TILE_4_WARPS:
                    continue  # prune_configs drops this spatial tile (see SPATIAL_MAX_WARPS)
                tag = "m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}".format(**cfg.kwargs) + f"s{cfg.num_stages}w{warps}"
                act, residual, even_k = acts[turn % len(acts)], turn % 2 == 0, turn % 3 != 2
                # pruning never runs a residual launch on a tile that spills in its epilogue
                residual = residual and not residual_spills(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], warps)
                turn += 1
                flags = dict(kh=1, kw=1, is_1x1=True) if is_1x1 else {}
                add(f"{kind}_{act}_{'res_' if residual else ''}{'' if even_k else 'oddk_'}{short[dtype]}_{tag}",
                    dtype, cfg, act=act, residual=residual, even_k=even_k, **flags)
    base16 = autotune_configs(2)[4]
    for dtype in ("float16", "bfloat16", "float32"):  # the row-K loop (RGB stem: 7x7, Cin 3)
        table = autotune_configs(4 if dtype == "float32" else 2)
        for cfg in (table[2],) if dtype == "float32" else (table[4], table[5]):  # 64x128, 64x64
            tag = "m{BLOCK_M}n{BLOCK_N}".format(**cfg.kwargs)
            add(f"conv7x7_stem_rowk_{short[dtype]}_{tag}", dtype, cfg, kh=7, kw=7, residual=False, row_k=True,
                cin_g=3, even_k=False)
    # the row-K loop with several kernel rows per step (3x3 RGB stem: the whole kernel in one 32-column step)
    add("conv3x3_stem_rowk_fp16_m64n64", "float16", autotune_configs(2)[5], kh=3, kw=3, act="relu6", residual=False,
        row_k=True, cin_g=3, even_k=False)
    # the flattened-K loop (small Cin_g, kernel rows wider than 64: here 7 x 12)
    add("conv7x7_flatk_fp16", "float16", autotune_configs(2)[5], kh=7, kw=7, residual=False, flat_k=True, even_k=False)
    # channel counts that are multiples of 8 but not 16 (24, 40, 56): vector loads through CH_ALIGN
    add("align8_conv3x3_relu6_fp16", "float16", base16, act="relu6", residual=False, even_k=False, ch_align=8)
    add("align8_conv1x1_identity_res_fp16", "float16", autotune_configs(2)[5], kh=1, kw=1, is_1x1=True, act="identity",
        even_k=False, ch_align=8)
    add("conv3x3_splitk_partial_fp16", "float16", base16, split_k=4)
    # stream-K (sub-wave layers): the largest tile it runs, with and without a residual, and fp32 / TF32
    add("streamk_conv3x3_fp16_m128n128", "float16", autotune_configs(2)[2], residual=False, stream_k=True)
    add("streamk_conv3x3_silu_res_bf16_m64n128", "bfloat16", autotune_configs(2)[4], act="silu", stream_k=True)
    add("streamk_conv1x1_relu_fp32", "float32", autotune_configs(4)[1], kh=1, kw=1, is_1x1=True, stream_k=True)
    add("conv7x7_int64_fp16", "float16", base16, kh=7, kw=7, int64=True)
    add("conv3x3_relu_fp32_ieee", "float32", autotune_configs(4)[3], precision="ieee")

    for dtype in ("float16", "bfloat16", "float32"):
        sig = {"ws_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": f"*{short[dtype]}",
               "y_ptr": f"*{short[dtype]}", "M": "i32", "COUT": "i32", "OH": "i32", "OW": "i32",
               "srn": "i32", "src": "i32", "srh": "i32", "srw": "i32",
               "syn": "i32", "syc": "i32", "syh": "i32", "syw": "i32", "ACT_PARAM": "fp32",
               "SPLIT_K": "constexpr", "ACTIVATION": "constexpr", "HAS_RESIDUAL": "constexpr",
               "USE_INT64": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        variants.append({
            "name": f"splitk_epilogue_{short[dtype]}", "fn": conv_mod._splitk_epilogue_kernel, "signature": sig,
            "constexprs": {"SPLIT_K": 4, "ACTIVATION": ACTIVATION_IDS["silu"], "HAS_RESIDUAL": True,
                           "USE_INT64": False, "BLOCK_M": 64, "BLOCK_N": 64},
            "attrs": _divisibility_attrs(conv_mod._splitk_epilogue_kernel, sig, _EPILOGUE_DIVISIBLE),
            "divisible_by_16": _EPILOGUE_DIVISIBLE,
            "num_warps": 4, "num_stages": 1, "dtype": dtype, "expects_tensor_cores": False,
        })
    return variants


def constexpr_defaults(kernel) -> dict:
    """{name: default} of a @triton.jit kernel's constexpr parameters that have one (the TMA kernels'
    TMA_EPILOGUE, conv_tma's PERSISTENT and PROGRAMS_PER_SM): what a launch whose config leaves them out
    compiles with."""
    return {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
