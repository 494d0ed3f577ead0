"""kernels.cudnn_fused: which launches get a cuDNN fused-conv candidate, the fold-once cache, and the candidate's
wiring into the variant choice (probe, agreement check, timing, warnings), on CPU.

cuDNN itself is replaced by fakes that compute relu(conv + bias [+ z]) with F.conv2d on the CPU (or compute it
wrongly, or raise), `can_time` by True and `variant_choice.device_time_ms` by fixed times per candidate, so the
real choice code runs.
The launcher integration runs under the Triton interpreter; the real cuDNN op is compared with float64 in the
`gpu` test at the end.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedconv.kernels import backend_log, cudnn_fused, variant_choice
from fusedconv.kernels.reference import conv_bn_act_ref

CPU = torch.device("cpu")
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


# ------------------------------------------------------------------------------------------- eligibility
@pytest.mark.parametrize("act, dtype, res_dtype, groups, cin, cout, layout, pinned, eligible", [
    ("relu", F16, None, 1, 64, 64, "channels_last", False, True),
    ("relu", F16, F16, 1, 64, 256, "channels_last", False, True),   # act(conv + bias + z): add_relu
    ("relu", F32, None, 1, 3, 64, "nchw", False, True),
    ("relu", BF16, BF16, 2, 64, 64, "nchw", False, True),            # grouped, not depthwise
    ("identity", F16, None, 1, 64, 64, "channels_last", False, False),  # no fused conv + bias in cuDNN
    ("identity", F16, F16, 1, 64, 64, "channels_last", False, False),
    ("relu6", F16, None, 1, 64, 64, "channels_last", False, False),
    ("silu", F16, F16, 1, 64, 64, "channels_last", False, False),
    ("leaky_relu", F32, None, 1, 64, 64, "nchw", False, False),
    ("relu", torch.float64, None, 1, 64, 64, "nchw", False, False),
    ("relu", F16, F32, 1, 64, 64, "channels_last", False, False),   # residual in another dtype
    ("relu", F16, None, 32, 32, 32, "channels_last", False, False),  # depthwise
    ("relu", F16, None, 1, 64, 64, "strided", False, False),
    ("relu", F16, None, 1, 64, 64, "channels_last", True, False),   # split_k / stream_k pinned
])
def test_eligibility(act, dtype, res_dtype, groups, cin, cout, layout, pinned, eligible):
    reason = cudnn_fused.ineligibility(act, dtype, res_dtype, groups, cin, cout, layout, pinned)
    assert (reason is None) == eligible, reason
    if not eligible:
        assert isinstance(reason, str) and reason


def test_layout_of():
    x = torch.randn(2, 8, 5, 5)
    assert cudnn_fused.layout_of(x) == "nchw"
    assert cudnn_fused.layout_of(x.contiguous(memory_format=torch.channels_last)) == "channels_last"
    assert cudnn_fused.layout_of(x[:, :, ::2]) == "strided"


# ------------------------------------------------------------------------------------------- fold cache
def _layer(cout=8, cin=4, k=3, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, k, k, generator=g).to(dtype)
    scale = torch.rand(cout, generator=g) + 0.5
    shift = torch.randn(cout, generator=g)
    return w, scale, shift


def test_fold_is_computed_once_per_version_and_again_after_an_in_place_edit():
    cache = cudnn_fused.FoldCache()
    w, scale, shift = _layer()
    a = cache.get(w, scale, shift, torch.contiguous_format)
    b = cache.get(w, scale, shift, torch.contiguous_format)
    assert cache.folds == 1 and a[0] is b[0]
    torch.testing.assert_close(a[0], w * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(a[1], shift)
    with torch.no_grad():
        w.mul_(2.0)  # in place: the version counter moves
    c = cache.get(w, scale, shift, torch.contiguous_format)
    assert cache.folds == 2
    torch.testing.assert_close(c[0], w * scale.view(-1, 1, 1, 1))
    shift.add_(1.0)
    d = cache.get(w, scale, shift, torch.contiguous_format)
    assert cache.folds == 3
    torch.testing.assert_close(d[1], shift)
    # another memory format is another entry; the folded weight is laid out in it
    e = cache.get(w, scale, shift, torch.channels_last)
    assert cache.folds == 4 and e[0].is_contiguous(memory_format=torch.channels_last)


def test_fold_cache_never_matches_a_new_tensor_by_identity_and_drops_freed_entries():
    cache = cudnn_fused.FoldCache()
    w, scale, shift = _layer()
    cache.get(w, scale, shift, torch.contiguous_format)
    del w
    w2, _, _ = _layer(seed=1)
    got = cache.get(w2, scale, shift, torch.contiguous_format)
    torch.testing.assert_close(got[0], w2 * scale.view(-1, 1, 1, 1))
    assert cache.folds == 2 and len(cache) == 1  # the freed weight's entry is gone


def test_fold_refuses_what_the_dtype_cannot_hold_and_inference_tensors():
    cache = cudnn_fused.FoldCache()
    w, scale, shift = _layer(dtype=F16)
    assert cache.get(w, scale * 1e5, shift, torch.contiguous_format) is None  # fp16 overflow
    assert cache.get(w, scale * 1e-9, shift, torch.contiguous_format) is None  # flushed below fp16's range
    one_channel = scale.clone()
    one_channel[3] = 1e-7  # that channel's weights become fp16 subnormals: too coarse for the channel
    assert cache.get(w, one_channel, shift, torch.contiguous_format) is None
    with torch.inference_mode():
        wi, si, hi = _layer()
    assert cache.get(wi, si, hi, torch.contiguous_format) is None and cache.folds == 3


def test_fold_accepts_fp16_weights_near_zero_and_keeps_them_within_an_ulp_of_each_channel():
    """A trained layer's fp16 weights include values near zero that become subnormal once folded; that costs
    nothing next to the channel's large weights, so the fold is used (the ResNet-like layer of the GPU tests)."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(128, 64, 3, 3, generator=g) * (2 / (64 * 9)) ** 0.5).to(F16)
    scale, shift = torch.rand(128, generator=g) + 0.5, torch.randn(128, generator=g) * 0.2
    exact = w.double() * scale.double().view(-1, 1, 1, 1)
    assert bool(((exact.abs() < torch.finfo(F16).tiny) & (exact != 0)).any())  # the case in question is here
    got = cudnn_fused.fold(w, scale, shift, torch.channels_last)
    assert got is not None
    folded, bias = got
    assert folded.dtype == F16 and folded.is_contiguous(memory_format=torch.channels_last)
    err = (folded.double() - exact).abs().flatten(1).amax(1)
    assert bool((err <= torch.finfo(F16).eps * exact.abs().flatten(1).amax(1)).all())
    assert torch.equal(bias, shift.to(F16))


