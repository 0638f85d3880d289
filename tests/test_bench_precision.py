"""``benchmarks/bench_precision.py`` bookkeeping without running a fit: multi-start selection, merge, render.

The benchmark itself takes minutes per data set; these checks cover what turns its saved runs into
the committed table (issue 4's comparison), so a broken merge or selection fails CI loudly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_precision as bp  # noqa: E402


def _rec(ds, prec, seed, own, f32, rmse):
    return {"dataset": ds, "precision": prec, "fit_seed": seed, "status": "ok", "n_train": 90,
            "mll_grad": {"mll": -1.0, "grad_norm": 1.0, "seconds": 0.1, "cg": {}},
            "fit": {"fit_mll_per_point_own": own, "fit_mll_per_point_f32": f32, "test_rmse": rmse,
                    "test_nll": 0.1, "fit_seconds": 1.0, "noise": 0.01}}


def _doc(results):
    return {"config": {"device": "cpu", "max_n": 100, "fit_iter": 2, "rtol": 1e-2, "rank": 10},
            "runs": ["cmd"], "results": results}


def test_each_precision_keeps_its_best_fit_by_its_own_mll():
    res = [_rec("pol", "float32", 0, -3.2, -3.2, 4.3), _rec("pol", "float32", 1, -3.1, -3.1, 4.2),
           _rec("pol", "bfloat16", 0, -3.0, -3.15, 4.0),  # own estimate best, float32's view worse
           _rec("pol", "bfloat16", 1, -3.05, -3.1, 4.21), {"dataset": "pol", "precision": "float16", "status": "failed"}]
    best = bp.best_of_seeds(res)
    assert best[("pol", "float32")][0]["fit_seed"] == 1 and best[("pol", "float32")][1] == [0, 1]
    assert best[("pol", "bfloat16")][0]["fit_seed"] == 0  # chosen by its own objective, as a user would
    assert ("pol", "float16") not in best


def test_merge_keeps_the_latest_run_per_seed_and_renders_the_multistart_table(tmp_path):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(_doc([_rec("pol", "float32", 0, -3.2, -3.2, 4.3), _rec("pol", "bfloat16", 0, -3.3, -3.3, 9.0)])))
    b.write_text(json.dumps(_doc([_rec("pol", "bfloat16", 0, -3.1, -3.1, 4.3), _rec("pol", "bfloat16", 1, -3.4, -3.4, 5.0)])))
    md = tmp_path / "bench.md"
    md.write_text("# B\n")
    out = tmp_path / "merged.json"
    assert bp.main(["--merge", str(a), str(b), "--out", str(out), "--markdown", str(md)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 3 and doc["merged_from"] == [str(a), str(b)]
    text = md.read_text()
    assert "**Multi-start**" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| pol | bfloat16 | 0,1 |"))
    assert "| 0 | -3.1000 |" in row and "| 4.3000 | 0.0e+00 |" in row  # seed 0 (from b) wins; RMSE = float32's


def test_single_seed_runs_render_no_multistart_table():
    assert bp._multistart_markdown([_rec("pol", "float32", 0, -3.2, -3.2, 4.3)]) == ""


def test_merge_of_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        bp.merge([str(tmp_path / "nope.json")])


def test_seed_summary_gives_the_mean_and_relative_range_per_precision():
    res = [_rec("pol", "float32", 0, -3.2, -3.2, 4.0), _rec("pol", "float32", 1, -3.1, -3.0, 4.4),
           _rec("pol", "bfloat16", 0, -3.0, -3.1, 4.2)]
    s = bp.seed_summary(res)
    f32 = s[("pol", "float32")]
    assert f32["seeds"] == [0, 1] and f32["rmse"] == pytest.approx(4.2) and f32["mll"] == pytest.approx(-3.1)
    assert f32["rmse_range"] == pytest.approx(0.4 / 4.2) and f32["mll_range"] == pytest.approx(0.2 / 3.1)
    assert s[("pol", "bfloat16")]["rmse_range"] == 0.0
    text = bp._spread_markdown(res)
    row = next(ln for ln in text.splitlines() if ln.startswith("| pol | bfloat16 |"))
    assert "| 4.2000 | 0.0e+00 | 0.0e+00 |" in row  # bf16's one fit equals float32's mean RMSE


def test_adam_runs_have_their_own_file_and_section_and_do_not_merge_with_lbfgs(tmp_path):
    lb, ad = _doc([_rec("pol", "float32", 0, -3.2, -3.2, 4.3)]), _doc([_rec("pol", "float32", 1, -3.2, -3.2, 4.3)])
    ad["config"].update(optimizer="adam", lr=0.05)
    assert bp.section_name(bp.doc_args(lb)) == "precision_cpu"  # runs saved before --optimizer: L-BFGS-B
    assert bp.section_name(bp.doc_args(ad)) == "precision_cpu_adam"
    (tmp_path / "a.json").write_text(json.dumps(lb))
    (tmp_path / "b.json").write_text(json.dumps(ad))
    with pytest.raises(ValueError, match="different optimizers"):
        bp.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    md = tmp_path / "bench.md"
    md.write_text("# B\n")
    assert bp.main(["--render", str(tmp_path / "b.json"), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "precision_cpu_adam" in text and "--optimizer adam --lr 0.05" in text
