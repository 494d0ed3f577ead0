"""Config-space rules of the implicit-GEMM kernel (kernels/configs.py), in-process, no kernel runs.

* Safety: spatial (non-1x1) configs never run with more than SPATIAL_MAX_WARPS warps — Triton has miscompiled
  the flattened (kh, kw, c) K loop at 8 warps (triton#1254, pytorch#173068) — neither from the autotuner's
  pruning nor in the ahead-of-time variant list; 1x1 GEMMs keep their 8-warp tiles.
* Capping: tiles are capped to the problem instead of dropped, so small-channel layers (MobileNetV2's 16 / 24
  output channels) keep real candidates; the small-Cin_g loops get at most 64-row tiles, the row-K loop its
  fixed K width.
* Split-K: the rule is a deterministic function of shape and SM count, splits batch-1 late-stage layers,
  leaves layers whose tiles already fill the GPU alone and never picks a split its own model rates slower.
* Plan: the launcher's plan carries the rule's stream-K program count, more programs than SMs included.
"""

from __future__ import annotations

import pytest
import torch

from fusedconv.kernels import configs as kconfigs

FP16 = torch.empty(0, dtype=torch.float16)


def _prune(**problem):
    args = dict(x_ptr=FP16, KH=3, KW=3, IS_1X1=False, ROW_K=False, FLAT_K=False, ROW_WIDTH=16)
    args.update(problem)
    return kconfigs.prune_configs(kconfigs.all_autotune_configs(), args)


def _tiles(cfgs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in cfgs}


@pytest.mark.parametrize("m,cin,cout", [(6272, 256, 256), (100352, 64, 64), (1568, 512, 512), (49, 512, 512)])
def test_spatial_configs_run_at_most_4_warps(m, cin, cout):
    spatial = _prune(M=m, CIN_G=cin, COUT_G=cout)
    assert spatial and max(c.num_warps for c in spatial) <= kconfigs.SPATIAL_MAX_WARPS
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128 for c in spatial)  # no spilling 4-warp tile
    for flag in ("ROW_K", "FLAT_K"):
        small = _prune(M=m, CIN_G=3, COUT_G=cout, KH=7, KW=7, ROW_WIDTH=32, **{flag: True})
        assert small and max(c.num_warps for c in small) <= kconfigs.SPATIAL_MAX_WARPS


def test_1x1_keeps_8_warp_tiles():
    gemm = _prune(M=100352, CIN_G=256, COUT_G=256, KH=1, KW=1, IS_1X1=True)
    assert any(c.num_warps == 8 for c in gemm)
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 256 for c in gemm)


def test_aot_spatial_variants_obey_the_warp_rule():
    variants = [v for v in kconfigs.aot_variants() if v["fn"].__name__ == "_conv_gemm_kernel"]
    spatial = [v for v in variants if not v["constexprs"]["IS_1X1"]]
    assert spatial and all(v["num_warps"] <= kconfigs.SPATIAL_MAX_WARPS for v in spatial), \
        [(v["name"], v["num_warps"]) for v in spatial if v["num_warps"] > kconfigs.SPATIAL_MAX_WARPS]
    assert any(v["num_warps"] == 8 for v in variants if v["constexprs"]["IS_1X1"])