# ------------------------------------------------------------------------------------------- choice wiring
def _fake_ops(wrong=False, error=None):
    """cuDNN's two fused ops computed with F.conv2d (optionally wrong by one ReLU'd bias, or raising)."""
    def relu_op(x, w, b, stride, padding, dilation, groups):
        if error is not None:
            raise error
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        return torch.relu(y + 1.0 if wrong else y)

    def add_relu_op(x, w, z, alpha, b, stride, padding, dilation, groups):
        if error is not None:
            raise error
        return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)
    return relu_op, add_relu_op


@pytest.fixture
def fake_cudnn(monkeypatch):
    """cuDNN 'available' on CPU, timing allowed, times from `fake.times` by candidate, fresh choice state."""
    class Fake:
        times = {"pointer": 2.0, "tma": 1.5, "cudnn": 1.0}
        ops = _fake_ops()
        runs: list = []

    fake = Fake()
    monkeypatch.setattr(cudnn_fused, "available", lambda device: True)
    monkeypatch.setattr(cudnn_fused, "cudnn_ops", lambda: fake.ops)
    monkeypatch.setattr(cudnn_fused, "MODE", "auto")
    monkeypatch.setattr(cudnn_fused, "FOLDS", cudnn_fused.FoldCache())
    monkeypatch.setattr(cudnn_fused, "_failed", set())
    monkeypatch.setattr(cudnn_fused, "_warned", set())
    monkeypatch.setattr(cudnn_fused, "_decided", set())
    monkeypatch.setattr(variant_choice, "_choices", {})
    monkeypatch.setattr(variant_choice, "can_time", lambda device: True)
    monkeypatch.setattr(variant_choice, "device_time_ms", lambda fn, device: fake.times[fn.name])
    return fake


