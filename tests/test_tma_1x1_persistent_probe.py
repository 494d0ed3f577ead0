"""bench/tma_1x1_persistent_probe.py on CPU: its dry run (TRITON_INTERPRET=1, one tiny layer) end to end through
the library's launcher, and its report from a results file."""

from __future__ import annotations

import json

import pytest

from bench import tma_1x1_persistent_probe as probe


@pytest.mark.interpret
def test_dry_run_checks_the_pointer_kernel_and_every_pruned_tma_config(tmp_path):
    out = tmp_path / "probe.json"
    assert probe.main(["--dry-run", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows][-1] == "pointer"
    tma = [r for r in rows if r["provider"] == "tma"]
    assert any(r["persistent"] for r in tma) and any(not r["persistent"] for r in tma)
    bad = [(r.get("config", r["provider"]), r.get("error"), r.get("rel_error")) for r in rows if not r["ok"]]
    assert not bad
    assert all(0 <= r["rel_error"] <= probe.TOLERANCE for r in rows)
    assert "| tiny | 2 |" in (tmp_path / "probe.md").read_text()


def test_report_picks_the_best_correct_config_per_family(tmp_path):
    def row(provider, ms, ok=True, **kw):
        return {"layer": "l1", "batch": 32, "provider": provider, "time_ms": ms, "ok": ok, "bytes": 4.2e7,
                "rel_error": 1e-3 if ok else 0.5, **kw}
    results = {"environment": {"device_name": "GPU X", "torch": "t", "triton": "3.6.0", "cudnn": 1,
                               "git_commit": "abc"},
               "date": "2026-12-04", "command": "python -m bench.tma_1x1_persistent_probe",
               "ceilings": {"copy_tb_s": 4.2},
               "rows": [row("cudnn", 0.0074), row("pointer", 0.0126),
                        row("tma", 0.0110, config="A", persistent=False),
                        row("tma", 0.0050, ok=False, config="WRONG", persistent=True),
                        row("tma", 0.0068, config="P", persistent=True)],
               "notes": []}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert probe.main(["--report", str(path)]) == 0
    md = (tmp_path / "r.md").read_text()
    # the wrong (faster) persistent config is listed as failed, never taken as the best
    assert "| l1 | 32 | 7.4 | 12.6 | 11.0 (A) | 6.8 (P) | 1.09 | 147 | WRONG: rel 0.5 |" in md
    assert "Geometric mean of best Triton x cuDNN over 1 (layer, batch) rows: 1.09." in md
