"""The model-zoo sweep (`bench/zoo.py`) on tiny models: it reports exact float64 agreement and fused-layer counts,
and it can fail: a converted model that is off by 1e-6, or a state_dict the promise does not explain, is reported.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fusedconv
from bench import zoo
from bench.zoo_models import ZooModel
from fusedconv.modules import FusedConv2d

SIZE = 32


def _conv_count(spec: str) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in ZooModel(spec).build(SIZE).modules())


def test_small_resnet_is_exact_and_fully_fused():
    res = zoo.run_model(ZooModel("timm:test_resnet"), size=SIZE, batch=2)
    assert res["findings"] == []
    assert res["exact64"] and res["err64"] <= zoo.EXACT_FLOAT64
    assert res["batch1_err64"] <= zoo.EXACT_FLOAT64 and res["match32"]
    assert res["direct32"] > 0 and res["repeat_err32"] <= res["tol32"]  # the flat forward's direct calls ran
    # armed after convert, and still after `.to(memory_format=...)` and back (their calls count in err64)
    assert res["armed"] and res["armed_after_call"] and res["armed_after_to"]
    assert "vs_float64_32" not in res and "within_own_error32" not in res  # (only for differences above the tol)
    # every conv of this resnet is followed by a BatchNorm: all fused, none left, no BN left
    assert res["convs"] == _conv_count("timm:test_resnet") > 0
    assert res["fused_conv"] == res["convs"] and res["convs_left"] == 0 and res["bns_left"] == 0
    assert any("add" in kind for kind in res["fused_kinds"])  # residual adds went into the epilogue
    assert res["bn_ops_left"] == 0 < res["bn_ops"]
    assert res["state_dict_problems"] == [] and res["deepcopy_err"] == 0 and res["pickle_err"] == 0
    assert res["autocast_ok"] and res["autocast_err"] <= 2 * res["autocast_err_original"] + 2 ** -7
    # after a reach the layout boundary compares the model on every call: nothing changed, nothing checked again
    assert res["layout_checks_after_reach32"] == 0 and not res["pinned32"] and res["reached_err32"] <= res["tol32"]


def test_a_model_the_layout_boundary_keeps_checking_after_a_reach_is_reported(monkeypatch):
    from fusedconv import cpu_boundary
    real = zoo._after_reach

    def changing_after_the_reach(model, x):  # as if the model changed itself on every call from then on
        monkeypatch.setattr(cpu_boundary, "_unchanged", lambda model, boundary: False)
        return real(model, x)

    monkeypatch.setattr(zoo, "_after_reach", changing_after_the_reach)
    res = zoo.run_model(ZooModel("timm:test_resnet"), size=SIZE, batch=2)
    assert res["layout_checks_after_reach32"] > 0 and res["pinned32"]
    assert any("after a reach" in f and "pinned to NCHW" in f for f in res["findings"])


def test_home_models_count_what_was_and_was_not_fused():
    functional = zoo.run_model(ZooModel("home:functional_bn"), size=SIZE)
    assert functional["findings"] == [] and functional["exact64"]
    assert (functional["convs"], functional["fused_conv"], functional["convs_left"]) == (2, 1, 1)
    reused = zoo.run_model(ZooModel("home:conv_output_reused"), size=SIZE)
    assert reused["findings"] == [] and reused["exact64"]
    assert reused["fused_conv"] == 0 and reused["bns_left"] == reused["bn_ops_left"] == 1
    assert sum(reused["skip_reasons"].values()) >= 1


def test_a_converted_model_off_by_1e_6_is_reported(monkeypatch):
    forward = FusedConv2d.forward

    def off_by_a_little(self, x, residual=None):
        return forward(self, x, residual) + 1e-6

    monkeypatch.setattr(FusedConv2d, "forward", off_by_a_little)
    res = zoo.run_model(ZooModel("home:functional_bn"), size=SIZE)
    assert res["convert"] and not res["exact64"]
    assert res["err64"] > zoo.EXACT_FLOAT64
    assert any(f.startswith("float64 mismatch") for f in res["findings"])


def test_a_fused_layer_leaving_the_autocast_dtype_is_reported(monkeypatch):
    forward = FusedConv2d.forward

    def in_float32(self, x, residual=None, residual_private=False):  # inside an autocast region only
        y = forward(self, x, residual, residual_private)
        return y.float() if torch.is_autocast_enabled("cpu") else y

    monkeypatch.setattr(FusedConv2d, "forward", in_float32)
    res = zoo.run_model(ZooModel("home:functional_bn"), size=SIZE)
    assert res["exact64"] and not res.get("autocast_ok")
    assert any(f.startswith("autocast call 1: output dtypes [torch.float32]") for f in res["findings"])


def test_state_dict_promise_check_flags_what_it_does_not_explain():
    model = ZooModel("home:functional_bn").build(SIZE).double()
    converted = fusedconv.convert(model)
    assert zoo.state_dict_problems(model, converted) == ([], [])
    # the stem conv is not fused: its weight must survive unchanged
    with torch.no_grad():
        converted.stem.weight.add_(1.0)
    converted.register_buffer("extra", torch.zeros(1))
    problems, _ = zoo.state_dict_problems(model, converted)
    assert "changed stem.weight" in problems and "unexpected extra" in problems


def test_rel_error_normalises_per_output_and_sees_non_finite():
    ref = {"a": torch.tensor([1.0, -4.0]), "b": torch.tensor([0.5])}
    assert zoo.rel_error({"a": torch.tensor([1.0, -4.0]), "b": torch.tensor([0.5])}, ref) == 0.0
    assert zoo.rel_error({"a": torch.tensor([1.4, -4.0]), "b": torch.tensor([0.5])}, ref) == pytest.approx(0.1)
    assert zoo.rel_error({"a": torch.tensor([1.0, float("nan")]), "b": torch.tensor([0.5])}, ref) == float("inf")
    with pytest.raises(RuntimeError, match="structure"):
        zoo.rel_error([torch.zeros(1)], ref)


def test_command_line_writes_json_and_report(tmp_path):
    out, md = tmp_path / "zoo.json", tmp_path / "zoo.md"
    assert zoo.main(["--models", "home:functional_bn,timm:no_such_model", "--size", str(SIZE),
                     "--json", str(out), "--md", str(md)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["model"] for r in results] == ["home:functional_bn", "timm:no_such_model"]
    assert results[0]["exact64"] and not results[1]["build"]
    text = md.read_text()
    assert "| home:functional_bn |" in text and "timm:no_such_model" in text.split("## Not built")[1]


def test_a_converted_model_that_raises_is_a_finding_not_a_crash(monkeypatch):
    def broken(self, x, residual=None):
        raise RuntimeError("fused layer broken on purpose")

    monkeypatch.setattr(FusedConv2d, "forward", broken)
    res = zoo.run_one(ZooModel("home:functional_bn"), size=SIZE, batch=2, timeout=60)
    assert res["convert"] and res.get("err64") is None and not res["exact64"]
    assert any("float64 forward raised RuntimeError: fused layer broken" in f for f in res["findings"])


def test_a_wrong_direct_call_is_reported(monkeypatch):
    """The float32 calls go through the flat forward's direct calls (fusedconv/graph/flat_fused.py; the first call's
    layout check has routed every layer): a direct call that is slightly off shows there, not in float64."""
    from fusedconv.graph import flat_fused
    from fusedconv.graph import flat

    from fusedconv import cpu_boundary

    # Off for float32 calls after the layout boundary's check (float64 calls and that check's runs are direct calls
    # too, through the F.conv2d routes: a model wrong in one layout only would simply stay NCHW).
    checking = [False]
    real_checked = cpu_boundary._checked

    def checked(*args, **kwargs):
        checking[0] = True
        try:
            return real_checked(*args, **kwargs)
        finally:
            checking[0] = False

    def off_when_direct(state, module, x, residual=None, residual_private=False):
        y = flat_fused.fused_call(state, module, x, residual, residual_private)
        return y + 1e-2 if state is not None and x.dtype == torch.float32 and not checking[0] else y

    monkeypatch.setattr(cpu_boundary, "_checked", checked)

    monkeypatch.setattr(flat, "fused_call", off_when_direct)
    res = zoo.run_model(ZooModel("timm:test_resnet"), size=SIZE, batch=2)
    assert res["exact64"] and res["direct32"] > 0
    assert res["repeat_err32"] > res["tol32"] and not res["match32"]
    assert any(f.startswith("repeat_err32: float32 mismatch") for f in res["findings"])


class _IllConditioned(nn.Module):
    """Ill-conditioned at float32 on purpose: the difference of two conv + BN + ReLU outputs whose weights differ by
    1e-5 (one BN, folded into each conv; the ReLU keeps convert from merging the two convs into one). In float64
    that is a small difference, exact to ~1e-11 of itself; in float32 each output's rounding (~6e-8 of it) is ~1e-2
    of the difference, and differs between any two float32 computations of the outputs (the original's and the
    converted model's)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight * (1 + 1e-5))

    def forward(self, x):
        return torch.relu(self.bn(self.a(x))) - torch.relu(self.bn(self.b(x)))


def _float32_calls_off(monkeypatch, by: float):
    """Every float32 FusedConv2d call on the CPU path (cpu.eager_forward) returns its output times 1 + `by`."""
    from fusedconv import cpu

    real = cpu.eager_forward

    def off(module, x, *args, **kwargs):
        y = real(module, x, *args, **kwargs)
        return y * (1 + by) if y is not None and y.dtype == torch.float32 else y

    monkeypatch.setattr(cpu, "eager_forward", off)


def test_an_ill_conditioned_model_is_listed_not_reported(monkeypatch):
    from bench import zoo_models, zoo_report

    monkeypatch.setitem(zoo_models.HOME_MODELS, "ill_conditioned", _IllConditioned)
    res = zoo.run_model(ZooModel("home:ill_conditioned"), size=SIZE, batch=2)
    assert res["exact64"] and res["fused_conv"] == 2
    # The float32 outputs differ by more than the tolerance, as two float32 forwards of this function do ...
    assert res["err32"] > res["tol32"] and not res["match32"]
    # ... and the converted one is as close to float64 as the original's own float32 output: no finding.
    assert res["findings"] == []
    assert "err32" in res["within_own_error32"]
    for distances in res["vs_float64_32"].values():
        assert distances["original"] > res["tol32"] and distances["converted"] <= 2 * distances["original"]
        assert distances["converted"] > res["tol32"]  # (not merely within the tolerance of float64)
    res["total_s"] = 0.0  # (set by the sweep around run_model)
    meta = {"date": "d", "machine": "m", "threads": 1, "python": "p", "versions": {}, "command": "c"}
    assert "1 more within twice the original's own float32 error" in zoo_report.render_markdown([res], meta)


def test_an_ill_conditioned_model_still_reports_a_wrong_float32_path(monkeypatch):
    from bench import zoo_models

    monkeypatch.setitem(zoo_models.HOME_MODELS, "ill_conditioned", _IllConditioned)
    _float32_calls_off(monkeypatch, 0.5)
    res = zoo.run_model(ZooModel("home:ill_conditioned"), size=SIZE, batch=2)
    assert res["exact64"]
    # Every float32 fused call 1.5x its value: far beyond twice the original's own float32 error against float64.
    distances = res["vs_float64_32"]["err32"]
    assert distances["converted"] > 2 * distances["original"] > 2 * res["tol32"]
    assert "err32" not in res.get("within_own_error32", [])
    assert any(f.startswith("err32: float32 mismatch") and "against float64" in f for f in res["findings"])


class _Scaled(nn.Module):
    """x times a factor, computed in float64 and returned in x's dtype: a float32 output off by a chosen amount."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return (x.double() * self.factor).to(x.dtype)


@pytest.mark.parametrize("converted_off, reported", [(0.9, False), (1.5, True)])
def test_float32_verdict_measures_the_converted_output_against_float64(monkeypatch, converted_off, reported):
    from bench import zoo_report

    # The original's float32 output is 0.3 tol low, the converted one `converted_off` tol high: more than the
    # tolerance apart from each other, and the converted one within the tolerance of float64 (0.9: no finding,
    # though more than twice the original's own 0.3) or not (1.5: beyond both, a finding).
    tol = zoo.SELF_CHECK_TOLERANCE[torch.float32]
    original, converted = _Scaled(1 - 0.3 * tol), _Scaled(1 + converted_off * tol)
    monkeypatch.setattr(fusedconv, "convert", lambda model: converted)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 1.0
    x_other = torch.rand(1, 3, 4, 4, dtype=torch.float64) + 1.0
    res = {"findings": []}
    zoo._float32_checks(original, x, x_other, res, x, x_other)
    assert res["err32"] > tol and res["batch1_err32"] > tol and not res["match32"]
    for distances in res["vs_float64_32"].values():
        assert distances["original"] == pytest.approx(0.3 * tol, rel=1e-2)
        assert distances["converted"] == pytest.approx(converted_off * tol, rel=1e-2)
    assert bool(res["findings"]) == reported
    assert res.get("within_own_error32", []) == ([] if reported else ["err32", "batch1_err32", "repeat_err32",
                                                                      "cl_err32", "inference_err32"])
    # The report's summary counts a model as within its own error only when every float32 check is.
    res["model"] = "m"
    assert ("1 more within twice" in zoo_report._within_own_error([res])) == (not reported)
    if not reported:
        res["within_own_error32"] = ["err32", "repeat_err32", "cl_err32", "inference_err32"]
        res["batch1_err32"] = 0.5 * tol
        assert "1 more within twice" in zoo_report._within_own_error([res])  # batch 1 inside the tolerance
    res["within_own_error32"], res["batch1_err32"] = ["err32"], 2 * tol  # batch 1, the repeated call: findings
    assert zoo_report._within_own_error([res]) == ""


class _LayoutAndThreads(nn.Module):
    """x times 1 + k * 1e-4, k set by the input's layout (2 NCHW, 3 channels_last) and the thread count (x5 at 2)."""

    def forward(self, x):
        k = (2.0 if x.is_contiguous() else 3.0) * (5.0 if torch.get_num_threads() == 2 else 1.0)
        return (x.double() * (1 + k * 1e-4)).to(x.dtype)


def test_the_originals_own_float32_error_is_the_largest_of_its_layouts_and_thread_counts():
    x64 = torch.rand(1, 3, 4, 4, dtype=torch.float64) + 1.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        own = zoo._own_float32_error(_LayoutAndThreads(), x64.float().double(), x64)
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(threads)
    assert own == pytest.approx(15e-4, rel=1e-3)  # channels_last at two threads


def test_other_float32_roundings_of_the_input_are_its_two_neighbours_chosen_at_random():
    x64 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x64[0, 0, 0, :4] = torch.tensor([1.0, -2.5, 0.0, 3.0])  # float32 values already: kept as they are
    rounded = zoo._rounded_inputs(x64, 3)
    assert len(rounded) == 3 and all(r.dtype == torch.float32 and r.shape == x64.shape for r in rounded)
    for r in rounded:
        low, high = torch.minimum(r.double(), x64), torch.maximum(r.double(), x64)
        # r is a float32 neighbour of x64: nothing float32 lies strictly between them
        assert bool((torch.nextafter(low.float(), torch.tensor(float("inf"))).double() >= high).all())
        assert torch.equal(r[0, 0, 0, :4], x64[0, 0, 0, :4].float())
    moved = [(r != x64.float()) for r in rounded]
    assert all(0.2 < m.double().mean() < 0.8 for m in moved)  # about half the elements off the nearest
    assert not torch.equal(rounded[0], rounded[1])
    assert torch.equal(zoo._rounded_inputs(x64, 3)[2], rounded[2])  # deterministic


class _Identity(nn.Module):
    def forward(self, x):
        return x * 1


def test_the_originals_own_float32_error_includes_other_roundings_of_its_input():
    # A float32 identity's error against float64 is its input's rounding: larger on a random rounding than on the
    # nearest one, and never beyond one float32 unit in the last place.
    x64 = torch.rand(1, 3, 8, 8, dtype=torch.float64) + 1.0
    nearest = zoo.rel_error(x64.float(), x64)
    own = zoo._own_float32_error(_Identity(), x64, x64)
    assert nearest < own <= 2.0 ** -23 * 2
    assert own == max(zoo.rel_error(r, x64) for r in zoo._rounded_inputs(x64, zoo.INPUT_ROUNDINGS))


class _Flagged(nn.Module):
    """conv -> BN -> ReLU, then a residual chosen by a flag read on every call: a guarded block (its fused graph is
    specialized for the flag) with stand-ins for its fallback."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.skip = True

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y + x if self.skip else y


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = _Flagged(), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("broken", [False, True])
def test_each_guarded_blocks_fallback_is_checked_against_the_original(monkeypatch, broken):
    from bench import zoo_models, zoo_report
    from fusedconv.graph import roles

    monkeypatch.setitem(zoo_models.HOME_MODELS, "flagged", _Holder)
    if broken:  # the BN's stand-in forgets its shift: only a call that misses the block's guard would see it
        monkeypatch.setattr(roles.BNRole, "forward", lambda self, y: y * self.fused.scale.view(-1, 1, 1))
    res = zoo.run_model(ZooModel("home:flagged"), size=SIZE, batch=2)
    assert res["exact64"] and res["fallback_blocks"] >= 1  # (the fused path is right either way)
    found = [f for f in res["findings"] if f.startswith("guard fallback:")]
    assert bool(found) == broken and (res["fallback_err64"] > 1e-3) == broken
    if broken:
        assert "block" in found[0]
    res["total_s"] = 0.0
    meta = {"date": "d", "machine": "m", "threads": 1, "python": "p", "versions": {}, "command": "c"}
    assert f"{res['fallback_blocks']} blocks over 1 models" in zoo_report.render_markdown([res], meta)


@pytest.mark.parametrize("broken", [False, True])
def test_the_input_gradient_is_checked_against_the_original(monkeypatch, broken):
    from bench import zoo_report

    if broken:  # the same values, twice the gradient: only a backward pass can tell
        real = FusedConv2d.forward

        def doubled(self, *args, **kwargs):
            y = real(self, *args, **kwargs)
            return y.detach() + (y - y.detach()) * 2 if y.requires_grad else y

        monkeypatch.setattr(FusedConv2d, "forward", doubled)
    res = zoo.run_model(ZooModel("timm:test_resnet"), size=SIZE, batch=2)
    assert res["exact64"] and res["grad_err64"] is not None
    assert (res["grad_err64"] > 1e-3) == broken
    assert any(f.startswith("input gradient differs") for f in res["findings"]) == broken
    res["total_s"] = 0.0
    meta = {"date": "d", "machine": "m", "threads": 1, "python": "p", "versions": {}, "command": "c"}
    assert "1 of 1 converted models compared" in zoo_report.render_markdown([res], meta)


class _OffWhen(nn.Module):
    """x, but 1 + 1e-3 times x on the calls `when` picks: a converted model wrong only in one variant of the call."""

    def __init__(self, when):
        super().__init__()
        self.when = when

    def forward(self, x):
        return x * (1 + 1e-3) if self.when(x) else x * 1


_VARIANTS = {
    "cl_err32": lambda x: not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last),
    "inference_err32": lambda x: torch.is_inference_mode_enabled(),
    "size2_err32": lambda x: x.shape[-1] == 8,
}


@pytest.mark.parametrize("variant", [None, *_VARIANTS])
def test_float32_variants_each_catch_a_model_wrong_only_there(monkeypatch, variant):
    converted = _OffWhen(_VARIANTS[variant] if variant else lambda x: False)
    monkeypatch.setattr(fusedconv, "convert", lambda model: converted)
    x, x_other = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 1, torch.rand(1, 3, 4, 4, dtype=torch.float64) + 1
    x2 = torch.rand(1, 3, 8, 8, dtype=torch.float64) + 1
    res = {"findings": []}
    zoo._float32_checks(_OffWhen(lambda x: False), x, x_other, res, x, x_other, (x2, x2))
    assert all(res[w] <= res["tol32"] for w in zoo.CHECKS32)
    assert set(zoo.VARIANTS32) <= set(res)
    assert res["match32"] == (variant is None)
    assert [f.split(":")[0] for f in res["findings"]] == ([] if variant is None else [variant])


@pytest.mark.parametrize("own, reported", [(1e-7, False), (1e-12, True)])
def test_an_input_gradient_off_by_rounding_is_judged_against_the_originals_own_spread(monkeypatch, own, reported):
    # Gradients 1e-8 off (as an ill-conditioned backward gives): no finding when the original's own gradient moves
    # 1e-7 under rounding changes, a finding when it moves 1e-12.
    real = FusedConv2d.forward

    def off(self, *args, **kwargs):
        y = real(self, *args, **kwargs)
        return y.detach() + (y - y.detach()) * (1 + 1e-8) if y.requires_grad else y

    monkeypatch.setattr(FusedConv2d, "forward", off)
    monkeypatch.setattr(zoo, "own_gradient_error", lambda model, x, grads: own)
    res = zoo.run_model(ZooModel("timm:test_resnet"), size=SIZE, batch=2)
    assert 1e-10 < res["grad_err64"] < 1e-6 and res["grad_own64"] == own
    assert any(f.startswith("input gradient differs") for f in res["findings"]) == reported
    from bench import zoo_report

    assert ("within twice the original's own spread" in zoo_report._gradients_within_own([res])) == (not reported)


def test_the_originals_own_gradient_spread_is_measured_under_rounding_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    grads = zoo.input_gradients(model, x)
    own = zoo.own_gradient_error(model, x, grads)
    assert 0 <= own < 1e-13  # a well-conditioned backward: rounding moves it by a few float64 units
    assert zoo.own_gradient_error(model, x, grads * (1 + 1e-6)) > 5e-7  # measured against the given gradient
