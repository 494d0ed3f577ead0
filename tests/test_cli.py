"""The `fusedconv` command line on small models: demo, convert round trips, error paths.

The demo, the bench subcommand, `python -m fusedconv` and one error path run as processes (exit status, stderr
without a traceback); the rest call `cli.main()` in this process, the console script's own code path, without
starting an interpreter and importing torch again for each (that was most of this file's minutes in CI).

Round trips load trained-looking weights (random, with randomized BN statistics) via --weights and compare
the saved artifact's output with the original PyTorch model's. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision

from fusedconv import cli, comparison, model_specs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (1, 3, 32, 32)
SIZE_ARG = ",".join(map(str, SIZE))


def run_cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "fusedconv.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


class InProcess:
    """cli.main() called directly (the same code path as the console script, without a new interpreter)."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main_in_process(capsys, monkeypatch, cwd, *args):
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return InProcess(code, captured.out, captured.err)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fusedconv: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def rel_err(a, b):
    return comparison.max_rel_error(a, b)


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """A resnet18 with random weights and randomized BN statistics, and its state_dict file."""
    model = model_specs.randomize_batchnorm(torchvision.models.resnet18(weights=None), seed=3).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def test_demo_prints_report_error_and_latencies():
    proc = run_cli("demo", "--model", "torchvision:resnet18", "--size", "32", "--min-time", "0.05")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "BatchNorm statistics randomized" in out
    assert "Fused:" in out and "conv chain(s)" in out
    assert "Max relative error vs the original" in out and "OK" in out
    assert "Original:" in out and "fusedconv:" in out and " ms" in out
    assert "channels_last" in out  # the layout the timed path used is stated


def test_demo_freeze_times_the_frozen_model():
    proc = run_cli("demo", "--model", "torchvision:resnet18", "--size", "32", "--min-time", "0.05", "--freeze")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Max relative error vs the original" in out and "OK" in out
    assert "(frozen)" in out and "channels_last" in out  # the frozen model keeps the layout boundary


def test_convert_pt_round_trip_with_weights(tmp_path, capsys, monkeypatch, resnet18_weights):
    model, weights = resnet18_weights
    out = tmp_path / "r18.pt"
    proc = main_in_process(capsys, monkeypatch, tmp_path, "convert", "torchvision:resnet18", "-o", str(out),
                           "--weights", weights, "--check", "--input-size", SIZE_ARG)
    assert proc.returncode == 0, proc.stderr
    assert "Self-check passed" in proc.stdout and "fused" in proc.stdout
    assert "(fusedconv.cli.load_converted) vs the converted model" in proc.stdout
    loaded = cli.load_converted(str(out))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-5
    assert any(type(m).__name__ == "FusedConv2d" for m in loaded.modules())


def test_convert_pt2_round_trip(tmp_path, capsys, monkeypatch, resnet18_weights):
    model, weights = resnet18_weights
    out = tmp_path / "r18.pt2"
    proc = main_in_process(capsys, monkeypatch, tmp_path, "convert", "torchvision:resnet18", "-o", str(out),
                           "--weights", weights, "--input-size", SIZE_ARG)
    assert proc.returncode == 0, proc.stderr
    ep = torch.export.load(str(out))
    x = torch.randn(*SIZE)
    with torch.no_grad():
        assert rel_err(ep.module()(x), model(x)) < 1e-5


def test_convert_onnx_round_trip(tmp_path, capsys, monkeypatch, resnet18_weights):
    ort = pytest.importorskip("onnxruntime")
    model, weights = resnet18_weights
    out = tmp_path / "r18.onnx"
    proc = main_in_process(capsys, monkeypatch, tmp_path, "convert", "torchvision:resnet18", "-o", str(out),
                           "--weights", weights, "--check", "--input-size", SIZE_ARG)
    assert proc.returncode == 0, proc.stderr
    assert "(onnxruntime) vs the converted model" in proc.stdout
    onnx = pytest.importorskip("onnx")
    op_types = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in op_types and "Mul" not in op_types, op_types
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(*SIZE)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), model(x)) < 1e-5


def test_pickled_module_with_trust_pickle(tmp_path, capsys, monkeypatch):
    model = model_specs.randomize_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4)), seed=5).eval()
    path = tmp_path / "seq.pt"
    torch.save(model, path)
    proc = main_in_process(capsys, monkeypatch, tmp_path, "convert", str(path), "-o", str(tmp_path / "out.pt2"),
                           "--trust-pickle", "--check", "--input-size", "2,3,16,16")
    assert proc.returncode == 0, proc.stderr
    assert "2 fused" in proc.stdout
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(torch.export.load(str(tmp_path / "out.pt2")).module()(x), model(x)) < 1e-5


def test_errors_are_one_line_without_traceback(tmp_path):
    # As a process (the console script's exit status and stderr); the other error paths run in process below.
    proc = run_cli("convert", "torchvision:not_a_model", "-o", "x.pt", cwd=tmp_path)
    assert_one_line_error(proc, "unknown torchvision model", "not_a_model")


