"""``gpscale bench precond`` end to end on generated data: JSON, Markdown and PNG outputs, wiring, cache."""

from __future__ import annotations

import argparse
import json
import math

import pytest

import gpscale.bench
from gpscale.bench import _problems
from gpscale.bench import precond as bench

FAMILIES = "none,jacobi,pivchol,rpchol,rpchol-block,rpchol-diag,nystrom,gpytorch"
ARGS = ["--synthetic", "--max-n", "400", "--ranks", "10,40", "--seeds", "0,1", "--preconditioners", FAMILIES,
        "--hyper-n", "150", "--hyper-iter", "10", "--num-probes", "4", "--rtols", "1e-2,1e-4", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny benchmark run shared by the output checks (n = 400, 1 data set, 2 ranks, 2 seeds)."""
    pytest.importorskip("gpytorch")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(ARGS + ["--out-dir", str(out)]) == 0
    return out


def test_outputs_written(run_dir):
    """results.json, results.md, the hyperparameter cache and three non-empty PNGs."""
    for name in ("results.json", "results.md", "hypers.json", "residuals.png", "logdet_error.png",
                 "iterations.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "residuals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_contents(run_dir):
    """Every arm has construction time, iterations / wall time per tolerance and log-det error ± std."""
    res = json.loads((run_dir / "results.json").read_text())
    ds = res["datasets"]["synthetic"]
    assert ds["n"] == 400 and ds["logdet_n"] == 400 and math.isfinite(ds["exact_logdet"])
    arms = {(a["family"], a["rank"]): a for a in ds["arms"]}
    expected = {("none", 0), ("jacobi", 0)} | {(f, r) for f in FAMILIES.split(",")[2:] for r in (10, 40)}
    assert set(arms) == expected
    for arm in arms.values():
        s = arm["summary"]
        assert s["build_seconds"] >= 0 and len(arm["runs"]) == 2
        for rtol in ("0.01", "0.0001"):
            m = s[rtol]
            assert m["converged"] and m["iters_y"] >= 1 and m["wall_seconds"] > 0
            assert m["logdet_std"] is not None and m["logdet_abs_error_mean"] >= 0
        assert s["0.0001"]["iters_y"] >= s["0.01"]["iters_y"]
        h = arm["history_y"]  # relative residual curve of the y column, tightest tolerance, first seed
        assert h[0] == pytest.approx(1.0) and h[-1] <= 1e-4
    for fam in ("pivchol", "gpytorch", "rpchol", "rpchol-diag", "nystrom"):
        lo, hi = arms[(fam, 10)]["summary"]["0.0001"], arms[(fam, 40)]["summary"]["0.0001"]
        assert hi["iters_y"] < lo["iters_y"] < arms[("none", 0)]["summary"]["0.0001"]["iters_y"]
    assert arms[("pivchol", 40)]["summary"]["rank_actual"] == 40
    assert res["settings"]["max_n"] == 400 and res["environment"]["device"] == "cpu"


def test_markdown_table(run_dir):
    text = (run_dir / "results.md").read_text()
    assert "--max-n 400" in text and "## synthetic" in text
    table = text[text.index("## synthetic"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "preconditioner" not in line]
    assert len(rows) == 2 + 6 * 2
    # the summary compares RPCholesky at the largest rank run (40) with none and greedy pivoted Cholesky
    res = json.loads((run_dir / "results.json").read_text())
    arms = {(a["family"], a["rank"]): a["summary"] for a in res["datasets"]["synthetic"]["arms"]}
    summary = text[text.index("## Summary: rpchol at rank 40"):text.index("## synthetic")]
    row = next(line for line in summary.splitlines() if line.startswith("| synthetic"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{arms[('none', 0)]['0.0001']['iters_y']:.0f}"
    assert cells[3].startswith(f"{arms[('rpchol', 40)]['0.0001']['iters_y']:.0f} (")
    assert "→" in cells[6] and cells[6].endswith("x)")


def test_hyperparameter_cache_reused(run_dir, monkeypatch, tmp_path):
    """A second run with the same cache does not refit (every arm sees the same system)."""
    def refuse(*a, **k):
        raise AssertionError("hyperparameters were refitted despite the cache")

    monkeypatch.setattr(_problems, "fit_hypers", refuse)
    args = ["--synthetic", "--max-n", "400", "--ranks", "5", "--seeds", "0", "--preconditioners", "none,pivchol",
            "--hyper-n", "150", "--hyper-iter", "10", "--quiet", "--hyper-cache", str(run_dir / "hypers.json"),
            "--out-dir", str(tmp_path)]
    assert bench.main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    cached = json.loads((run_dir / "hypers.json").read_text())
    assert res["datasets"]["synthetic"]["hypers"] == next(iter(cached.values()))


def test_cli_wiring_and_errors(tmp_path, capsys):
    """``gpscale.bench.add_parser`` registers ``bench precond``; bad options exit with 2."""
    parser = argparse.ArgumentParser(prog="gpscale")
    sub = parser.add_subparsers(dest="command")
    gpscale.bench.add_parser(sub)
    args = parser.parse_args(["bench", "precond", "--synthetic", "--ranks", "5,10", "--seeds", "3"])
    assert args.func is bench.run and args.ranks == [5, 10] and args.seeds == [3]
    assert bench.main(["--synthetic", "--preconditioners", "magic", "--out-dir", str(tmp_path)]) == 2
    assert "unknown preconditioner" in capsys.readouterr().err
    assert bench.main(["--datasets", "nope", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path), "--quiet"]) == 2


def test_fit_hypers_improves_likelihood():
    """The Cholesky-MLL fit returns positive hyperparameters and a higher likelihood than the start."""
    X, y = _problems.standardize(*_problems.synthetic_data(120, d=2, seed=1))
    h0 = _problems.fit_hypers(X, y, "rbf", max_iter=0)
    h = _problems.fit_hypers(X, y, "rbf", max_iter=15)
    assert h["mll_per_point"] > h0["mll_per_point"]
    assert h["noise"] >= _problems.NOISE_FLOOR and min(h["lengthscale"]) > 0 and len(h["lengthscale"]) == 2


def test_logdet_seeds_extend_the_logdet_spread_only(tmp_path):
    """--logdet-seeds adds log-det-only runs (loosest rtol); timings still come from --seeds."""
    pytest.importorskip("matplotlib")
    args = ["--synthetic", "--max-n", "200", "--ranks", "10", "--seeds", "0", "--logdet-seeds", "0,1,2,3",
            "--preconditioners", "none,pivchol", "--hyper-n", "100", "--hyper-iter", "5", "--num-probes", "4",
            "--rtols", "1e-2,1e-4", "--quiet", "--out-dir", str(tmp_path)]
    assert bench.main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for arm in res["datasets"]["synthetic"]["arms"]:
        s = arm["summary"]
        assert s["0.01"]["logdet_seeds"] == 4 and s["0.0001"]["logdet_seeds"] == 1
        assert math.isfinite(s["0.01"]["logdet_std"]) and s["0.01"]["wall_seconds"] > 0
        assert sum(1 for r in arm["runs"] if r.get("logdet_only")) == 3
    assert "log-det err ± std @0.01" in (tmp_path / "results.md").read_text()


def test_resume_keeps_finished_datasets_and_checks_settings(run_dir, monkeypatch, tmp_path, capsys):
    """--resume skips the data sets already in results.json; other settings are refused, naming the option."""
    out = tmp_path / "resume"
    out.mkdir()
    for name in ("results.json", "hypers.json"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    before = json.loads((out / "results.json").read_text())["datasets"]

    def must_not_run(*a, **k):
        raise AssertionError("a finished data set was run again")

    monkeypatch.setattr(bench, "run_dataset", must_not_run)
    assert bench.main(ARGS + ["--out-dir", str(out), "--resume"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["datasets"] == before and "## synthetic" in (out / "results.md").read_text()
    other = [a if a != "400" else "300" for a in ARGS]  # --max-n 300
    assert bench.main(other + ["--out-dir", str(out), "--resume"]) == 2
    assert "max_n" in capsys.readouterr().err
