"""Where the schedule model leaves a layer short of the GPU, a GPU decides (kernels/schedule.py, the launcher).

The rule fixes a schedule from an uncalibrated model; on the batch-32 layers the static report lists as short,
it rates every filling schedule slower than a grid that leaves SMs idle. `schedule.schedule_candidates` then
adds the fastest filling stream-K schedule, which the launcher times at warm-up beside the rule's pick
("streamk" candidate of variant_choice). CPU tests check the candidate list for those layers (the planning
functions and the launcher's plan, 132 SMs), that the rule's own pick is unchanged, and that layers whose pick
fills get no extra candidate; the `gpu` test runs the warm-up on a real device against float64.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fusedconv.kernels import conv_plan, schedule, variant_choice
from test_kernel_interpret import ConvCase, run_case
from test_schedule_waves import _layer

SMS = 132


# The batch-32 layers the static report (sm_90) lists as short: (batch, input hw, cin, cout, kernel, stride)
SHORT_B32 = {
    "resnet50 layer3.1.conv1": (32, 14, 1024, 256, 1),
    "resnet50 layer4.0.conv1": (32, 14, 1024, 512, 1),
    "resnet50 layer4.0.downsample.0": (32, 14, 1024, 2048, 1, 2),
    "repvgg_a0 stages.2.0": (32, 28, 96, 192, 3, 2),
    "mobilenet_v2 features.8.conv.0.0": (32, 14, 64, 384, 1),
    "mobilenet_v2 features.15.conv.0.0": (32, 7, 160, 960, 1),
}
# Of those, the ones whose rule pick does not fill at the model's own tile: a filling stream-K option is timed.
# (The other three fill at the model's 128x128 tile; they are short only at the 256x128 / 128x256 tile the
# static estimate prefers, and the autotuner times both tiles on a GPU.)
TIMED_STREAMK = {"resnet50 layer3.1.conv1": 132, "repvgg_a0 stages.2.0": 132,
                 "mobilenet_v2 features.15.conv.0.0": 200}


@pytest.mark.parametrize("name", sorted(SHORT_B32))
def test_short_layers_get_their_filling_streamk_schedule_as_a_candidate(name):
    m, n, g, k, nbytes = _layer(*SHORT_B32[name])
    cands = schedule.schedule_candidates(m, n, g, k, SMS, nbytes=nbytes)
    reach = schedule.achievable_waves(m, n, g, k, SMS)
    # the rule's pick is first and is what choose_schedule returns: the candidate list does not change it
    assert (cands[0]["kind"], cands[0]["value"]) == schedule.choose_schedule(m, n, g, k, SMS, nbytes=nbytes)
    if name in TIMED_STREAMK:
        assert not schedule.fills(cands[0]["waves"], reach)
        assert len(cands) == 2 and cands[1]["kind"] == "stream_k" and cands[1]["value"] == TIMED_STREAMK[name]
        assert schedule.fills(cands[1]["waves"], reach)
        # the model rates it slower (that is why the rule did not take it): the GPU decides
        assert cands[1]["time"] > cands[0]["time"]
        assert schedule.filling_streamk(m, n, g, k, SMS, nbytes=nbytes) == TIMED_STREAMK[name]
        # it is the fastest stream-K option that fills
        options = schedule.schedule_options(m, n, g, k, SMS, nbytes=nbytes)
        assert cands[1]["time"] == min(o["time"] for o in options
                                       if o["kind"] == "stream_k" and schedule.fills(o["waves"], reach))
    else:
        assert schedule.fills(cands[0]["waves"], reach) and len(cands) == 1
        assert schedule.filling_streamk(m, n, g, k, SMS, nbytes=nbytes) == 0


@pytest.mark.parametrize("layer", [(32, 14, 256, 256, 3), (32, 56, 64, 64, 3), (1, 7, 2048, 512, 1)],
                         ids=["layer3_conv2_streamk", "layer1_conv2_full", "b1_layer4_conv1"])
def test_layers_whose_pick_fills_get_no_extra_candidate(layer):
    m, n, g, k, nbytes = _layer(*layer)
    assert len(schedule.schedule_candidates(m, n, g, k, SMS, nbytes=nbytes)) == 1
    assert schedule.filling_streamk(m, n, g, k, SMS, nbytes=nbytes) == 0


def test_no_candidates_without_sms_or_work():
    assert schedule.schedule_candidates(6272, 256, 1, 16, 0) == []
    assert schedule.schedule_candidates(0, 256, 1, 16, SMS) == []
    assert schedule.filling_streamk(6272, 256, 1, 16, 0) == 0


def _plan(n, cin, hw, cout, k, stride=1, **pins):
    x_shape, w_shape = (n, cin, hw, hw), (cout, cin, k, k)
    x_stride = (cin * hw * hw, 1, hw * cin, cin)  # channels_last
    w_stride = (cin * k * k, 1, k * cin, cin)
    pad = k // 2
    return conv_plan._plan(x_shape, x_stride, torch.float16, torch.device("cpu"), w_shape, w_stride,
                           torch.float16, (cout,), (cout,), None, (stride, stride), (pad, pad), (1, 1), 1, "silu",
                           0.0, pins.get("split_k"), False, True, pins.get("stream_k"),
                           sm_count=lambda device: SMS)


def test_the_launchers_plan_names_the_filling_schedule():
    plan = _plan(32, 1024, 14, 256, 1)  # resnet50 layer3.1.conv1
    assert plan["split_k"] == 1 and plan["streamk_programs"] == 0 and plan["filling_streamk"] == 132
    assert _plan(32, 160, 7, 960, 1)["filling_streamk"] == 200  # mobilenet_v2 features.15.conv.0.0
    assert _plan(32, 256, 14, 256, 3)["filling_streamk"] == 0  # layer3 conv2: the rule's stream-K fills
    # a schedule the caller pins is not second-guessed
    assert _plan(32, 1024, 14, 256, 1, split_k=1)["filling_streamk"] == 0
    assert _plan(32, 1024, 14, 256, 1, stream_k=False)["filling_streamk"] == 0
    assert _plan(32, 1024, 14, 256, 1, stream_k=64)["filling_streamk"] == 0


@pytest.mark.gpu
def test_warmup_times_the_filling_streamk_schedule_on_a_gpu(monkeypatch):
    """ResNet-50 layer3.1.conv1 at batch 32: the launcher offers and times "streamk" where this GPU's SM
    count leaves the rule's pick short, keeps one of the agreeing candidates, and both schedules match
    float64."""
    launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")
    case = ConvCase("resnet50_layer3.1.conv1", 32, 1024, 14, 14, 256, (1, 1))
    sms = conv_plan._num_sms(torch.device("cuda"))
    m, n, g, k, nbytes = _layer(32, 14, 1024, 256, 1)
    programs = schedule.filling_streamk(m, n, g, k, sms, nbytes=nbytes)
    if not programs:
        pytest.skip(f"the rule's schedule fills this GPU's {sms} SMs for this layer")
    monkeypatch.setattr(variant_choice, "_choices", {})
    monkeypatch.setattr(variant_choice, "_loaded", {})
    offered = []
    real_choose = variant_choice.choose

    def spy(key, candidates, device, output=None):
        offered.append(sorted(candidates))
        return real_choose(key, candidates, device, output=output)

    monkeypatch.setattr(variant_choice, "choose", spy)
    launcher._plan_cached.cache_clear()
    run_case(case, torch.float16, "channels_last", "silu", True, device="cuda")
    assert offered and "streamk" in offered[0], offered
    assert set(variant_choice.chosen().values()) <= {"pointer", "tma", "streamk"}
    assert len(variant_choice.chosen()) == 1
    # the filling schedule itself, pinned, against float64
    run_case(case, torch.float16, "channels_last", "silu", True, device="cuda", stream_k=programs)
