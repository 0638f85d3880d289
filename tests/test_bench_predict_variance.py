"""``benchmarks/predict_variance.py``: a tiny run on generated data (what it writes, never how fast)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import predict_variance as pv  # noqa: E402


def test_tiny_run_certified_arms_meet_their_tolerance(tmp_path):
    # an empty --data-dir: load_problem generates a synthetic problem of kin40k's width
    argv = ["--datasets", "kin40k", "--n", "300", "--m", "25", "--fit-first", "120", "--rank", "20",
            "--data-dir", str(tmp_path), "--out", str(tmp_path / "pv.json"), "--markdown", str(tmp_path / "b.md")]
    assert pv.main(argv) == 0
    payload = pv.C.read_json(tmp_path / "pv.json")
    (ds,) = payload["datasets"]
    assert ds["data"]["source"].startswith("synthetic")
    assert [(a["rule"], a["rtol"]) for a in ds["arms"]] == list(pv.GPYTORCH_ARMS) + list(pv.ARMS)
    for a in ds["arms"]:
        assert a["rule"] == "gpytorch" or a["status"] == "CONVERGED"  # stock GPyTorch reports no CG status
        if a["rule"] in ("certified", "gpscale-backend"):
            assert a["within_rtol"] and 0 <= a["var_y_rel_excess_min"] <= a["var_y_rel_excess_max"] <= a["rtol"]
        if a["rule"] == "gpscale-backend":  # the whole covariance: symmetric, too large by a small PSD matrix
            assert a["cov_asymmetry_max_over_noise"] <= 1e-9 and a["cov_excess_eig_min_over_noise"] >= -1e-9
            assert a["cov_entry_error_max_over_noise"] <= a["rtol"] * (1 + 1e-6)
    assert 0.99 < ds["spectrum_floor"] <= 1.0
    text = (tmp_path / "b.md").read_text()
    assert "<!-- BEGIN predict_variance" in text and "| kin40k |" in text and "| gpscale-backend |" in text


def test_no_gpytorch_flag_runs_the_gpscale_arms_only(tmp_path):
    argv = ["--datasets", "kin40k", "--n", "200", "--m", "10", "--fit-first", "80", "--rank", "10", "--no-gpytorch",
            "--data-dir", str(tmp_path), "--out", str(tmp_path / "pv.json")]
    assert pv.main(argv) == 0
    (ds,) = pv.C.read_json(tmp_path / "pv.json")["datasets"]
    assert [(a["rule"], a["rtol"]) for a in ds["arms"]] == list(pv.ARMS)