def _call(residual=False, activation="relu", dtype=F32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 6, generator=g).to(dtype)
    w, scale, shift = _layer(dtype=dtype)
    res = torch.randn(2, 8, 6, 6, generator=g).to(dtype) if residual else None
    return x, w, scale, shift, res, activation


def _reference(x, w, scale, shift, res, activation):
    return conv_bn_act_ref(x.double(), w.double(), scale.double(), shift.double(), stride=(1, 1), padding=(1, 1),
                           dilation=(1, 1), groups=1, activation=activation,
                           residual=None if res is None else res.double())


def _candidates(fake, x, w, scale, shift, res, activation, y, tracing=False, enabled=None):
    """What the launcher builds: a pointer stand-in writing the true result into y, and the cuDNN candidate."""
    def pointer():
        fake.runs.append("pointer")
        y.copy_(_reference(x, w, scale, shift, res, activation))
        return y
    pointer.name = "pointer"
    cands = {"pointer": pointer}
    launch = cudnn_fused.candidate(x, w, scale, shift, res, (1, 1), (1, 1), (1, 1), 1, activation,
                                   torch.contiguous_format, enabled=enabled, pinned_schedule=False,
                                   fallback=pointer, tracing=tracing)
    if launch is not None:
        launch.name = "cudnn"
        cands["cudnn"] = launch
    return cands


@pytest.mark.parametrize("residual", [False, True])
def test_a_faster_agreeing_cudnn_candidate_is_chosen_and_computes_the_contract(fake_cudnn, residual):
    x, w, scale, shift, res, act = _call(residual)
    y = torch.empty(2, 8, 6, 6)
    cands = _candidates(fake_cudnn, x, w, scale, shift, res, act, y)
    assert set(cands) == {"pointer", "cudnn"}
    name = cudnn_fused.choose("k", cands, CPU, y, variant_choice)
    assert name == "cudnn"
    assert variant_choice.chosen() == {("k", "cudnn"): "cudnn"}
    out = cands["cudnn"]()
    assert out is not y  # the chosen cuDNN path returns its own tensor
    ref = _reference(x, w, scale, shift, res, act)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert cudnn_fused.FOLDS.folds == 1  # probe, compared run, timed runs and the chosen call: folded once
    assert cudnn_fused.choose("k", cands, CPU, y, variant_choice) == "cudnn"  # cached


def test_without_timing_the_eager_choice_is_replayed_or_the_pointer_kernel_runs(fake_cudnn, monkeypatch):
    """A CUDA-graph capture (no timing) before any eager call runs the pointer kernel and decides nothing; after
    an eager choice of cuDNN, a capture runs cuDNN too (the choice does not change)."""
    x, w, scale, shift, res, act = _call()
    y = torch.empty(2, 8, 6, 6)
    cands = _candidates(fake_cudnn, x, w, scale, shift, res, act, y)
    monkeypatch.setattr(variant_choice, "can_time", lambda device: False)
    assert cudnn_fused.choose("k", cands, CPU, y, variant_choice) == "pointer"
    assert not variant_choice.chosen() and cudnn_fused.FOLDS.folds == 0
    monkeypatch.setattr(variant_choice, "can_time", lambda device: True)
    assert cudnn_fused.choose("k", cands, CPU, y, variant_choice) == "cudnn"
    monkeypatch.setattr(variant_choice, "can_time", lambda device: False)
    assert cudnn_fused.choose("k", cands, CPU, y, variant_choice) == "cudnn"


