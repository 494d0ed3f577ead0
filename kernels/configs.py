"""Launch configurations of the implicit-GEMM conv kernel: autotune configs, pruning, split-K, AOT variants.

The conv is a GEMM with M = N*OH*OW output pixels, N = Cout/groups channels and K = KH*KW*Cin/groups, so the
config space follows the Triton matmul tutorial and Inductor's conv template: BLOCK_M x BLOCK_N output tiles
(128x256 / 256x128 / 128x128 with 8 warps for the big compute-bound layers, where Hopper's wgmma wants large
tiles; 64-wide and 32-wide tiles for small layers), BLOCK_K of 64 for 16-bit dtypes (32 for fp32, whose tiles
take twice the shared memory), 3-4 pipeline stages and a GROUP_M=8 swizzle for L2 reuse of the input tiles.

`autotune_configs(dtype_bytes)` returns the candidate list; `prune_configs(configs, named_args)` (the
autotuner's early_config_prune) keeps, per problem, the configs whose tiles fit the problem and shared memory,
so the tuning time per distinct shape stays small. The autotuner keys on the shape arguments and the tensor
dtypes, so every distinct layer shape / dtype is tuned once.

Batch-1 layers (M tiny, K large: ResNet's 7x7 stage has M = 49, K = 4608) cannot fill the GPU with output
tiles alone. Split-K over a grid axis fixes that, but the activation is non-linear, so the epilogue needs the
full sum: each K slice writes an fp32 partial tile into a workspace and a small epilogue kernel sums the slices
and applies scale/shift/residual/activation. `choose_split_k` picks the number of slices from the tile count and
the SM count (it is a launch decision, not an autotuned one, because the workspace and the second kernel depend
on it; the autotuner key includes it).

Under TRITON_INTERPRET=1 nothing is autotuned: `INTERPRET_CONFIG` (one small tile) is used directly.

`aot_variants()` lists every kernel variant x config for ahead-of-time compile tests.
"""

from __future__ import annotations

import triton

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


