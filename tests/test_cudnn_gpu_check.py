"""The GPU check's cuDNN-vs-Triton comparison (bench/gpu_check.py layers step, bench/gpu_check_report.py):
each layer runs fusedconv with the cuDNN candidate on and off, records the backend each chose, and the markdown
shows triton best / cuDNN fused / chosen. The layer runs are stand-ins here; the CPU dry run of the whole
check is in test_gpu_check.py."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from bench import gpu_check, gpu_check_report  # noqa: E402
from fusedconv.kernels import backend_log, cudnn_fused  # noqa: E402


def _fake_run(seen_modes):
    """A layer run whose fused layer launches cuDNN when the candidate is on, the pointer kernel when off."""
    def run(providers):
        seen_modes.append(cudnn_fused.MODE)
        backend_log.record("pointer")  # the first (choosing) call
        backend_log.record("cudnn" if cudnn_fused.MODE == "auto" else "tma")
        return [{"provider": p, "status": "ok", "time_ms": 1.0} for p in providers]
    return run


def test_run_with_backend_switches_the_candidate_and_records_the_last_backend(monkeypatch):
    monkeypatch.setattr(cudnn_fused, "MODE", "auto")
    modes = []
    on = gpu_check.run_with_backend(_fake_run(modes), ["eager", "fusedconv"], "fusedconv", cudnn=True)
    off = gpu_check.run_with_backend(_fake_run(modes), ["fusedconv"], "fusedconv_triton", cudnn=False)
    assert modes == ["auto", "off"] and cudnn_fused.MODE == "auto"  # restored
    assert [(r["provider"], r.get("backend")) for r in on] == [("eager", None), ("fusedconv", "cudnn")]
    assert [(r["provider"], r.get("backend")) for r in off] == [("fusedconv_triton", "triton tma")]
    cpu = gpu_check.run_with_backend(lambda p: [{"provider": "fusedconv", "status": "ok"}], ["fusedconv"],
                                     "fusedconv", cudnn=True)
    assert cpu[0]["backend"] == "fallback"  # no fused kernel ran


def test_layers_markdown_shows_triton_best_cudnn_fused_and_chosen():
    base = {"layer": "layer1.0.conv2", "shape": "64x56x56 k3", "batch": 32}
    rows = [dict(base, provider="cudnn_relu", status="ok", time_ms=0.010),
            dict(base, provider="fusedconv_triton", status="ok", time_ms=0.020, backend="triton pointer"),
            dict(base, provider="fusedconv", status="ok", time_ms=0.010, backend="cudnn", speedup_vs_cudnn_relu=1.0),
            dict(base, provider="eager", status="ok", time_ms=0.030)]
    md = "\n".join(gpu_check_report._layers(rows))
    assert "| triton best | chosen | backend | triton x vs cudnn fused |" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| layer1.0.conv2"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5:10] == ["10.0", "20.0", "10.0", "cudnn", "0.50"]


def test_models_markdown_counts_layers_per_backend():
    row = {"model": "torchvision:resnet50", "batch": 32, "dtype": "float16", "status": "ok",
           "backends": {"triton pointer": 40, "cudnn": 9, "triton tma": 4}}
    md = "\n".join(gpu_check_report._models([row]))
    assert "40 triton pointer, 9 cudnn, 4 triton tma" in md


def test_run_gpu_tests_reports_the_child_pytest(tmp_path):
    """The GPU check's cuDNN step runs the `gpu` tests in a child pytest and keeps its verdict."""
    path = tmp_path / "test_stand_in.py"
    path.write_text("import pytest\n\n\n@pytest.mark.gpu\ndef test_ok():\n    pass\n\n\n@pytest.mark.gpu\n"
                    "def test_bad():\n    assert 1 == 2\n\n\ndef test_not_gpu():\n    pass\n")
    got = gpu_check.run_gpu_tests(str(path))
    assert got["returncode"] == 1
    assert "1 failed, 1 passed, 1 deselected" in got["summary"]
    assert len(got["failed"]) == 1 and "test_bad" in got["failed"][0]
    assert any("assert 1 == 2" in ln for ln in got["errors"])  # why it failed, not only which
    md = "\n".join(gpu_check_report._cudnn_candidate(got))
    assert "exit code 1" in md and "test_bad" in md and "assert 1 == 2" in md


def test_run_gpu_tests_takes_several_files(tmp_path):
    """The autocast part runs two test files in one child pytest: both files' `gpu` tests count."""
    paths = []
    for name, body in (("a", "pass"), ("b", "assert 1 == 2")):
        path = tmp_path / f"test_stand_in_{name}.py"
        path.write_text(f"import pytest\n\n\n@pytest.mark.gpu\ndef test_{name}():\n    {body}\n")
        paths.append(str(path))
    got = gpu_check.run_gpu_tests(*paths)
    assert got["returncode"] == 1 and "1 failed, 1 passed" in got["summary"]
    assert got["tests"] == " ".join(paths)