def test_a_slower_cudnn_candidate_is_not_chosen(fake_cudnn):
    fake_cudnn.times = {"pointer": 1.0, "cudnn": 3.0}
    x, w, scale, shift, res, act = _call()
    y = torch.empty(2, 8, 6, 6)
    assert cudnn_fused.choose("k", _candidates(fake_cudnn, x, w, scale, shift, res, act, y), CPU, y,
                              variant_choice) == "pointer"
    assert cudnn_fused.FOLDS.folds == 1 and len(cudnn_fused.FOLDS) == 0  # the unused folded copy is not kept


def test_a_wrong_cudnn_candidate_is_dropped_with_a_warning(fake_cudnn):
    fake_cudnn.ops = _fake_ops(wrong=True)
    x, w, scale, shift, res, act = _call()
    y = torch.empty(2, 8, 6, 6)
    cands = _candidates(fake_cudnn, x, w, scale, shift, res, act, y)
    with pytest.warns(RuntimeWarning, match=r"'cudnn' kernel disagrees with the 'pointer' kernel"):
        name = cudnn_fused.choose("k", cands, CPU, y, variant_choice)
    assert name == "pointer"
    assert cudnn_fused.choose("k", cands, CPU, y, variant_choice) == "pointer"  # not retried


def test_a_raising_cudnn_is_dropped_with_one_warning_per_distinct_error(fake_cudnn):
    fake_cudnn.ops = _fake_ops(error=RuntimeError("CUDNN_STATUS_NOT_SUPPORTED: no engine"))
    x, w, scale, shift, res, act = _call()
    y = torch.empty(2, 8, 6, 6)
    cands = _candidates(fake_cudnn, x, w, scale, shift, res, act, y)
    with pytest.warns(RuntimeWarning, match="CUDNN_STATUS_NOT_SUPPORTED"):
        assert cudnn_fused.choose("k1", cands, CPU, y, variant_choice) == "pointer"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same error for another layer: dropped silently
        assert cudnn_fused.choose("k2", cands, CPU, y, variant_choice) == "pointer"
        assert cudnn_fused.choose("k1", cands, CPU, y, variant_choice) == "pointer"
    assert cudnn_fused.failed() == {("k1", "cudnn"), ("k2", "cudnn")}


def test_with_other_triton_candidates_the_fastest_of_all_is_kept(fake_cudnn):
    x, w, scale, shift, res, act = _call()
    y = torch.empty(2, 8, 6, 6)
    cands = _candidates(fake_cudnn, x, w, scale, shift, res, act, y)

    def tma():
        y.copy_(_reference(x, w, scale, shift, res, act))
        return y
    tma.name = "tma"
    cands = {"pointer": cands["pointer"], "tma": tma, "cudnn": cands["cudnn"]}
    fake_cudnn.times = {"pointer": 2.0, "tma": 0.5, "cudnn": 1.0}
    assert cudnn_fused.choose("k", cands, CPU, y, variant_choice) == "tma"


def test_no_candidate_when_switched_off_tracing_ineligible_or_unavailable(fake_cudnn, monkeypatch):
    x, w, scale, shift, res, act = _call()
    y = torch.empty(2, 8, 6, 6)
    assert "cudnn" in _candidates(fake_cudnn, x, w, scale, shift, res, act, y)
    assert "cudnn" not in _candidates(fake_cudnn, x, w, scale, shift, res, act, y, enabled=False)
    assert "cudnn" not in _candidates(fake_cudnn, x, w, scale, shift, res, act, y, tracing=True)
    assert "cudnn" not in _candidates(fake_cudnn, x, w, scale, shift, res, "identity", y)
    monkeypatch.setattr(cudnn_fused, "MODE", "off")  # FUSEDCONV_CUDNN=0
    assert "cudnn" not in _candidates(fake_cudnn, x, w, scale, shift, res, act, y)
    assert "cudnn" in _candidates(fake_cudnn, x, w, scale, shift, res, act, y, enabled=True)
    monkeypatch.setattr(cudnn_fused, "MODE", "auto")
    monkeypatch.setattr(cudnn_fused, "available", lambda device: False)
    assert "cudnn" not in _candidates(fake_cudnn, x, w, scale, shift, res, act, y)