@pytest.mark.parametrize("m,cin,cout,kernel", [
    (32 * 112 * 112, 32, 16, 1),   # MobileNetV2 block 1 projection: Cout 16
    (32 * 56 * 56, 144, 24, 1),    # Cout 24
    (32 * 28 * 28, 24, 144, 1),    # Cin 24: K = 24
    (32 * 7 * 7, 960, 320, 1),
])
def test_small_channel_layers_keep_capped_candidates(m, cin, cout, kernel):
    cfgs = _prune(M=m, CIN_G=cin, COUT_G=cout, KH=kernel, KW=kernel, IS_1X1=kernel == 1)
    cap_n = max(16, 1 << (cout - 1).bit_length())
    cap_k = max(16, 1 << (cin - 1).bit_length())
    assert all(c.kwargs["BLOCK_N"] <= cap_n and c.kwargs["BLOCK_K"] <= cap_k for c in cfgs)
    # Several real candidates, including the large-M tiles the layer's 100k+ rows want (not one fallback).
    assert len(_tiles(cfgs)) >= 3, _tiles(cfgs)
    assert any(c.kwargs["BLOCK_M"] >= 128 for c in cfgs)
    for c in cfgs:
        smem = (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * 2 * c.num_stages
        assert smem <= 160 * 1024


def test_row_k_configs_use_the_row_width_and_64_rows():
    cfgs = _prune(M=32 * 112 * 112, CIN_G=3, COUT_G=64, KH=7, KW=7, ROW_K=True, ROW_WIDTH=32)
    assert cfgs and all(c.kwargs["BLOCK_K"] == 32 and c.kwargs["BLOCK_M"] <= 64 for c in cfgs)
    assert kconfigs.row_width(7, 3, 7) == 32 and kconfigs.row_width(7, 9, 7) == 64
    assert kconfigs.row_width(3, 5, 1) == 16 and kconfigs.row_width(3, 5, 3) == 32  # 1 row of 15; 2 rows
    # several kernel rows per step where they fit 32 columns: the 3x3 RGB stem in one step of 27 -> 32
    assert kconfigs.row_k_rows(3, 3, 3) == 3 and kconfigs.row_width(3, 3, 3) == 32
    assert kconfigs.row_k_rows(7, 7, 3) == 1 and kconfigs.row_k_rows(5, 5, 3) == 2 and kconfigs.row_k_rows(7, 7, 9) == 1


def test_split_k_batch1_late_layers_split():
    # ResNet-50 batch 1, layer4 3x3: M = 49, Cout 512, K = 9 * 512 -> 72 steps of 64.
    assert kconfigs.choose_split_k(49, 512, 1, 72, 132) >= 4
    # layer3 3x3 at batch 1: M = 196, Cout 256, 36 steps.
    assert kconfigs.choose_split_k(196, 256, 1, 36, 132) > 1


@pytest.mark.parametrize("m,cout,k_iters", [(100352, 64, 9), (25088, 512, 2), (6272, 1024, 4), (401408, 64, 3)])
def test_split_k_leaves_full_layers_alone(m, cout, k_iters):
    assert kconfigs.choose_split_k(m, cout, 1, k_iters, 132) == 1


@pytest.mark.parametrize("m,cout,k_iters", [(49, 512, 72), (196, 256, 36), (1568, 512, 72), (6272, 256, 36),
                                            (1568, 2048, 8), (784, 128, 18)])
def test_split_k_is_the_models_best(m, cout, k_iters):
    split = kconfigs.choose_split_k(m, cout, 1, k_iters, 132)
    assert split in (1, 2, 4, 8, 16) and split == kconfigs.choose_split_k(m, cout, 1, k_iters, 132)
    chosen = kconfigs.estimate_time(m, cout, 1, k_iters, 132, split)[0]
    assert chosen <= kconfigs.estimate_time(m, cout, 1, k_iters, 132, 1)[0]
    for other in (2, 4, 8, 16):
        if k_iters // other >= 4:
            assert chosen <= kconfigs.estimate_time(m, cout, 1, k_iters, 132, other)[0] / 0.95 + 1e-12


def test_split_k_scales_with_sm_count():
    # The same batch-1 layer on a small part needs fewer slices to fill it.
    assert kconfigs.choose_split_k(49, 512, 1, 72, 16) <= kconfigs.choose_split_k(49, 512, 1, 72, 132)
    assert kconfigs.choose_split_k(49, 512, 1, 72, 0) == 1


def _plan_b1(cin, hw, cout, sms):
    """The launcher's plan of a batch-1 fp16 channels_last 1x1 conv on a GPU with `sms` SMs."""
    from fusedconv.kernels import conv_plan

    x_shape, w_shape = (1, cin, hw, hw), (cout, cin, 1, 1)
    x_stride = (hw * hw * cin, 1, hw * cin, cin)
    return conv_plan._plan(x_shape, x_stride, torch.float16, torch.device("cpu"), w_shape, (cin, 1, cin, cin),
                           torch.float16, (cout,), (cout,), None, (1, 1), (0, 0), (1, 1), 1, "relu6", 0.0, None,
                           False, True, sm_count=lambda device: sms)


def test_plan_runs_short_k_batch1_layers_on_more_programs_than_sms():
    # MobileNetV2 features.4.conv.2 at batch 1 (M 784, N 32, K 144: 3 K steps): one K step per program
    plan = _plan_b1(144, 28, 32, 132)
    assert (plan["split_k"], plan["streamk_programs"]) == (1, 147)
    # the same channels at 112x112 have many waves of tiles: the plain grid
    plan = _plan_b1(144, 112, 32, 132)
    assert (plan["split_k"], plan["streamk_programs"]) == (1, 0)
