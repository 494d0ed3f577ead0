"""variant_choice: the per-launch-signature choice between kernel families keeps the fastest candidate, and
never one whose output disagrees with the first (reference) candidate's. Runs on CPU: the launches are plain
functions writing into a tensor, the timer is replaced by fixed times."""

from __future__ import annotations

import pytest
import torch

from fusedconv.kernels import variant_choice


@pytest.fixture
def timed(monkeypatch):
    """can_time -> True; the device timer returns the time attached to each launch function."""
    monkeypatch.setattr(variant_choice, "can_time", lambda device: True)
    monkeypatch.setattr(variant_choice, "device_time_ms", lambda fn, device: fn.time)
    monkeypatch.setattr(variant_choice, "_choices", {})


def _launch(out, value, time):
    def launch():
        out.copy_(value)
    launch.time = time
    return launch


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_faster_agreeing_candidate_is_kept(timed, dtype):
    ref = torch.randn(4, 8, dtype=torch.float64)
    out = torch.empty(4, 8, dtype=dtype)
    close = ref * (1 + 1e-12)  # a reordered fp32 sum: agrees
    name = variant_choice.choose("k", {"pointer": _launch(out, ref, 2.0), "tma": _launch(out, close, 1.0)},
                                 torch.device("cpu"), output=out)
    assert name == "tma"
    assert variant_choice.chosen() == {"k": "tma"}


def test_a_faster_but_wrong_candidate_is_dropped_with_a_warning(timed):
    ref = torch.randn(4, 8, dtype=torch.float64)
    out = torch.empty(4, 8, dtype=torch.float16)
    wrong = ref.clone()
    wrong[0, 0] += 10.0
    with pytest.warns(RuntimeWarning, match=r"'tma' kernel disagrees with the 'pointer' kernel"):
        name = variant_choice.choose("k", {"pointer": _launch(out, ref, 2.0), "tma": _launch(out, wrong, 0.5)},
                                     torch.device("cpu"), output=out)
    assert name == "pointer"
    # the choice is cached: the wrong kernel is not retried on the next call
    assert variant_choice.choose("k", {}, torch.device("cpu")) == "pointer"


def test_nan_where_the_reference_is_finite_is_a_disagreement():
    ref = torch.ones(3)
    out = torch.tensor([1.0, float("nan"), 1.0])
    assert variant_choice.disagreement(out, ref) == float("inf")
    assert variant_choice.disagreement(ref.clone(), ref) == 0.0


def test_without_timing_the_first_candidate_runs(monkeypatch):
    monkeypatch.setattr(variant_choice, "_choices", {})
    monkeypatch.setattr(variant_choice, "can_time", lambda device: False)
    assert variant_choice.choose("k", {"pointer": None, "tma": None}, torch.device("cpu")) == "pointer"


class _SimulatedGpu:
    """One CUDA stream against a host clock, for `device_time_ms` on a CPU: the host spends `issue_ms` per
    launch; the GPU runs each queued item (a sleep, a kernel of `kernel_ms`, an event) when the host has issued it
    and the previous item is done."""

    CYCLES_PER_MS = 1.98e6

    def __init__(self, issue_ms, kernel_ms):
        self.host, self.gpu_free = 0.0, 0.0  # ms
        self.issue_ms, self.kernel_ms = issue_ms, kernel_ms
        self.launches = 0
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = gpu.gpu_free = max(gpu.gpu_free, gpu.host)

            def synchronize(self):
                gpu.host = max(gpu.host, self.at)

            def elapsed_time(self, end):
                return end.at - self.at
        self.Event = Event

    def issue_ms_now(self):
        return self.issue_ms(self.launches) if callable(self.issue_ms) else self.issue_ms

    def launch(self):
        self.host += self.issue_ms_now()
        self.gpu_free = max(self.gpu_free, self.host) + self.kernel_ms
        self.launches += 1

    def sleep(self, cycles):
        self.gpu_free = max(self.gpu_free, self.host) + cycles / self.CYCLES_PER_MS

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "_sleep", self.sleep)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: setattr(self, "host", max(self.host,
                                                                                               self.gpu_free)))
        monkeypatch.setattr(variant_choice, "_now", lambda: self.host / 1e3)
        monkeypatch.setattr(variant_choice, "_cycles_per_ms", {})


@pytest.mark.parametrize("issue_ms,kernel_ms", [(0.05, 0.01), (0.004, 0.02), (0.03, 0.03)])
def test_device_time_is_the_gpu_time_not_the_hosts(monkeypatch, issue_ms, kernel_ms):
    """A 10 µs kernel that takes the host 50 µs to issue times at 10 µs (per-call events around it would give
    50), as do kernels slower than their issuing."""
    gpu = _SimulatedGpu(issue_ms, kernel_ms)
    gpu.install(monkeypatch)
    assert variant_choice.device_time_ms(gpu.launch, torch.device("cuda", 0)) == pytest.approx(kernel_ms, rel=1e-6)


def test_device_time_redoes_a_sample_whose_issuing_outlasted_its_sleep(monkeypatch):
    """The host issues the three sizing launches fast, then slows to 0.2 ms per launch: the first samples'
    sleeps are too short (the GPU would wait on the host), so they are redone with longer sleeps."""
    gpu = _SimulatedGpu(lambda n: 0.001 if n < 3 else 0.2, 0.01)
    gpu.install(monkeypatch)
    assert variant_choice.device_time_ms(gpu.launch, torch.device("cuda", 0)) == pytest.approx(0.01, rel=1e-6)
    assert gpu.launches > 3 + variant_choice.TIMED_CALLS * variant_choice.TIMED_SAMPLES  # samples were redone
