"""The lean K loops as the compiler builds them for sm_90 (ahead of time, no GPU): the configs the static
report picks for ResNet-50 layer1.0.conv2 and for the RGB stems use wgmma, spill nothing, and have a K loop the
analyser finds, with the loop lengths this project claims for them.

The numbers behind the thresholds (triton 3.8, fp16 channels_last, batch 32; `python -m bench --suite static`):
layer1.0.conv2 128x64x64 w4 135 loop instructions (issue ratio 0.527; 161 / 0.63 before the carried offsets),
the 7x7 stem 64x64x32 w4 140 (2.19; 171 / 2.67 before the per-element bit sets), the 3x3 stems one K step of
three kernel rows: repvgg_a0 64x64x32 129 (2.02), mobilenet_v2 64x32x32 122 (3.81; before: three unrolled
steps of 16 columns the analyser could not see, ~210 instructions each when measured unrolled). Loop lengths are only asserted on
the triton they were read on (another version schedules differently); wgmma, no spill and a found loop on any.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
pytest.importorskip("torchvision")

import triton  # noqa: E402

from bench import aot, sass, static  # noqa: E402
from bench.shapes import layer_cases  # noqa: E402

MEASURED_ON = "3.8."

# (net, layer, config, largest issue ratio claimed on the measured triton, largest loop length)
CASES = [
    ("resnet50", "layer1.0.conv2", "128x64x64 w4/s3", 0.55, 140),
    ("resnet50", "conv1", "64x64x32 w4/s4", 2.25, 400),
    ("repvgg_a0", "stem.conv_kxk.conv", "64x64x32 w4/s4", 2.25, 400),
    ("mobilenet_v2", "features.0.0", "64x32x32 w4/s4", 4.0, 400),
]


@pytest.mark.parametrize("net,layer,config,max_ratio,max_loop", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_candidate_is_lean_wgmma_without_spills(net, layer, config, max_ratio, max_loop):
    case = next(c for c in layer_cases(net) if c.name == layer)
    _, variants = static.gemm_variants(case, 32, "float16", static.TARGETS[90]["sms"], 90)
    pointer = {v["config"]: v for v in variants if v["family"] == "pointer"}
    assert config in pointer, f"pruning no longer keeps {config} for {net} {layer}: {sorted(pointer)}"
    variant = pointer[config]
    analysis = aot.analyse_uncached(variant["spec"], 90)
    assert analysis["ok"], analysis.get("error")
    assert analysis["mma"] == "wgmma"
    assert analysis["stack_bytes"] == 0 and analysis["spill_instructions"] == 0
    loop = analysis["k_loop"]
    assert loop is not None and loop["mma"] > 0, "no K loop found"
    assert not loop.get("unrolled"), loop  # a real loop, not the unrolled fallback
    if triton.__version__.startswith(MEASURED_ON):
        bm, bn, bk = variant["block"]
        ratio = sass.issue_ratio(loop["instructions"], variant["num_warps"], bm, bn, bk,
                                 static.TARGETS[90]["mma_flop_per_cycle"])
        assert loop["instructions"] <= max_loop and ratio <= max_ratio, (loop["instructions"], ratio)


def test_row_k_steps_cover_whole_kernel_rows():
    """The static plan counts the row-K loop's steps as the kernel runs them: one for a 3x3 RGB stem."""
    for net, layer, steps in [("repvgg_a0", "stem.conv_kxk.conv", 1), ("resnet50", "conv1", 7)]:
        case = next(c for c in layer_cases(net) if c.name == layer)
        _, variants = static.gemm_variants(case, 32, "float16", static.TARGETS[90]["sms"], 90)
        assert {v["steps"] for v in variants if v["family"] == "pointer"} == {steps}, (net, layer)