def test_inside_a_capture_nothing_is_folded_and_an_uncached_fold_runs_the_fallback(fake_cudnn, monkeypatch):
    x, w, scale, shift, res, act = _call()
    y = torch.empty(2, 8, 6, 6)
    cands = _candidates(fake_cudnn, x, w, scale, shift, res, act, y)
    monkeypatch.setattr(cudnn_fused, "_capturing", lambda device: True)
    fake_cudnn.runs.clear()
    assert cands["cudnn"]() is y and fake_cudnn.runs == ["pointer"] and cudnn_fused.FOLDS.folds == 0
    monkeypatch.setattr(cudnn_fused, "_capturing", lambda device: False)
    cands["cudnn"]()  # eager: folds and caches
    monkeypatch.setattr(cudnn_fused, "_capturing", lambda device: True)
    fake_cudnn.runs.clear()
    assert cands["cudnn"]() is not y and not fake_cudnn.runs and cudnn_fused.FOLDS.folds == 1


def test_backend_log_records_only_inside_a_recording():
    backend_log.record("pointer")  # nothing active: ignored
    with backend_log.recording() as log:
        backend_log.record("pointer")
        backend_log.record("cudnn")
        backend_log.record("tma")
    assert log == ["triton pointer", "cudnn", "triton tma"]


# ------------------------------------------------------------------------------------------- launcher
@pytest.mark.interpret
@pytest.mark.parametrize("residual", [False, True])
def test_launcher_offers_cudnn_and_runs_the_choice(fake_cudnn, monkeypatch, residual):
    """Through the real launcher (pointer kernel under the interpreter): a faster fake cuDNN is chosen, its
    result returned and the backend recorded; with cudnn=False the kernel runs."""
    from fusedconv.kernels import conv_bn_act

    x, w, scale, shift, res, act = _call(residual)
    timed = iter([2.0, 1.0])  # variant_choice times the candidates in order: pointer, then cuDNN
    monkeypatch.setattr(variant_choice, "device_time_ms", lambda fn, device: next(timed))
    ref = _reference(x, w, scale, shift, res, act)
    with backend_log.recording() as log:
        out = conv_bn_act(x, w, scale, shift, stride=1, padding=1, residual=res)
    assert log == ["cudnn"]
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-4
    (key, name), = variant_choice.chosen().items()
    assert name == "cudnn" and key[-1] == "cudnn"
    out = conv_bn_act(x, w, scale, shift, stride=1, padding=1, residual=res)  # the choice is made: cuDNN runs
    assert cudnn_fused.FOLDS.folds == 1  # probe, comparison, timing and two calls: one fold
    with torch.no_grad():
        w.mul_(-0.5)  # an in-place edit of the weight: refolded on the next call, and the result follows it
    out = conv_bn_act(x, w, scale, shift, stride=1, padding=1, residual=res)
    assert cudnn_fused.FOLDS.folds == 2
    ref = _reference(x, w, scale, shift, res, act)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-4
    with backend_log.recording() as log:
        out = conv_bn_act(x, w, scale, shift, stride=1, padding=1, residual=res, cudnn=False)
    assert log == ["triton pointer"]
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.interpret
def test_launcher_drops_a_wrong_cudnn(fake_cudnn, monkeypatch):
    from fusedconv.kernels import conv_bn_act

    fake_cudnn.ops = _fake_ops(wrong=True)
    monkeypatch.setattr(variant_choice, "device_time_ms", lambda fn, device: 1.0)
    x, w, scale, shift, res, act = _call()
    ref = _reference(x, w, scale, shift, res, act)
    with pytest.warns(RuntimeWarning, match="'cudnn' kernel disagrees"), backend_log.recording() as log:
        out = conv_bn_act(x, w, scale, shift, stride=1, padding=1)
    assert log == ["triton pointer"]
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-4


