"""The batch-1 stream-K schedules as the compiler builds them for sm_90 (ahead of time, no GPU).

Short-K MobileNetV2 layers at batch 1 have a few more work units than SMs, and the schedule rule runs them
on one stream-K program per K step (kernels/schedule.py: `streamk_program_counts`). Here the static suite's
plan of each layer (bench.static.gemm_variants, as the launcher plans it) must carry that program count, the
stream-K kernel's pruned configs must include the tile the rule rated (capped to the problem: 16x32 for N 32),
and that config must compile to a tensor-core loop (wgmma or mma.sync) without spills, with at least one wave
of programs holding work.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
pytest.importorskip("torchvision")

from bench import aot, static  # noqa: E402
from bench.shapes import layer_cases  # noqa: E402

# (net, layer, stream-K programs the rule picks on 132 SMs, the config it rated)
CASES = [
    ("mobilenet_v2", "features.4.conv.2", 147, "16x32x64 w4/s4"),
    ("mobilenet_v2", "features.12.conv.0.0", 234, "16x64x64 w4/s4"),
    ("mobilenet_v2", "features.15.conv.0.0", 180, "16x64x64 w4/s4"),
]


@pytest.mark.parametrize("net,layer,programs,config", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_batch1_stream_k_config_is_a_spill_free_tensor_core_loop(net, layer, programs, config):
    case = next(c for c in layer_cases(net) if c.name == layer)
    sms = static.TARGETS[90]["sms"]
    launch, variants = static.gemm_variants(case, 1, "float16", sms, 90)
    assert launch["stream_k"] == programs
    by_config = {v["config"]: v for v in variants if v["family"] == "pointer"}
    assert config in by_config, f"stream-K pruning no longer keeps {config}: {sorted(by_config)}"
    variant = by_config[config]
    assert variant["steps"] == 1 and variant["tiles"] >= sms  # one K step each, every SM busy
    analysis = aot.analyse_uncached(variant["spec"], 90)
    assert analysis["ok"], analysis.get("error")
    assert analysis["mma"] in ("wgmma", "mma.sync")
    assert analysis["stack_bytes"] == 0 and analysis["spill_instructions"] == 0
    loop = analysis["k_loop"]
    assert loop is not None and loop["mma"] > 0, "no K loop found"
