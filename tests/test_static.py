"""The static suite (bench/static.py, bench/sass.py, bench/aot.py): SASS parsing on hand-made listings, the
issue-ratio arithmetic by hand, and a real ahead-of-time compile of one layer's candidates for sm_90 and sm_80
checked for sane numbers (no GPU needed)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("triton")
pytest.importorskip("torchvision")

from bench import sass  # noqa: E402

# A loop nest as nvdisasm prints it: an outer loop (.L_x_0 .. 0x0090) around an inner loop with the MMAs
# (.L_x_1 .. 0x0070), plus a spin loop without MMAs (.L_x_2) and a forward branch.
LISTING = """
_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IMAD R2, R3, R4, R5 ;
        /*0020*/               @P0 BRA `(.L_x_3) ;
.L_x_1:
        /*0030*/                   LDGSTS.E.BYPASS.128 [R6], desc[UR4][R8.64] ;
        /*0040*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4].tnspB, R24 ;
        /*0050*/                   ISETP.GE.AND P1, PT, R2, R7, PT ;
        /*0060*/                   SEL R9, R9, RZ, P1 ;
        /*0070*/              @!P1 BRA `(.L_x_1) ;
        /*0080*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0090*/               @P2 BRA `(.L_x_0) ;
.L_x_2:
        /*00a0*/                   NOP ;
        /*00b0*/                   BRA `(.L_x_2) ;
.L_x_3:
        /*00c0*/                   EXIT ;
