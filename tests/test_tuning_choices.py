"""The kernel-family choices (pointer vs TMA, kernels/variant_choice.py) persisted in the tuned table
(fusedconv/tuning.py): round trip through save_tuning / load_tuning, refusal of bad entries naming the file and
the entry, and a loaded choice used without timing.

Runs on CPU: the GPU context (`tuning._context`, `torch.cuda.is_available`) and the autotuner are replaced by
stand-ins, everything else — the file format, validation, the lookup in `choose` — is the real code.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from fusedconv import tuning
from fusedconv.kernels import tuning_cache, variant_choice

GPU, TRITON = "NVIDIA H200", "3.8.0"


def _key(n=32, device=None):
    """A launch signature shaped like conv_bn_act's (shapes, strides, dtypes, device, geometry, flags)."""
    device = device or torch.device("cuda", 0)
    return ((n, 256, 14, 14), (50176, 1, 3584, 256), torch.float16, device, (256, 256, 1, 1), (256, 1, 256, 256),
            torch.float16, (256,), (256,), ((n, 256, 14, 14), (50176, 1, 3584, 256), torch.float16), (1, 1),
            (0, 0), (1, 1), 1, "relu", 0.0, None, False, True, None)


@pytest.fixture
def gpu_context(monkeypatch):
    """A CUDA-looking process on CPU: a plain autotuner stand-in, the GPU name, empty choice tables."""
    tuner = types.SimpleNamespace(cache=tuning_cache.BucketedCache(0))
    monkeypatch.setattr(tuning, "_gemm_autotuner", lambda: tuner)
    monkeypatch.setattr(tuning, "_context", lambda device=None: (GPU, TRITON))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(variant_choice, "_choices", {})
    monkeypatch.setattr(variant_choice, "_loaded", {})
    return tuner


