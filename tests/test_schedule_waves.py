"""The schedule rule (kernels/schedule.py): full waves where the work allows, honest costs where it does not.

Pure functions of the shape and the SM count, checked on the ResNet-50 / MobileNetV2 fp16 layers the static
report rates (132 SMs): the sub-wave stage 3/4 3x3 layers at batch 32 and the long-K layers at batch 1 get a
schedule that fills the GPU; full layers stay data-parallel; a layer with fewer work units than SMs is rated
against what it can reach (`achievable_waves`), never above it; splitting a bandwidth-bound layer is not
modelled as free; and the rule never takes an option its own model rates more than FILL_TOLERANCE slower than
the fastest. The interpreter tests of the schedules it picks are in test_streamk_waves_interpret.py.
"""

from __future__ import annotations

import pytest

from fusedconv.kernels import schedule

SMS = 132


def _layer(batch, hw, cin, cout, kh, stride=1):
    """(m, cout_g, groups, k_iters, nbytes) of an fp16 conv as the launcher plans it (BLOCK_K 64)."""
    oh = hw // stride
    m = batch * oh * oh
    k_iters = kh * kh * -(-cin // 64)
    return m, cout, 1, k_iters, schedule.layer_bytes(m, cout, 1, k_iters, input_k=cin)


def _choose(layer, sms=SMS):
    m, n, g, k, nbytes = layer
    return schedule.choose_schedule(m, n, g, k, sms, nbytes=nbytes)


def _waves_of(layer, kind, value, sms=SMS):
    """Fraction of the SMs the chosen schedule keeps busy, at the best tile the model gives it."""
    m, n, g, k, nbytes = layer
    options = schedule.schedule_options(m, n, g, k, sms, nbytes=nbytes)
    return schedule.pick(options, schedule.achievable_waves(m, n, g, k, sms))["waves"]


# ResNet-50 layers: (batch, input hw, cin, cout, kernel, stride)
STAGE34_B32 = {"layer3.x.conv2": (32, 14, 256, 256, 3), "layer4.x.conv2": (32, 7, 512, 512, 3),
               "layer4.1.conv1": (32, 7, 2048, 512, 1)}
LONG_K_B1 = {"layer3.1.conv2": (1, 14, 256, 256, 3), "layer4.1.conv2": (1, 7, 512, 512, 3),
             "layer4.1.conv1": (1, 7, 2048, 512, 1), "layer4.0.downsample": (1, 7, 1024, 2048, 1),
             "mbv2 features.15.conv.2": (1, 7, 960, 160, 1), "mbv2 features.17.conv.2": (1, 7, 960, 320, 1)}


@pytest.mark.parametrize("name", sorted(STAGE34_B32))
def test_sub_wave_batch32_layers_get_stream_k(name):
    layer = _layer(*STAGE34_B32[name])
    kind, value = _choose(layer)
    assert (kind, value) == ("stream_k", SMS)
    # the kernel's balanced slices keep every program busy (layer3.x.conv2: 98 tiles x 36 steps = 3528 units,
    # 96 programs of 27 and 36 of 26; equal slices of 27 left the last program without work)
    assert _waves_of(layer, kind, value) == 1.0


@pytest.mark.parametrize("name", sorted(LONG_K_B1))
def test_long_k_batch1_layers_fill_the_gpu(name):
    layer = _layer(*LONG_K_B1[name])
    kind, value = _choose(layer)
    assert kind == "stream_k" or value > 1, "a long-K batch-1 layer must not run a plain sub-wave grid"
    m, n, g, k, _ = layer
    assert schedule.fills(_waves_of(layer, kind, value), schedule.achievable_waves(m, n, g, k, SMS))


@pytest.mark.parametrize("layer", [(32, 56, 64, 64, 3), (32, 56, 64, 256, 1), (32, 28, 128, 512, 1),
                                   (32, 224, 3, 64, 7, 2)])
def test_layers_with_many_waves_stay_data_parallel(layer):
    assert _choose(_layer(*layer)) == ("split_k", 1)


def test_achievable_waves_counts_work_units_of_the_smallest_tile():
    # MobileNetV2 features.7.conv.2 at batch 1: M=196, N=64, K=384 (6 steps): 16x64 tiles -> 13 tiles x 6
    # steps = 78 work units on 132 SMs.
    assert schedule.achievable_waves(196, 64, 1, 6, SMS) == pytest.approx(78 / SMS)
    assert schedule.achievable_waves(6272, 256, 1, 36, SMS) == 1.0
    assert schedule.achievable_waves(196, 64, 1, 6, 0) == 0.0
    # the rule's pick never claims more of the GPU than the layer has work for
    layer = (196, 64, 1, 6, schedule.layer_bytes(196, 64, 1, 6, input_k=384))
    m, n, g, k, nbytes = layer
    best = schedule.pick(schedule.schedule_options(m, n, g, k, SMS, nbytes=nbytes),
                         schedule.achievable_waves(m, n, g, k, SMS))
    assert best["waves"] <= schedule.achievable_waves(m, n, g, k, SMS) + 1e-12


def test_splitting_a_bandwidth_bound_layer_is_not_free():
    # A 1x1 with a short K over a huge M (MobileNetV2 features.2.conv.0.0 at batch 32): the bytes bound it,
    # and a split adds its fp32 workspace round trip.
    m, n, k = 401408, 96, 1
    nbytes = schedule.layer_bytes(m, n, 1, k, input_k=16)
    one = schedule.estimate_time(m, n, 1, k, SMS, 1, nbytes=nbytes)[0]
    assert one >= nbytes / schedule._HBM_BYTES_PER_S
    m, n, k = 25088, 512, 4  # a K long enough to split
    nbytes = schedule.layer_bytes(m, n, 1, k, input_k=256)
    t1 = schedule.estimate_time(m, n, 1, k, SMS, 1, nbytes=nbytes)[0]
    t2 = schedule.estimate_time(m, n, 1, k, SMS, 2, nbytes=nbytes)[0]
    assert t2 > t1
    assert schedule.choose_schedule(m, n, 1, k, SMS, nbytes=nbytes) == ("split_k", 1)


def test_stream_k_pays_for_shared_tiles():
    assert schedule.streamk_fixup_s(128, 128, 36, 36, SMS) == 0.0  # whole tiles: nothing to read back
    one = schedule.streamk_fixup_s(64, 64, 36, 18, SMS)
    many = schedule.streamk_fixup_s(64, 64, 36, 4, SMS)
    assert 0.0 < one < many


def test_short_k_never_splits_below_the_minimum_slice():
    for k in (1, 2, 3):
        opts = schedule.schedule_options(3136, 64, 1, k, SMS)
        assert all(o["value"] == 1 for o in opts if o["kind"] == "split_k")
        assert (k >= schedule.STREAMK_MIN_K_ITERS) == any(o["kind"] == "stream_k" for o in opts)


@pytest.mark.parametrize("layer", list(STAGE34_B32.values()) + list(LONG_K_B1.values())
                         + [(1, 56, 64, 64, 1), (1, 14, 1024, 256, 1), (1, 7, 576, 160, 3), (32, 14, 1024, 256, 1)])
def test_the_rule_stays_within_its_tolerance_of_the_fastest(layer):
    m, n, g, k, nbytes = _layer(*layer)
    options = schedule.schedule_options(m, n, g, k, SMS, nbytes=nbytes)
    best = schedule.pick(options, schedule.achievable_waves(m, n, g, k, SMS))
    fastest = min(o["time"] for o in options)
    assert best["time"] <= fastest * schedule.FILL_TOLERANCE
    if not schedule.fills(best["waves"], schedule.achievable_waves(m, n, g, k, SMS)):
        # nothing that fills is within the tolerance: then the fastest option runs
        assert best["time"] <= fastest / schedule._CLEAR_WIN


def test_the_rule_depends_on_the_sm_count():
    layer = _layer(*STAGE34_B32["layer3.x.conv2"])
    assert _choose(layer, 98) == ("split_k", 1)  # 98 tiles of 128x128: exactly one full wave
    # 16 SMs (the same total peak: each SM 8x faster, so its K steps are latency-bound): two stream-K programs
    # per SM overlap their load latencies, which four rounds of 128x128 tiles (98 on 32 slots) do not beat
    assert _choose(layer, 16) == ("stream_k", 32)
    assert _choose(layer, 132) == ("stream_k", 132)
    assert _choose(layer, 0) == ("split_k", 1)
    m, n, g, k, nbytes = layer
    assert schedule.choose_schedule(m, n, g, k, 0) == ("split_k", 1)


def test_model_tiles_are_capped_like_the_config_pruning():
    assert schedule.model_tiles(49, 24) == [(64, 32), (32, 32), (16, 32)]
    assert (128, 128) in schedule.model_tiles(6272, 256)


def test_resident_programs_from_shared_memory_and_registers():
    assert schedule.resident_programs(40 * 1024, 96, 4) == 5  # 16x64 tile, 4 stages: smem-bound
    assert schedule.resident_programs(160 * 1024, 240, 8) == 1  # 128x256 tile: one per SM
    assert schedule.resident_programs(8 * 1024, 32, 1) == schedule._MAX_RESIDENT
    assert schedule.resident_programs(40 * 1024, 96, 4, smem_per_sm=80 * 1024) == 2


def test_co_resident_small_tiles_share_one_round():
    # ResNet-50 layer1.0.conv1 at batch 1 (M 3136, N 64, one K step): 196 tiles of 16x64 fit 132 SMs at two
    # per SM, so they cost one round — not the two waves a one-program-per-SM model would charge.
    one_round = schedule.estimate_time(3136, 64, 1, 1, SMS, 1, tiles=((16, 64),))[0]
    single = schedule.estimate_time(3136, 64, 1, 1, 196, 1, tiles=((16, 64),))[0]  # one program per SM
    assert one_round == pytest.approx(single, rel=0.05)


def test_the_launcher_offers_no_data_parallel_tma_kernel_where_the_rule_chose_another_schedule():
    """Split-K: no TMA candidate (the pointer split runs); stream-K: the TMA kernels' stream-K form on the same
    programs, never the data-parallel TMA grid (more cases in test_kernel_tma_streamk_interpret.py)."""
    import importlib

    import torch

    from fusedconv.kernels import pack_weight

    launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")
    assert launcher._tma_candidate({"flags": {}, "split_k": 4, "streamk_programs": 0}, *([None] * 12)) is None
    x = torch.zeros(1, 32, 6, 6, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    for w, padding in ((pack_weight(torch.zeros(16, 32, 1, 1, dtype=torch.float16)), (0, 0)),
                       (pack_weight(torch.zeros(16, 32, 3, 3, dtype=torch.float16)), (1, 1))):
        plan = launcher._plan(tuple(x.shape), x.stride(), x.dtype, x.device, tuple(w.shape), w.stride(), w.dtype,
                              (16,), (16,), None, (1, 1), padding, (1, 1), 1, "relu", 0.0, None, False, True, 132)
        assert plan["streamk_programs"] == 132
        launch = launcher._tma_candidate(plan, x, w, None, None, None, None, 1, (1, 1), padding, (1, 1), 0.0, False)
        assert launch is not None and launch.__name__.endswith("_streamk")


# MobileNetV2 / ResNet-50 / RepVGG-A0 layers at batch 1 with short K whose plain grid fills under 0.9 of the
# GPU: (m, cout, k_iters of 64 channels, input channels) as the static report plans them.
SHORT_K_B1 = {"mbv2 features.4.conv.2": (784, 32, 3, 144), "mbv2 features.5.conv.2": (784, 32, 3, 192),
              "mbv2 features.7.conv.2": (196, 64, 3, 192), "mbv2 features.12.conv.0.0": (196, 576, 2, 96),
              "mbv2 features.15.conv.0.0": (49, 960, 3, 160), "mbv2 features.18.0": (49, 1280, 5, 320),
              "mbv2 features.2.conv.2": (3136, 24, 2, 96), "repvgg stages.2.0 3x3/s2": (196, 192, 18, 96)}


def _short_k(name):
    m, n, k, cin = SHORT_K_B1[name]
    return m, n, 1, k, schedule.layer_bytes(m, n, 1, k, input_k=cin)


@pytest.mark.parametrize("name", sorted(SHORT_K_B1))
def test_short_k_batch1_layers_fill_as_far_as_their_work_allows(name):
    layer = _short_k(name)
    m, n, g, k, nbytes = layer
    kind, value = _choose(layer)
    reach = schedule.achievable_waves(m, n, g, k, SMS)
    assert schedule.fills(_waves_of(layer, kind, value), reach), (kind, value)
    options = schedule.schedule_options(m, n, g, k, SMS, nbytes=nbytes)
    # filling is preferred only within FILL_TOLERANCE of the plain grid (features.18.0: +6 %)
    assert schedule.pick(options, reach)["time"] <= options[0]["time"] * schedule.FILL_TOLERANCE


def test_a_few_more_units_than_sms_run_one_k_step_per_program():
    # features.4.conv.2: 49 tiles of 16x32 x 3 K steps = 147 units. 132 programs would run 2-step slices
    # that straddle tiles (two pipeline starts); 147 programs of one step, two per SM on 15 SMs, pay one.
    layer = _short_k("mbv2 features.4.conv.2")
    assert _choose(layer) == ("stream_k", 147)
    m, n, g, k, nbytes = layer
    one_step = schedule.estimate_streamk_time(m, n, g, k, SMS, nbytes=nbytes, tiles=((16, 32),), programs=147)[0]
    two_step = schedule.estimate_streamk_time(m, n, g, k, SMS, nbytes=nbytes, tiles=((16, 32),), programs=SMS)[0]
    assert one_step < two_step
    # programs beyond what one round holds pay a second round
    assert schedule.estimate_streamk_time(m, n, g, k, 8, nbytes=nbytes, tiles=((16, 32),), programs=147)[0] > \
        schedule.estimate_streamk_time(m, n, g, k, 8, nbytes=nbytes, tiles=((16, 32),), programs=16)[0] / 2


def _kernel_slices(units, k, programs):
    """The stream-K kernel's slicing (conv_streamk.streamk_slice: the first units % programs programs get one
    unit more than the others), walked unit by unit: the longest slice, and per busy program the tiles it
    touches and which of its segments cover a whole tile."""
    base, extra = divmod(units, programs)
    per_prog = base + (extra > 0)
    out = []
    for p in range(programs):
        start = p * base + min(p, extra)
        mine = list(range(start, start + base + (p < extra)))
        if mine:
            tiles = sorted({u // k for u in mine})
            out.append((tiles, [t for t in tiles if sum(1 for u in mine if u // k == t) < k]))
    return per_prog, out


@pytest.mark.parametrize("units,k,programs", [(147, 3, 147), (147, 3, 132), (39, 3, 132), (3528, 36, 132),
                                              (400, 5, 200), (75, 3, 147), (8, 8, 3), (96, 4, 24), (7, 1, 3),
                                              (1001, 7, 150), (5005, 13, 264), (52 * 1568, 1568, 132)])
def test_streamk_slices_match_the_kernels_slicing(units, k, programs):
    per_prog, walked = _kernel_slices(units, k, programs)
    slices = schedule.streamk_slices(units, k, programs)
    assert slices["per_prog"] == per_prog and slices["busy"] == len(walked)
    assert slices["segments"] == sum(len(partial) for _, partial in walked)
    most = max(len(tiles) for tiles, _ in walked)
    # the bound holds for any slice offset: at least what this tiling touches, at most one tile more
    assert most <= slices["touched"] <= most + 1
    assert slices["touched"] == min(-(-units // k), -(-(per_prog - 1) // k) + 1)
    if per_prog == 1:
        assert slices["touched"] == 1


@pytest.mark.parametrize("batch,hw,cin,cout,kh,stride", [
    (1, 28, 144, 32, 1, 1), (1, 14, 96, 576, 1, 1), (1, 7, 160, 960, 1, 1), (1, 7, 320, 1280, 1, 1),
    (1, 56, 96, 24, 1, 1), (1, 14, 256, 256, 3, 1), (1, 7, 2048, 512, 1, 1), (32, 14, 256, 256, 3, 1),
    (32, 7, 512, 512, 3, 1), (1, 3, 64, 40, 3, 1), (1, 1, 16, 8, 1, 1), (1, 2, 1024, 16, 1, 1)])
@pytest.mark.parametrize("sms", [2, 16, 132])
def test_every_option_is_one_the_kernels_can_run(batch, hw, cin, cout, kh, stride, sms):
    """No option with a split slice under the minimum (never an empty one), a stream-K program count under 1
    or over _STREAMK_PROGRAMS_PER_SM per SM, or a stream-K tile over the workspace slot; every stream-K
    program count leaves some program work at every model tile."""
    m, n, g, k, nbytes = _layer(batch, hw, cin, cout, kh, stride)
    for o in schedule.schedule_options(m, n, g, k, sms, nbytes=nbytes):
        if o["kind"] == "split_k":
            assert o["value"] == 1 or k // o["value"] >= schedule._MIN_SPLIT_STEPS >= 1
        else:
            assert k >= schedule.STREAMK_MIN_K_ITERS
            assert 1 <= o["value"] <= schedule._STREAMK_PROGRAMS_PER_SM * sms
            assert o["tile"][0] * o["tile"][1] <= schedule.STREAMK_MAX_TILE
            for bm, bn in schedule.model_tiles(m, n):
                units = schedule.work_units(m, n, g, k, bm, bn)
                slices = schedule.streamk_slices(units, k, o["value"])
                assert slices["per_prog"] >= 1 and 1 <= slices["busy"] <= o["value"]
        assert 0.0 < o["waves"] <= 1.0 and o["time"] > 0.0


def test_streamk_program_counts_stay_within_two_per_sm():
    counts = schedule.streamk_program_counts(784, 32, 1, 3, SMS)
    assert counts[0] == SMS and 147 in counts and max(counts) <= 2 * SMS
    # a layer with fewer units than SMs only gets the one-per-SM count (its slices are single steps already)
    assert schedule.streamk_program_counts(196, 64, 1, 3, SMS) == [SMS]
