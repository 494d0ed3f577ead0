"""The stream-K TMA kernels (kernels/conv_tma_streamk.py) compiled ahead of time for sm_90, read back from SASS.

test_kernel_compile.py compiles every variant of `aot_variants()` (these included) for sm_80 / sm_90 with this
triton and with the GPU machine's triton 3.6, and checks the PTX for bulk-tensor copies and wgmma. This file
adds what only the cubin shows: the stream-K form keeps the data-parallel TMA kernels' properties — its K
loop loads through the copy engine (cp.async.bulk.tensor in the PTX, a TMA load inside the SASS K loop),
multiplies with wgmma, and neither the per-tile K-range bookkeeping nor the partial-tile fix-up spills (no
stack frame, no local loads / stores) — for the largest and smallest slot-fitting fp16 tiles of each kernel
and one bf16 and one fp32 tile (`conv_tma_streamk._AOT_PICKS`).
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("triton")

from bench import aot, sass  # noqa: E402
from fusedconv.kernels import conv_tma_streamk  # noqa: E402

_VARIANTS = conv_tma_streamk.aot_variants()
_BULK_TENSOR_RE = re.compile(r"\bcp\.async\.bulk\.tensor\.")


def test_variants_cover_both_kernels_and_every_dtype():
    fns = {v["fn"] for v in _VARIANTS}
    assert fns == {conv_tma_streamk._conv1x1_tma_streamk_kernel, conv_tma_streamk._conv_kxk_tma_streamk_kernel}
    assert {v["dtype"] for v in _VARIANTS} == {"float16", "bfloat16", "float32"}
    assert any(v["constexprs"]["HAS_RESIDUAL"] for v in _VARIANTS)
    for v in _VARIANTS:  # a variant compiled here is one a launch can run: its tile fits the workspace slot
        k = v["constexprs"]
        rows = k.get("BLOCK_M") or k["BLOCK_H"] * k["BLOCK_W"]
        assert rows * k["BLOCK_N"] <= k["WS_TILE"], v["name"]


@pytest.fixture(scope="module")
def analyses():
    """{name: (ptx, resource usage, SASS instructions)} of every variant for sm_90 (compiled once)."""
    os.environ.pop("TRITON_INTERPRET", None)
    out = {}
    for v in _VARIANTS:
        spec = {k: v[k] for k in ("fn", "signature", "constexprs", "divisible_by_16", "num_warps", "num_stages")}
        cubin, ptx, _ = aot.compile_cubin(spec, 90)
        usage, text = aot.read_cubin(cubin)
        out[v["name"]] = (ptx, usage, sass.parse(text))
    return out


def _known_spill(variant) -> bool:
    """Triton 3.6 (the GPU machine's) gives the KxK kernel's 8x16-pixel x 128-channel tile at 4 warps with a
    hardswish epilogue a 16 B stack frame (4 local stores / loads, none in the K loop; 255 registers). The
    data-parallel TMA KxK kernel's same tile spills there too (32 B with gelu); triton 3.8 spills neither."""
    import triton

    k = variant["constexprs"]
    return (triton.__version__.startswith("3.6.") and "BLOCK_H" in k and k["BLOCK_H"] * k["BLOCK_W"] == 128
            and k["BLOCK_N"] == 128 and variant["num_warps"] == 4 and "hardswish" in variant["name"])


@pytest.mark.parametrize("variant", [
    pytest.param(v, marks=pytest.mark.xfail(strict=True, reason="16 B epilogue stack frame with triton 3.6"))
    if _known_spill(v) else v for v in _VARIANTS], ids=lambda v: v["name"])
def test_streamk_tma_variant_uses_tma_and_wgmma_without_spills(analyses, variant):
    ptx, usage, instrs = analyses[variant["name"]]
    loop = sass.k_loop(instrs)
    assert loop is not None and loop["spill"] == 0, "spill instructions inside the K loop"
    assert _BULK_TENSOR_RE.search(ptx), "no cp.async.bulk.tensor in the sm_90 PTX"
    assert loop["tma"] > 0, f"the K loop has no TMA load: {loop['top_opcodes']}"
    assert sass.mma_kind(instrs, ptx) == "wgmma" and loop["mma"] > 0
    assert not usage.get("stack"), f"stack frame of {usage.get('stack')} bytes"
    assert sass.count(instrs, ("STL", "LDL")) == 0, "local-memory spill instructions"