"""


def test_parse_and_k_loop_pick_the_innermost_mma_loop():
    instrs = sass.parse(LISTING)
    assert len(instrs) == 13
    assert instrs[4].opcode.startswith("HGMMA") and instrs[4].base == "HGMMA"
    assert sorted(sass.loops(instrs)) == [(1, 9), (3, 7), (10, 11)]
    loop = sass.k_loop(instrs)
    assert loop["instructions"] == 5 and loop["mma"] == 1 and loop["ldgsts"] == 1
    assert (loop["start_address"], loop["end_address"]) == (0x30, 0x70)
    assert loop["isetp"] == 1 and loop["sel"] == 1
    assert sass.mma_kind(instrs) == "wgmma" and sass.async_loads(instrs) == "cp.async"


def test_no_mma_means_no_k_loop():
    instrs = sass.parse(LISTING.replace("HGMMA.64x128x16.F32", "FFMA"))
    assert sass.k_loop(instrs) is None
    assert sass.mma_kind(instrs) == "none"
    hmma = sass.parse(LISTING.replace("HGMMA.64x128x16.F32", "HMMA.16816.F32"))
    assert sass.mma_kind(hmma) == "mma.sync" and sass.k_loop(hmma)["instructions"] == 5
    sync = sass.parse(LISTING.replace("LDGSTS.E.BYPASS.128", "LDG.E.128"))
    assert sass.async_loads(sync) == "sync"
    assert sass.async_loads(sync, "cp.async.bulk.tensor.4d.shared::cluster.global") == "tma"


def test_resource_usage_parse():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _conv_gemm_kernel:\n"
            "  REG:229 STACK:72 SHARED:1024 LOCAL:0 CONSTANT[0]:712 TEXTURE:0\n")
    assert sass.parse_resource_usage(text) == {"registers": 229, "stack": 72, "shared_static": 1024, "local": 0}
    with pytest.raises(ValueError, match="REG"):
        sass.parse_resource_usage("nothing here")


def test_issue_ratio_by_hand():
    # 215 loop instructions x 8 warps / 4 schedulers = 430 issue cycles; 2*128*128*64 / 4096 = 512 MMA cycles.
    assert sass.issue_ratio(215, 8, 128, 128, 64, 4096) == pytest.approx(430 / 512)
    # Ampere: half the tensor-core rate, so the same loop is half the ratio.
    assert sass.issue_ratio(215, 8, 128, 128, 64, 2048) == pytest.approx(430 / 1024)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """ResNet-50 layer1.0.conv1 (64->64 1x1 at 56x56, batch 32): its pruned candidates compiled for sm_90."""
    from bench import static

    cache = str(tmp_path_factory.mktemp("static-cache"))
    result = static.run(90, nets=("resnet50",), batches=(32,), layers=["layer1.0.conv1"], cache_dir=cache, jobs=1)
    return result, cache


def test_static_report_numbers_are_sane(one_layer):
    result, _ = one_layer
    assert result["failed"] == 0 and len(result["layers"]) == 1
    layer = result["layers"][0]
    assert layer["kernel"] == "gemm" and layer["path"] == "1x1" and layer["split_k"] == 1
    assert (layer["M"], layer["N"], layer["K"]) == (32 * 56 * 56, 64, 64)
    assert layer["variants"], "the autotuner keeps no config?"
    for v in layer["variants"]:
        assert v["ok"], v.get("error")
        assert 0 < v["registers"] <= 255 and v["shared_bytes"] > 0 and v["stack_bytes"] >= 0
        loop = v["k_loop"]
        assert loop and loop["instructions"] > loop["mma"] > 0, v
        assert v["issue_ratio"] > 0
        # Hopper: 64-row tiles and up use warpgroup MMA (a warpgroup's tile is 64 rows), smaller ones mma.sync.
        block_m = int(v["config"].removeprefix("tma ").split("x")[0])
        assert v["mma"] == ("wgmma" if block_m >= 64 else "mma.sync"), v["config"]
        assert v["async_loads"] in ("cp.async", "tma", "tma+cp.async")
        assert v["async_loads"] != "cp.async" if v["family"] == "tma" else v["async_loads"] == "cp.async"
        assert v["est_us"] > 0
    # a stride-1 1x1 layer with 16-byte channel rows: the TMA kernel's configs are candidates too
    assert {v["family"] for v in layer["variants"]} == {"pointer", "tma"} and layer["tma_candidates"] > 0
    best = next(v for v in layer["variants"] if v["config"] == layer["best"])
    assert best["est_us"] == min(v["est_us"] for v in layer["variants"] if not v["stack_bytes"])
    for family in ("pointer", "tma"):
        config, ratio, est = layer[f"best_{family}"]
        assert config.startswith("tma") == (family == "tma") and ratio > 0 and est >= best["est_us"]
    roof = layer["roofline"]
    assert roof["bound"] == "memory"  # a 1x1 64->64 layer does 32 FLOP per byte, far under the ridge


def test_static_plan_runs_sub_wave_layers_on_every_sm():
    """The static plan follows the launcher's schedule: ResNet-50 layer3/4 3x3 at batch 32 on sm_90's 132 SMs
    (0.74 / 0.39 waves of 128x128 tiles) run stream-K on 132 programs, each of which gets a
    slice of floor or ceil(units / 132) K steps (the kernel's balanced slicing: every SM busy); their TMA
    candidates are the TMA stream-K kernel's on the same programs (never the data-parallel TMA grid);
    stride-2 3x3 layers have no TMA candidate; a stride-1 3x3 layer that stays data-parallel has the
    data-parallel TMA kernel's."""
    from bench import static

    planned = static._plan_layers(["resnet50"], [32], "float16", 90,
                                  layers=["layer3.1.conv2", "layer4.1.conv2", "layer4.0.conv2", "layer1.0.conv2"])
    by_name = {case.name: (launch, variants) for case, _, launch, variants in planned}
    for name, dp_waves in (("layer3.1.conv2", 0.74), ("layer4.1.conv2", 0.39)):
        launch, variants = by_name[name]
        assert launch["schedule"] == "stream-K 132" and launch["dp_waves_128"] == dp_waves
        pointer = [v for v in variants if v["family"] == "pointer"]
        assert pointer and all(v["spec"]["fn"].__name__ == "_conv_streamk_kernel" for v in pointer)
        tma = [v for v in variants if v["family"] == "tma"]
        assert tma and all(v["schedule"]["kind"] == "stream_k"
                           and v["spec"]["fn"].__name__ == "_conv_kxk_tma_streamk_kernel" for v in tma)
        for v in pointer + tma:  # a program's share of all tiles' K steps, as the kernel splits them
            units = v["schedule"]["tile_count"] * v["schedule"]["k_tile"]
            # balanced slices: the longest is ceil(units / 132), and every program has work
            assert v["steps"] == -(-units // 132) and v["tiles"] == min(132, units) == 132
        for v in tma:
            assert v["block"][0] * v["block"][1] <= v["spec"]["constexprs"]["WS_TILE"]
        assert launch["achievable_waves"] == 1.0
    assert not any(v["family"] == "tma" for v in by_name["layer4.0.conv2"][1])  # stride-2 3x3: pointer only
    assert by_name["layer1.0.conv2"][0]["schedule"] == "data-parallel"  # 5.9 waves already
    dp_tma = [v for v in by_name["layer1.0.conv2"][1] if v["family"] == "tma"]
    assert dp_tma and all(v["spec"]["fn"].__name__ == "_conv_kxk_tma_kernel" for v in dp_tma)


def test_waves_status_classifies_against_the_achievable_maximum():
    from bench import static

    gemm = {"kernel": "gemm", "achievable_waves": 1.0}
    assert static.waves_status(gemm, {"waves": 1.48}) == "full"
    assert static.waves_status(gemm, {"waves": 0.97}) == "at max"  # split-K 16 x 8 tiles on 132 SMs
    assert static.waves_status(gemm, {"waves": 0.74}) == "short"
    small = {"kernel": "gemm", "achievable_waves": 0.59}
    assert static.waves_status(small, {"waves": 0.59}) == "at max"  # every work unit in flight
    assert static.waves_status(small, {"waves": 0.10}) == "short"
    assert static.waves_status({"kernel": "depthwise"}, {"waves": 0.1}) is None
    assert static.waves_status(gemm, None) is None


def test_static_cache_hit_gives_the_same_analysis(one_layer):
    from bench import static

    result, cache = one_layer
    again = static.run(90, nets=("resnet50",), batches=(32,), layers=["layer1.0.conv1"], cache_dir=cache, jobs=1)
    assert again["compiled_now"] == 0
    strip = lambda layer: json.dumps([{k: v for k, v in r.items() if k != "compile_s"} for r in layer["variants"]],
                                     sort_keys=True)
    assert strip(again["layers"][0]) == strip(result["layers"][0])


def test_static_markdown_has_one_row_per_layer(one_layer, tmp_path):
    from bench import static_report

    result, _ = one_layer
    result = dict(result, environment={"date": "2026-01-01", "triton": "x", "torch": "y", "git_commit": "z",
                                       "command": "python -m bench --suite static"})
    json_path, md_path = static_report.write(result, str(tmp_path), "2026-01-01")
    assert os.path.basename(os.path.dirname(md_path)) == "static-sm90"
    md = open(md_path).read()
    rows = [ln for ln in md.splitlines() if ln.startswith("| resnet50 |")]
    assert len(rows) == 1 and result["layers"][0]["best"] in rows[0]
    assert json.load(open(json_path))["target"] == "sm_90"


def test_sm80_compiles_to_mma_sync():
    from bench import aot, static
    from bench.shapes import layer_cases

    case = next(c for c in layer_cases("resnet50") if c.name == "layer1.0.conv2")
    _, variants = static.gemm_variants(case, 32, "float16", static.TARGETS[80]["sms"])
    spec = next(v for v in variants if v["num_warps"] == 4)["spec"]
    analysis = aot.analyse(spec, 80, cache_dir=None)
    assert analysis["ok"], analysis.get("error")
    assert analysis["mma"] == "mma.sync" and analysis["registers"] > 0
    assert analysis["k_loop"]["instructions"] > analysis["k_loop"]["mma"] > 0


# A K loop of three steps the compiler unrolled (the 3x3 RGB stem): no backward branch, one HGMMA group per step.
UNROLLED = """
_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, R5 ;
        /*0020*/                   LDG.E.U16 R6, desc[UR4][R8.64] ;
        /*0030*/                   STS.U16 [R9], R6 ;
        /*0040*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4].tnspB, R24, gsb0 ;
        /*0050*/                   LDG.E.U16 R6, desc[UR4][R10.64] ;
        /*0060*/                   STS.U16 [R9], R6 ;
        /*0070*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4].tnspB, R24, gsb0 ;
        /*0080*/                   LDG.E.U16 R6, desc[UR4][R12.64] ;
        /*0090*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4].tnspB, R24 ;
        /*00a0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4].tnspB, R24, gsb0 ;
        /*00b0*/                   EXIT ;
"""


def test_unrolled_k_loop_is_measured_per_step():
    loop = sass.k_loop(sass.parse(UNROLLED))
    # first global load (0x20) to last HGMMA (0xa0): 9 instructions over 3 steps (HGMMAs carrying gsb0)
    assert loop["unrolled"] and loop["steps"] == 3 and loop["span_instructions"] == 9
    assert loop["instructions"] == 3 and loop["mma"] == 4 and loop["ldg"] == 3
    # one group only: nothing to average over, and mma.sync has no group marker: no loop reported
    single = UNROLLED.replace(", gsb0", "")
    assert sass.k_loop(sass.parse(single)) is None
    assert sass.k_loop(sass.parse(UNROLLED.replace("HGMMA.64x64x16.F32", "HMMA.16816.F32"))) is None
