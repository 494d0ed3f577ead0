"""The GPU check's stream-K coverage (bench/check_streamk.py, bench/check_correctness.py), the stream-K autotune
key (one autotuner per program count) and the stream-K workspace size, without a GPU.

Planning tests build the case list the GPU machine runs for an H200's 132 SMs and check it holds every stream-K
kind: program counts above the SM count, uneven slices, the TMA stream-K kernels, the "streamk" warm-up
candidate. The interpreter test shows a workspace slot smaller than the launched tile is refused by the kernel's
static_assert, so sizing the slots per launch cannot silently overrun them.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("torchvision")

import fusedconv.kernels as fk  # noqa: E402
from bench import check_correctness as cc  # noqa: E402
from bench import check_streamk as cs  # noqa: E402
from bench import gpu_check  # noqa: E402
from fusedconv.kernels import configs as kconfigs  # noqa: E402
from fusedconv.kernels import conv_tma_streamk, denylist  # noqa: E402

launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")
H200_SMS = 132
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def h200_items():
    return gpu_check.correctness_items(False, [], num_sms=H200_SMS)


def _geometry(item):
    return cc.Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in item["geometry"].items()})


def test_case_list_runs_stream_k_at_the_rules_program_counts(h200_items):
    """Every GEMM item runs the pointer stream-K kernel at one program per SM and the rule's other counts;
    some run more programs than SMs (batch-1 short-K layers); a stream-K layer runs the TMA stream-K kernel."""
    gemm = [it for it in h200_items if "stream-K" in it.get("schedules", ())]
    assert gemm and all(H200_SMS in it["streamk_counts"] for it in gemm)
    for it in gemm[::25]:  # the counts are the library's rule, recomputed independently here
        g, dtype = _geometry(it), torch.float32 if it["dtype"] in ("tf32", "float32") else getattr(torch, it["dtype"])
        plan = cs.layer_plan(g, it["batch"], dtype, H200_SMS)
        counts = set(fk.schedule.streamk_program_counts(plan["m"], plan["cout_g"], plan["cout"] // plan["cout_g"],
                                                        cs.k_steps(g, 64), H200_SMS))
        assert counts <= set(it["streamk_counts"])
    above = [it for it in gemm if it["batch"] == 1 and max(it["streamk_counts"]) > H200_SMS]
    assert above and all(max(it["streamk_counts"]) <= 2 * H200_SMS for it in gemm)
    tma_sk = [it for it in h200_items if "tma-stream-K" in it.get("schedules", ())]
    layer_tma_sk = [it for it in tma_sk if not it["geometry"]["name"].startswith("t_")]
    assert layer_tma_sk, "no bench layer runs the TMA stream-K kernels"
    for it in layer_tma_sk[:5]:  # only where the rule gives the layer stream-K (its pick or the warm-up one)
        g = _geometry(it)
        plan = cs.layer_plan(g, it["batch"], torch.float16 if it["dtype"] == "float16" else torch.float32, H200_SMS)
        assert plan["streamk_programs"] or plan["filling_streamk"]


def test_case_list_has_the_warm_up_candidate_on_a_short_layer(h200_items):
    (warm,) = [it for it in h200_items if it.get("schedules") == [cs.WARMUP_SCHEDULE]]
    assert h200_items[0] is warm  # first: it is cheap and nothing else runs the launcher's candidate
    plan = cs.layer_plan(_geometry(warm), warm["batch"], torch.float16, H200_SMS)
    assert plan["filling_streamk"] > 0 and plan["streamk_programs"] != plan["filling_streamk"]


def test_some_config_runs_uneven_slices_and_more_programs_than_sms(h200_items):
    """On a batch-1 stream-K layer a config's runs include a count above the SM count and one where some
    programs get one K step more than others (units % programs != 0)."""
    found_above = found_uneven = False
    for it in h200_items:
        if it["batch"] != 1 or it["dtype"] != "float16" or "stream-K" not in it.get("schedules", ()):
            continue
        g = _geometry(it)
        for cfg in cc.candidate_configs(g, 1, "float16", CPU, "stream-K"):
            units = cs.work_units(g, 1, cfg, "streamk")
            counts = cs.config_program_counts(it["streamk_counts"], units)
            found_above |= any(p > H200_SMS and p <= units for p in counts)
            found_uneven |= any(cs.uneven(units, p) for p in counts)
        if found_above and found_uneven:
            break
    assert found_above and found_uneven


def test_config_program_counts_add_an_uneven_count_only_when_missing():
    assert cs.config_program_counts([4], 8) == [4, 5]  # 8 / 4 is even: 5 programs, three of them 2 steps
    assert cs.config_program_counts([3], 8) == [3]  # 8 / 3: already uneven
    assert cs.config_program_counts([132], 2) == [132]  # too few units to split unevenly
    assert cs.uneven(7, 5) and not cs.uneven(10, 5) and not cs.uneven(3, 5)


def test_check_item_runs_each_stream_k_config_at_each_count(monkeypatch):
    """The pointer and TMA stream-K schedules call the launcher with stream_k = each count and label the rows
    with their own kernel names (so a failure is deny-listed under that kernel)."""
    seen = []

    def stand_in(x, weight, scale, shift, stream_k=None, tma=None, **kw):
        seen.append((stream_k, tma))
        return fk.conv_bn_act_ref(x, weight, scale, shift, **kw)

    monkeypatch.setattr(fk, "conv_bn_act", stand_in)
    g = cc.Geometry("p", 32, 6, 6, 16, 1, 1)
    cfg = cc.candidate_configs(g, 1, "float16", CPU, "stream-K")[0]
    rows = cc.check_item(g, 1, "float16", CPU, [cfg], schedule="stream-K", counts=[2, 4])
    units = cs.work_units(g, 1, cfg, "streamk")
    assert [r["programs"] for r in rows] == cs.config_program_counts([2, 4], units)
    assert seen == [(p, False) for p in cs.config_program_counts([2, 4], units)]
    assert all(r["ok"] and r["kernel"] == "streamk" and r["units"] == units for r in rows), rows
    tma_cfg = cc.candidate_configs(g, 1, "float16", CPU, "tma-stream-K")[0]
    seen.clear()
    rows = cc.check_item(g, 1, "float16", CPU, [tma_cfg], schedule="tma-stream-K", counts=[3])
    assert seen[0] == (3, True) and rows[0]["kernel"] == "tma1x1_streamk" and rows[0]["ok"], rows
    kxk = cc.Geometry("k", 16, 6, 6, 32, 3, 3, padding=(1, 1))
    assert cc.check_item(kxk, 1, "float16", CPU, cc.candidate_configs(kxk, 1, "float16", CPU, "tma-stream-K")[:1],
                         schedule="tma-stream-K", counts=[3])[0]["kernel"] == "tmakxk_streamk"


def test_warm_up_pin_takes_streamk_and_fails_loudly_without_it():
    with cc.pinned_warmup(True):
        choice = launcher._variant_choice
        assert choice.choose("k", {"pointer": None, "streamk": None}, CPU) == "streamk"
        with pytest.raises(RuntimeError, match="no 'streamk' warm-up candidate"):
            choice.choose("k", {"pointer": None}, CPU)
    assert launcher._variant_choice is fk.variant_choice


def test_deny_list_keys_tell_the_stream_k_kernels_apart(monkeypatch):
    """A failing config of each kernel becomes an entry under its own kernel name; the warm-up run adds none."""
    added = []
    monkeypatch.setattr(denylist, "add_entries", lambda new: added.extend(new) or len(new))
    env = {"device_name": "GPU", "triton": "3.6.0", "date": "d"}
    base = {"geometry": "g", "batch": 1, "dtype": "float16", "path": "1x1", "ok": False, "error": "wrong"}
    kernels = ("gemm", "streamk", "tma1x1", "tma1x1_streamk", "tmakxk", "tmakxk_streamk")
    rows = [dict(base, kernel=k, config_key=[64, 64, 32, 8, 4, 3]) for k in kernels]
    rows.append(dict(base, kernel="streamk", schedule=cs.WARMUP_SCHEDULE, config_key=[16, 16, 16, 8, 4, 3]))
    assert gpu_check.update_denylist(rows, env) == len(kernels)
    assert [e["kernel"] for e in added] == list(kernels)
    assert len({(e["kernel"], tuple(e["config"])) for e in added}) == len(kernels)


def test_tma_stream_k_pruning_applies_its_own_deny_list_entries(monkeypatch):
    """A "tma1x1_streamk" entry drops that config from the stream-K kernel's pruning and not from the
    data-parallel TMA kernel's; a "tma1x1" entry (same K loop) drops it from both."""
    base = SimpleNamespace(is_cuda=True, dtype=torch.float16, device=torch.device("cuda", 0), element_size=lambda: 2)
    named = {"a_desc": SimpleNamespace(base=base), "M": 4096, "CIN": 256, "COUT": 256, "HAS_RESIDUAL": False}
    configs = conv_tma_streamk.configs_1x1(2)
    kept = conv_tma_streamk._prune_1x1(configs, named)
    victim = denylist.config_key(kept[0])
    monkeypatch.setattr(denylist, "_gpu_name", lambda index: "Fake GPU")
    import triton

    for kernel, in_streamk, in_dp in (("tma1x1_streamk", False, True), ("tma1x1", False, False)):
        entries = ({"gpu": "Fake GPU", "triton": triton.__version__, "kernel": kernel, "config": list(victim)},)
        monkeypatch.setattr(denylist, "_entries", lambda path, entries=entries: entries)
        sk = {denylist.config_key(c) for c in conv_tma_streamk._prune_1x1(configs, named)}
        dp = {denylist.config_key(c) for c in fk.conv_tma._prune_tma(configs, named)}
        assert (victim in sk, victim in dp) == (in_streamk, in_dp), kernel


