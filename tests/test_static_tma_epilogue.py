"""bench/static_tma_epilogue.py: the epilogue span of a SASS listing (K loop's closing branch to the first
unpredicated EXIT) on a hand-written listing, and the report's pairing of each layer's best TMA config with its
TMA-store twin."""

from __future__ import annotations

from bench import sass
from bench import static_tma_epilogue as ste

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0020*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;
        /*0030*/                   ISETP.NE.AND P0, PT, R2, RZ, PT ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   LDG.E R6, desc[UR4][R2.64] ;
        /*0060*/                   STSM.16.M88.4 [R3], R4 ;
        /*0070*/                   UTMASTG.2D [UR4], [UR6] ;
        /*0078*/               @P1 EXIT ;
        /*007c*/                   STG.E [R4.64], R8 ;
        /*0080*/                   EXIT ;
        /*0090*/                   STG.E [R2.64], R4 ;
        /*00a0*/                   EXIT ;
"""


def test_epilogue_span_runs_from_the_loop_branch_to_the_first_unpredicated_exit():
    summary = ste.epilogue_summary(sass.parse(LISTING))
    # LDG, STSM, UTMASTG, @P1 EXIT, STG, EXIT: past the predicated EXIT, not past the unpredicated one
    assert summary["instructions"] == 6
    assert (summary["LDG"], summary["STSM"], summary["UTMASTG"], summary["STG"]) == (1, 1, 1, 1)


def test_no_loop_no_epilogue():
    assert ste.epilogue_summary(sass.parse("        /*0000*/                   EXIT ;\n")) is None


def _row(config, epilogue, tma_store=False, est=1.0):
    return {"config": config + (" tma-store" if tma_store else ""), "tma_store": tma_store, "ok": True,
            "issue_ratio": 0.3, "stack_bytes": 0, "mma": "wgmma", "est_us": est, "waves": 1.0, "tiles": 100,
            "registers": 100, "shared_bytes": 1024, "epilogue": {"instructions": epilogue}}


def test_report_pairs_the_best_config_with_its_twin_and_adds_a_twinned_pair_when_it_has_none():
    layer = {"net": "n", "layer": "l", "shape": "s", "residual": False, "schedule": "data-parallel",
             "rows": [_row("tma 64x64x64 w4/s4", 300, est=1.0), _row("tma 128x128x64 w8/s4", 500, est=2.0),
                      _row("tma 128x128x64 w8/s4", 350, tma_store=True, est=2.0)]}
    table = [ln for ln in ste.markdown([layer], "cmd").splitlines() if ln.startswith("| n l") or ln.startswith("|  |")]
    assert len(table) == 2
    assert "64x64x64 w4/s4 (best)" in table[0] and "| 300 (" in table[0] and table[0].endswith("| — |")
    assert "128x128x64 w8/s4" in table[1] and "| 500 (" in table[1] and "| 350 (" in table[1]
