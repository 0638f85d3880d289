"""``benchmarks/bench_distributed.py`` bookkeeping: rounds, paired efficiencies and the rendered table.

The benchmark launches torch.distributed process groups; these checks cover how its measurements are
combined (issue 6's weak-scaling figure is a median of per-round paired ratios), plus one tiny run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_distributed as bd


def _rec(p, seconds, mode="weak"):
    return {"status": "ok", "strategy": "columns", "mode": mode, "ranks": p, "num_probes": 7, "grid": f"1x{p}",
            "seconds": seconds, "times_by_rank": [[seconds]] * p, "comm_seconds": 1e-4, "collectives": 1,
            "iterations_max": 10, "num_matmuls": 11, "value": -1.0}


def test_rounds_are_combined_by_median_and_keep_every_time():
    rec = bd._combine_rounds([_rec(2, 3.0), _rec(2, 1.0), _rec(2, 2.0)])
    assert rec["seconds"] == 2.0 and rec["seconds_rounds"] == [3.0, 1.0, 2.0]
    assert len(rec["times_by_rank"]) == 6  # 3 rounds x 2 ranks
    failed = bd._combine_rounds([_rec(2, 1.0), {"status": "failed", "error": "boom"}])
    assert failed["status"] == "failed" and failed["error"] == "boom"


def test_efficiency_is_the_median_of_paired_round_ratios():
    # The machine drifts: round 2 is slow for both rank counts.  Paired ratios see 100% every round;
    # the ratio of medians would not.
    one = bd._combine_rounds([_rec(1, 1.0), _rec(1, 2.0), _rec(1, 1.1)])
    two = bd._combine_rounds([_rec(2, 1.0), _rec(2, 2.0), _rec(2, 1.1)])
    strong = [bd._combine_rounds([_rec(p, t, "strong") for t in ts]) for p, ts in ((1, [2.0, 2.2]), (2, [1.0, 1.0]))]
    results = [dict(one, strategy="columns", mode="weak", ranks=1), dict(two, strategy="columns", mode="weak", ranks=2)]
    results += [dict(strong[0], mode="strong", ranks=1), dict(strong[1], mode="strong", ranks=2)]
    bd._efficiencies(results)
    assert results[1]["efficiency"] == pytest.approx(1.0) and results[1]["efficiency_rounds"] == pytest.approx([1.0] * 3)
    assert results[3]["efficiency"] == pytest.approx(statistics.median([2.0 / 2.0, 2.2 / 2.0]))
    assert bd._eff_text(results[1]) == "100% (100%–100%)" and bd._eff_text(results[0]) == "100%"


def test_single_round_keeps_the_plain_ratio():
    results = [_rec(1, 2.0), _rec(2, 2.5)]
    bd._efficiencies(results)
    assert results[1]["efficiency"] == pytest.approx(0.8) and "efficiency_rounds" not in results[1]


def test_tiny_run_with_rounds_renders_a_table(tmp_path):
    out, md = tmp_path / "d.json", tmp_path / "d.md"
    bd.main(["--n", "300", "--ranks", "1,2", "--strategies", "columns", "--repeats", "1", "--rounds", "2", "--no-pin",
             "--timeout", "240", "--out", str(out), "--markdown", str(md)])
    payload = json.loads(out.read_text())
    weak2 = next(r for r in payload["results"] if r["mode"] == "weak" and r["ranks"] == 2)
    assert weak2["status"] == "ok", weak2.get("error")
    assert len(weak2["seconds_rounds"]) == 2 and len(weak2["efficiency_rounds"]) == 2
    text = md.read_text()
    assert "2 alternating rounds" in text and "| columns | weak | 2 |" in text


def test_zero_rounds_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bd.main(["--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err
