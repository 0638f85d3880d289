"""``benchmarks/crossover.py`` (sets ``CHOLESKY_CROSSOVER``): its crossover finder and a tiny run on CPU.

The runs check what the script writes, never how fast anything is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import gpscale

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import crossover as cx  # noqa: E402


def _records(ratios):
    """Records with Cholesky at 1 s and iterative at ``ratio`` s for each ``n``."""
    out = []
    for n, ratio in ratios.items():
        out.append({"kernel": "rbf", "method": "cholesky", "n": n, "status": "ok", "total_s": 1.0})
        out.append({"kernel": "rbf", "method": "iterative", "n": n, "status": "ok", "total_s": ratio})
    return out


def test_crossover_is_interpolated_where_iterative_starts_winning_for_good():
    x = cx.find_crossover(_records({1000: 2.0, 2000: 0.5, 4000: 0.25}), "rbf")
    assert x["last_cholesky_faster_n"] == 1000 and x["first_grid_n"] == 2000
    assert 1000 < x["crossover_n"] < 2000
    # a dip that does not last is not a crossover
    x = cx.find_crossover(_records({1000: 0.5, 2000: 2.0, 4000: 0.5}), "rbf")
    assert x["first_grid_n"] == 4000


def test_no_crossover_says_the_ratio_at_the_largest_size():
    x = cx.find_crossover(_records({1000: 0.8, 4000: 1.01}), "rbf")
    assert x["crossover_n"] is None
    assert "4000: iterative / Cholesky 1.01" in x["note"]


def test_tiny_run_at_fitted_hyperparameters(tmp_path):
    payload = cx.run(cx.parse_args(["--synthetic", "--sizes", "60,120", "--kernels", "rbf", "--repeats", "1",
                                    "--fit-first", "60", "--d", "2", "--memory-limit-gb", "0",
                                    "--out", str(tmp_path / "c.json")]))
    fitted = payload["fitted"]["rbf"]
    assert fitted["noise"] > 0 and fitted["outputscale"] > 0 and len(fitted["lengthscale"]) == 2  # ARD
    recs = payload["records"]
    assert {(r["n"], r["method"]) for r in recs} == {(n, m) for n in (60, 120) for m in cx.METHODS}
    assert all(r["status"] == "ok" for r in recs)
    # the timings ran at the fitted hyperparameters, not at --lengthscale/--outputscale/--noise
    X, y, _ = cx.C.load_problem(60, 2, synthetic=True, seed=0)
    k = gpscale.kernels.RBF(lengthscale=fitted["lengthscale"], outputscale=fitted["outputscale"])
    want = gpscale.marginal_log_likelihood(torch.as_tensor(X), torch.as_tensor(y), k, fitted["noise"],
                                           fitted["mean"], method="cholesky").detach()
    mll = {(r["n"], r["method"]): r["mll"] for r in recs}
    assert abs(mll[60, "cholesky"] - float(want)) <= 1e-9 * abs(float(want))
    assert abs(mll[120, "cholesky"] - mll[120, "iterative"]) <= 0.05 * abs(mll[120, "cholesky"])
    assert (tmp_path / "c.json").exists()