def _no_timing(monkeypatch):
    """Timing allowed, but any benchmark or launch fails the test: a loaded choice must not time."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a loaded choice was timed again")

    monkeypatch.setattr(variant_choice, "can_time", lambda device: True)
    monkeypatch.setattr(variant_choice, "device_time_ms", forbidden)
    return {"pointer": forbidden, "tma": forbidden}


def test_choices_round_trip_and_are_used_without_timing(gpu_context, monkeypatch, tmp_path):
    variant_choice._choices[_key(32)] = "tma"
    variant_choice._choices[_key(1)] = "pointer"
    path = str(tmp_path / "table.json")
    assert tuning.save_tuning(path=path) == path
    saved = json.loads(open(path).read())
    assert saved["gpu"] == GPU and saved["triton"] == TRITON and len(saved["choices"]) == 2

    monkeypatch.setattr(variant_choice, "_choices", {})  # a new process
    monkeypatch.setattr(variant_choice, "_loaded", {})
    assert tuning.load_tuning(paths=[path]) == 2
    candidates = _no_timing(monkeypatch)
    # another device index of the same GPU model reads the same saved choice
    assert variant_choice.choose(_key(32, torch.device("cuda", 1)), candidates, torch.device("cuda", 1)) == "tma"
    assert variant_choice.choose(_key(1), candidates, torch.device("cuda", 0)) == "pointer"
    assert variant_choice.chosen()[_key(32, torch.device("cuda", 1))] == "tma"


def test_a_loaded_choice_not_offered_now_is_timed_anew(gpu_context, monkeypatch):
    variant_choice.import_choices([{"key": variant_choice.portable_key(_key()), "choice": "tma"}], "t.json")
    monkeypatch.setattr(variant_choice, "can_time", lambda device: True)
    calls = []

    def pointer():
        calls.append("pointer")
    pointer.time = 1.0
    monkeypatch.setattr(variant_choice, "device_time_ms", lambda fn, device: fn.time)
    # only the pointer kernel is offered (e.g. TMA not eligible here): the stale choice is not used
    assert variant_choice.choose(_key(), {"pointer": pointer}, torch.device("cuda", 0)) == "pointer"


def test_save_merges_with_the_choices_already_in_the_file(gpu_context, monkeypatch, tmp_path):
    path = str(tmp_path / "table.json")
    variant_choice._choices[_key(32)] = "tma"
    tuning.save_tuning(path=path)
    monkeypatch.setattr(variant_choice, "_choices", {_key(8): "pointer"})
    monkeypatch.setattr(variant_choice, "_loaded", {})
    tuning.save_tuning(path=path)
    names = {e["key"]: e["choice"] for e in json.loads(open(path).read())["choices"]}
    assert names == {variant_choice.portable_key(_key(32)): "tma", variant_choice.portable_key(_key(8)): "pointer"}


@pytest.mark.parametrize("choices,words", [
    ([{"key": "[1]", "choice": "cudnn_magic"}], r"choices\[0\]: unknown candidate 'cudnn_magic'"),
    ([{"key": "not json", "choice": "tma"}], r"choices\[0\]: 'key' must be a launch signature"),
    ([{"key": "[]", "choice": "tma"}], r"choices\[0\]: 'key' must be a launch signature"),
    ([{"key": "[1]", "choice": "tma", "extra": 1}], r"choices\[0\]: expected an object with exactly"),
    ([{"key": "[1]", "choice": "pointer"}, "tma"], r"choices\[1\]: expected an object"),
    ({"key": "[1]"}, r"'choices' must be a list"),
])
def test_bad_choices_are_refused_naming_file_and_entry(gpu_context, tmp_path, choices, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"gpu": GPU, "triton": TRITON, "entries": [], "choices": choices}))
    with pytest.raises(ValueError, match=words) as info:
        tuning.load_tuning(paths=[str(path)])
    assert str(path) in str(info.value)
    assert variant_choice._loaded == {}, "nothing of a refused table may be used"


def test_a_table_for_another_gpu_or_triton_is_refused(gpu_context, tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"gpu": "NVIDIA A100", "triton": TRITON, "entries": [], "choices": []}))
    with pytest.raises(ValueError, match="table is for gpu 'NVIDIA A100'"):
        tuning.load_tuning(paths=[str(path)])
    path.write_text(json.dumps({"gpu": GPU, "triton": "3.6.0", "entries": [], "choices": []}))
    with pytest.raises(ValueError, match="table is for triton '3.6.0'"):
        tuning.load_tuning(paths=[str(path)])


def test_a_table_without_choices_still_loads(gpu_context, tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"gpu": GPU, "triton": TRITON, "kernel": "conv_gemm", "entries": []}))
    assert tuning.load_tuning(paths=[str(path)]) == 0


def test_portable_key_names_dtypes_and_device_types():
    key = json.loads(variant_choice.portable_key(_key()))
    assert key[2] == "float16" and key[3] == "cuda"
    with pytest.raises(TypeError, match="cannot persist"):
        variant_choice.portable_key((object(),))


def test_choose_refuses_an_unregistered_kernel_family(gpu_context):
    with pytest.raises(ValueError, match=r"candidates: unknown kernel family \['fancy'\].*CANDIDATE_NAMES"):
        variant_choice.choose(_key(), {"pointer": None, "fancy": None}, torch.device("cuda", 0))


def test_a_filling_streamk_choice_round_trips_and_is_used_without_timing(gpu_context, monkeypatch, tmp_path):
    """The warm-up's "streamk" candidate (the filling stream-K schedule, schedule.filling_streamk) persists
    like the kernel families: saved, loaded in a new process and taken without timing where offered."""
    variant_choice._choices[_key(32)] = "streamk"
    path = str(tmp_path / "table.json")
    tuning.save_tuning(path=path)
    saved = json.loads(open(path).read())["choices"]
    assert saved == [{"key": variant_choice.portable_key(_key(32)), "choice": "streamk"}]
    monkeypatch.setattr(variant_choice, "_choices", {})  # a new process
    monkeypatch.setattr(variant_choice, "_loaded", {})
    assert tuning.load_tuning(paths=[path]) == 1
    candidates = {**_no_timing(monkeypatch), "streamk": lambda: None}
    assert variant_choice.choose(_key(32), candidates, torch.device("cuda", 0)) == "streamk"


def test_a_misspelt_schedule_choice_is_refused_naming_file_and_entry(gpu_context, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"gpu": GPU, "triton": TRITON, "entries": [],
                                "choices": [{"key": "[1]", "choice": "streamk"},
                                            {"key": "[2]", "choice": "stream_k"}]}))
    with pytest.raises(ValueError, match=r"choices\[1\]: unknown candidate 'stream_k'") as info:
        tuning.load_tuning(paths=[str(path)])
    assert str(path) in str(info.value) and variant_choice._loaded == {}