def test_stream_k_autotuners_are_per_program_count():
    """The grid is no kernel argument, so the autotune key cannot hold the program count: each count gets its
    own autotuner (and so its own tuned config), for the pointer and both TMA stream-K kernels."""
    assert launcher._get_autotuned_streamk(132) is launcher._get_autotuned_streamk(132)
    assert launcher._get_autotuned_streamk(132) is not launcher._get_autotuned_streamk(264)
    for kind in ("1x1", "kxk"):
        assert conv_tma_streamk._autotuned_kernel(kind, 132) is conv_tma_streamk._autotuned_kernel(kind, 132)
        assert conv_tma_streamk._autotuned_kernel(kind, 132) is not conv_tma_streamk._autotuned_kernel(kind, 264)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_workspace_slot_is_the_largest_pruned_tile(dtype):
    """A small layer's slots hold its largest candidate tile, not 128x128; a large layer's the full tile."""
    small = launcher.streamk_workspace_tile(dtype, CPU, 49, 32, 64, 1, 1, True, False, False, 16, False)
    named = {"x_ptr": torch.empty(0, dtype=dtype), "M": 49, "COUT_G": 32, "CIN_G": 64, "KH": 1, "KW": 1,
             "IS_1X1": True, "FLAT_K": False, "HAS_RESIDUAL": False}
    pruned = kconfigs.prune_streamk_configs(kconfigs.all_autotune_configs(), named)
    assert small == max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in pruned) <= 64 * 32
    big = launcher.streamk_workspace_tile(dtype, CPU, 4096, 512, 512, 3, 3, False, False, False, 16, False)
    assert big == kconfigs.STREAMK_MAX_TILE
    base = SimpleNamespace(base=torch.empty(0, dtype=dtype))
    assert conv_tma_streamk.workspace_tile("1x1", {"a_desc": base, "M": 49, "CIN": 64, "COUT": 32,
                                                   "HAS_RESIDUAL": False}) <= 64 * 32
    assert conv_tma_streamk.workspace_tile("kxk", {"x_desc": base, "CIN": 64, "COUT": 16,
                                                   "HAS_RESIDUAL": False}) < kconfigs.STREAMK_MAX_TILE