@pytest.mark.parametrize("args,needles", [
    (["convert", "missing_file.pt", "-o", "x.pt2"], ["no such file", "missing_file.pt"]),
    (["convert", "torchvision:resnet18", "-o", "x.txt"], ["-o/--output", ".pt, .pt2, .onnx", "x.txt"]),
    (["convert", "timm:not_a_model_either", "-o", "x.pt"], ["unknown timm model"]),
    (["convert", "smp:Unet", "-o", "x.pt"], ["smp:ARCH:ENCODER"]),
    (["convert", "torchvision:resnet18", "-o", "x.pt", "--input-size", "3,abc"], ["--input-size"]),
    (["convert", "torchvision:resnet18", "-o", "no_such_dir/x.pt"], ["no such directory"]),
    (["demo", "--model", "torchvision:nope"], ["unknown torchvision model"]),
    (["demo", "--device", "cuda:0"] if not torch.cuda.is_available() else ["demo", "--device", "tpu"],
     ["--device"]),
])
def test_more_errors_in_process(tmp_path, capsys, monkeypatch, args, needles):
    assert_one_line_error(main_in_process(capsys, monkeypatch, tmp_path, *args), *needles)


def test_torchscript_state_dict_and_weight_mismatch_are_explained(tmp_path, capsys, monkeypatch):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch; users still have such files
        torch.jit.save(torch.jit.script(net), tmp_path / "net.ts")
    run = lambda *a: main_in_process(capsys, monkeypatch, tmp_path, *a)  # noqa: E731
    assert_one_line_error(run("convert", "net.ts", "-o", "o.pt"), "-o/--output", "TorchScript", ".pt2")
    assert_one_line_error(run("convert", "net.ts", "-o", "o.pt2", "--weights", "sd.pth"), "--weights")
    torch.save(net.state_dict(), tmp_path / "sd.pth")
    assert_one_line_error(run("convert", "sd.pth", "-o", "o.pt2"), "state_dict", "--weights")
    assert_one_line_error(run("convert", "torchvision:resnet18", "-o", "o.pt", "--weights", "sd.pth"),
                          "--weights", "missing key")
    torch.save(net, tmp_path / "module.pt")
    assert_one_line_error(run("convert", "module.pt", "-o", "o.pt2"), "--trust-pickle")


@pytest.mark.parametrize("source", ["torchscript", "exported"])
def test_convert_program_files(tmp_path, capsys, monkeypatch, source):
    net = model_specs.randomize_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4)), seed=3).eval()
    x = torch.randn(2, 3, 12, 12)
    if source == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(net, x), tmp_path / "net.ts")
        spec = "net.ts"
    else:
        torch.export.save(torch.export.export(net, (x,)), tmp_path / "net.pt2")
        spec = "net.pt2"
    result = main_in_process(capsys, monkeypatch, tmp_path, "convert", spec, "-o", "fused.pt2", "--check",
                             "--input-size", "2,3,12,12")
    assert result.returncode == 0, result.stderr
    assert "2 fused" in result.stdout
    program = torch.export.load(str(tmp_path / "fused.pt2"))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets) and any("conv_bn_act" in t for t in targets), targets
    with torch.no_grad():
        assert rel_err(program.module()(x), net(x)) < 1e-5


def test_bench_subcommand_runs_a_tiny_suite(tmp_path):
    proc = run_cli("bench", "--suite", "layers", "--nets", "mobilenet_v2", "--max-layers", "1",
                   "--providers", "eager,folded,fusedconv", "--layouts", "NCHW", "--min-time", "0.01",
                   "--out", str(tmp_path), "--tag", "test", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    jsons = [f for f in files if f.endswith("-test.json")]
    assert len(jsons) == 1 and any(f.endswith("-test.md") for f in files) and any(f.endswith(".png") for f in files)
    data = json.loads(open(jsons[0]).read())
    assert data["environment"]["command"].startswith("fusedconv bench")
    assert {r["provider"]: r["status"] for r in data["layers"]} == {"eager": "ok", "folded": "ok", "fusedconv": "ok"}


def test_parsers_in_process():
    assert cli.parse_input_size("1,3,224,224") == (1, 3, 224, 224)
    assert cli.parse_input_size("3x64x48") == (1, 3, 64, 48)
    with pytest.raises(cli.CLIError, match="--input-size"):
        cli.parse_input_size("0,3,2,2")


def test_load_converted_rejects_other_files(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="fusedconv-converted"):
        cli.load_converted(str(tmp_path / "plain.pt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        cli.load_converted(str(tmp_path / "absent.pt"))


def test_bench_without_a_source_checkout_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    """An installed package has no bench/ beside it: `fusedconv bench` explains instead of failing on an import."""
    from fusedconv.cli import bench_handoff

    monkeypatch.setitem(sys.modules, "bench", None)  # `import bench` raises ImportError, as where it is not installed
    monkeypatch.setattr(bench_handoff, "PACKAGE_PARENT", str(tmp_path))  # no bench/ beside the package either
    result = main_in_process(capsys, monkeypatch, tmp_path, "bench", "--quick")
    assert result.returncode == cli.EXIT_USAGE
    assert_one_line_error(result, "needs a source checkout")


def test_python_dash_m_fusedconv_is_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "fusedconv", "convert", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torchvision:NAME" in proc.stdout and "--input-size" in proc.stdout