def prune_configs(configs, named_args, **kwargs):
    """early_config_prune: keep the configs that suit this problem's dtype, M, N, K and shared memory.

    Tiles larger than the (power-of-two-rounded) problem only waste work, so each block size is capped by its
    dimension; configs over the shared-memory budget are dropped; duplicates after capping are removed. Never
    returns an empty list.
    """
    args = {**named_args, **kwargs}
    from fusedconv.kernels.denylist import drop_denied

    configs = drop_denied(configs, args)  # configs the GPU check found wrong on this GPU + triton
    x = args["x_ptr"]
    dtype_bytes = x.element_size() if hasattr(x, "element_size") else 2
    table = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in autotune_configs(dtype_bytes)}
    cap_m = _pow2_at_least_16(args["M"])
    cap_n = _pow2_at_least_16(args["COUT_G"])
    k_extent = args["CIN_G"] * args["KH"] * args["KW"] if args.get("FLAT_K") else args["CIN_G"]
    cap_k = _pow2_at_least_16(k_extent)
    kept, seen = [], set()
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        if (bm, bn, bk) not in table:
            continue  # a config of the other dtype class
        if bm > cap_m or bn > cap_n or bk > cap_k:
            continue
        smem = (bm * bk + bk * bn) * dtype_bytes * cfg.num_stages
        if smem > _SMEM_BUDGET:
            continue
        sig = (bm, bn, bk, cfg.num_stages, cfg.num_warps)
        if sig not in seen:
            seen.add(sig)
            kept.append(cfg)
    if not kept:
        # Problem smaller than every tile: the smallest config of the right dtype class.
        own = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in table]
        kept = [min(own or configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return kept


#: Autotuner key: the problem shape (and layout: sxc is 1 for channels_last), plus the launch-time split-K.
AUTOTUNE_KEY = ["M", "CIN_G", "COUT_G", "H", "W", "OW", "stride_h", "stride_w", "dil_h", "sxc", "syc", "KH", "KW",
                "SPLIT_K", "IS_1X1"]


def choose_split_k(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int) -> int:
    """Number of K slices for a problem whose output tiles alone cannot fill `num_sms` SMs.

    Estimated with 64x64 tiles (the size small problems tune to). Each slice keeps at least 4 K iterations so
    the pipeline still has work; a power of two at most 16 bounds the workspace and the epilogue's reads.
    """
    tiles = _cdiv(m, 64) * _cdiv(cout_g, 64) * groups
    if tiles == 0 or num_sms <= 0 or tiles * 2 > num_sms or k_iters < 8:
        return 1
    split = min(_cdiv(num_sms, tiles), k_iters // 4, 16)
    power = 1
    while power * 2 <= split:
        power *= 2
    return power


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
    for name in ("KH", "KW", "ACTIVATION", "HAS_RESIDUAL", "IS_1X1", "FLAT_K", "EVEN_K", "USE_INT64",
                 "INPUT_PRECISION",
                 "SPLIT_K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
        sig[name] = "constexpr"
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
            int64=False, precision=None, split_k=1):
        if precision is None:  # as the launcher passes it: TF32 is the fp32 default; 16-bit dtypes ignore it
            precision = "tf32" if dtype == "float32" else "ieee"
        constexprs = {"KH": kh, "KW": kw, "ACTIVATION": ACTIVATION_IDS[act], "HAS_RESIDUAL": residual,
                      "IS_1X1": is_1x1, "FLAT_K": flat_k, "EVEN_K": even_k, "USE_INT64": int64, "INPUT_PRECISION": precision,
                      "SPLIT_K": split_k, **cfg.kwargs}
        signature = _kernel_signature(short[dtype], int64)
        # FLAT_K means Cin_g < 16: then Cin_g and the channels_last pixel stride (= Cin) are not multiples of 16.
        divisible = tuple(a for a in _DIVISIBLE_ARGS if not (flat_k and a in ("CIN_G", "sxw")))
        # Launches specialise ints equal to 1 into constexprs: the channels_last / packed-weight unit strides.
        for unit in _UNIT_STRIDES:
            signature[unit] = "constexpr"
            constexprs[unit] = 1
        variants.append({
            "name": name, "fn": conv_mod._conv_gemm_kernel, "signature": signature, "constexprs": constexprs,
            "attrs": _divisibility_attrs(conv_mod._conv_gemm_kernel, signature, divisible),
            "divisible_by_16": tuple(a for a in divisible if signature.get(a) != "constexpr"),
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "dtype": dtype,
            "expects_tensor_cores": dtype != "float32" or precision == "tf32",
        })

    acts = list(ACTIVATION_IDS)
    turn = 0
    for dtype in ("float16", "bfloat16", "float32"):
        for cfg in autotune_configs(4 if dtype == "float32" else 2):
            tag = "m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}".format(**cfg.kwargs) + f"s{cfg.num_stages}w{cfg.num_warps}"
            for kind in ("conv3x3", "conv1x1"):
                act, residual, even_k = acts[turn % len(acts)], turn % 2 == 0, turn % 3 != 2
                turn += 1
                flags = dict(kh=1, kw=1, is_1x1=True) if kind == "conv1x1" else {}
                add(f"{kind}_{act}_{'res_' if residual else ''}{'' if even_k else 'oddk_'}{short[dtype]}_{tag}",
                    dtype, cfg, act=act, residual=residual, even_k=even_k, **flags)
    base16 = autotune_configs(2)[4]
    for dtype in ("float16", "bfloat16", "float32"):  # the flattened-K loop (RGB stem, small Cin_g)
        cfg = autotune_configs(4 if dtype == "float32" else 2)[2 if dtype == "float32" else 4]
        add(f"conv7x7_stem_flatk_{short[dtype]}", dtype, cfg, kh=7, kw=7, residual=False, flat_k=True,
            even_k=False)
    add("conv3x3_splitk_partial_fp16", "float16", base16, split_k=4)
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