# ------------------------------------------------------------------------------------------- real cuDNN
def _real_layer(seed, n, cin, hw, cout, stride, residual):
    """A 3x3 / padding 1 ReLU layer on the CPU (x, weight, scale, shift, residual or None) and its float64
    truth act(conv * scale + shift [+ residual])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, hw, hw, generator=g)
    w = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (cin * 9)) ** 0.5
    scale, shift = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g) * 0.2
    out_hw = (hw - 1) // stride + 1
    res = torch.randn(n, cout, out_hw, out_hw, generator=g) if residual else None
    ref = conv_bn_act_ref(x.double(), w.double(), scale.double(), shift.double(), stride=(stride, stride),
                          padding=(1, 1), dilation=(1, 1), groups=1, activation="relu",
                          residual=None if res is None else res.double())
    return x, w, scale, shift, res, ref


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("residual", [False, True])
def test_real_cudnn_candidate_matches_float64(dtype, layout, residual):
    """torch's cuDNN fused ops on the folded weight compute act(conv * scale + shift [+ residual])."""
    dev = torch.device("cuda")
    x, w, scale, shift, res, ref = _real_layer(5, 4, 64, 14, 128, 2, residual)
    xd = x.to(dev, dtype).contiguous(memory_format=layout)
    resd = None if res is None else res.to(dev, dtype).contiguous(memory_format=layout)
    wd, sd, hd = w.to(dev, dtype), scale.to(dev), shift.to(dev)
    out = cudnn_fused.run(xd, wd, sd, hd, resd, (2, 2), (1, 1), (1, 1), 1, layout)
    assert out.is_contiguous(memory_format=layout) and out.dtype == dtype
    err = float((out.double().cpu() - ref).abs().max() / ref.abs().max())
    assert err < (2e-2 if dtype == F16 else 1e-2), err  # fp32 may run TF32, as the Triton kernel then does


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_real_cudnn_through_the_launcher_eager_and_in_a_cuda_graph(monkeypatch, residual):
    """The launcher made to choose cuDNN (its timing replaced so cuDNN wins): the eager result matches float64,
    the backend is cuDNN, and a CUDA-graph capture afterwards replays cuDNN with the same result."""
    from fusedconv.kernels import conv_bn_act, pack_weight

    monkeypatch.setattr(variant_choice, "_choices", {})
    monkeypatch.setattr(cudnn_fused, "_decided", set())
    monkeypatch.setattr(cudnn_fused, "_failed", set())
    # The cuDNN launch is the only candidate variant_choice gets wrapped (functools.wraps sets __wrapped__).
    # Only variant_choice's device timer is faked; Triton's autotuner still times its configs for real.
    monkeypatch.setattr(variant_choice, "device_time_ms",
                        lambda fn, device: 0.5 if hasattr(fn, "__wrapped__") else 2.0)
    dev = torch.device("cuda")
    x, w, scale, shift, res, ref = _real_layer(7, 8, 64, 28, 64, 1, residual)
    cl = torch.channels_last
    xd = x.to(dev, F16).contiguous(memory_format=cl)
    resd = None if res is None else res.to(dev, F16).contiguous(memory_format=cl)
    wd, sd, hd = pack_weight(w.to(dev, F16), 1), scale.to(dev), shift.to(dev)
    with backend_log.recording() as log:
        eager = conv_bn_act(xd, wd, sd, hd, padding=1, residual=resd)
        eager = conv_bn_act(xd, wd, sd, hd, padding=1, residual=resd)
    assert log == ["cudnn", "cudnn"]
    assert float((eager.double().cpu() - ref).abs().max() / ref.abs().max()) < 2e-2
    graph = torch.cuda.CUDAGraph()
    with backend_log.recording() as log, torch.cuda.graph(graph):
        captured = conv_bn_act(xd, wd, sd, hd, padding=1, residual=resd)
    graph.replay()
    torch.cuda.synchronize()
    assert log == ["cudnn"] and torch.equal(captured, eager)