@pytest.mark.interpret
@pytest.mark.parametrize("shrink", [1, 2])
def test_too_small_workspace_cannot_launch(monkeypatch, shrink):
    """The launcher's stream-K launch with slots of the tile's size runs; with half of it the kernel's
    static_assert refuses to build (a smaller slot would be overrun silently otherwise)."""
    tile = kconfigs.INTERPRET_CONFIG["BLOCK_M"] * kconfigs.INTERPRET_CONFIG["BLOCK_N"]
    monkeypatch.setattr(launcher, "_streamk_tile", lambda plan, x: tile // shrink)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 1, 1, generator=gen)
    scale, shift = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    if shrink == 1:
        out = fk.conv_bn_act(x, fk.pack_weight(w), scale, shift, stream_k=2, tma=False)
        ref = fk.conv_bn_act_ref(x.double(), w.double(), scale.double(), shift.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(Exception, match="(?i)assert"):
            fk.conv_bn_act(x, fk.pack_weight(w), scale, shift, stream_k=2, tma=False)


def test_too_small_workspace_cannot_compile_for_sm90():
    """Ahead of time for sm_90 (as a GPU build would): a pointer and a TMA stream-K variant compile with slots of
    their tile's size and are refused by the static_assert with half of it."""
    import os

    from bench import aot

    os.environ.pop("TRITON_INTERPRET", None)
    pointer = min((v for v in kconfigs.aot_variants() if "WS_TILE" in v["constexprs"]),
                  key=lambda v: v["constexprs"]["BLOCK_M"] * v["constexprs"]["BLOCK_N"])
    tma = min((v for v in conv_tma_streamk.aot_variants() if "BLOCK_M" in v["constexprs"]),
              key=lambda v: v["constexprs"]["BLOCK_M"] * v["constexprs"]["BLOCK_N"])
    for variant in (pointer, tma):
        k = variant["constexprs"]
        tile = k["BLOCK_M"] * k["BLOCK_N"]
        for ws_tile, fits in ((tile, True), (tile // 2, False)):
            spec = {key: variant[key] for key in ("fn", "signature", "divisible_by_16", "num_warps", "num_stages")}
            spec["constexprs"] = {**k, "WS_TILE": ws_tile}
            if fits:
                assert aot.compile_cubin(spec, 90)[0], variant["name"]
            else:
                with pytest.raises(Exception, match="(?i)assert"):
                    aot.compile_cubin(spec, 90)


def test_launch_workspace_tile_matches_the_launch_pruning():
    """The TMA stream-K launchers' cached slot size is `workspace_tile` of the launch's own arguments."""
    for kind, named in (("1x1", {"M": 49, "CIN": 64, "COUT": 32}), ("kxk", {"M": 0, "CIN": 64, "COUT": 16})):
        base = SimpleNamespace(base=torch.empty(0, dtype=torch.float16))
        expected = conv_tma_streamk.workspace_tile(kind, {"a_desc" if kind == "1x1" else "x_desc": base, **named,
                                                          "HAS_RESIDUAL": True})
        got = conv_tma_streamk._launch_workspace_tile(kind, torch.float16, CPU, named["M"], named["CIN"],
                                                      named["COUT"], True)
        assert got == expected < kconfigs.STREAMK_MAX_TILE
