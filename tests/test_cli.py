"""The ``gpscale`` command line: ``fit`` on .npz / .csv files and the demo, JSON output, error exits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpscale.cli import main
from gpscale.data import DataError, load_data, make_demo, train_test_split


def _xy(n=120, d=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(n, d))
    return X, np.sin(2 * X[:, 0]) + 0.3 * X[:, 1] + 0.1 * rng.standard_normal(n)


def _rmse(out: str) -> float:
    line = next(ln for ln in out.splitlines() if "test RMSE" in ln)
    return float(line.split()[2])


def test_fit_npz_prints_metrics_and_writes_json(tmp_path, capsys):
    X, y = _xy()
    np.savez(tmp_path / "d.npz", X=X, y=y)
    out_json = tmp_path / "out.json"
    code = main(["fit", "--data", str(tmp_path / "d.npz"), "--kernel", "matern52", "--test-fraction", "0.2",
                 "--max-iter", "15", "--quiet", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0
    for fragment in ("test RMSE", "test NLL", "fit time", "lengthscale", "noise", "method=cholesky"):
        assert fragment in out
    assert _rmse(out) < 0.3  # noise std 0.1; the constant predictor is ~1
    res = json.loads(out_json.read_text())
    assert res["n_train"] == 96 and res["test"]["n_test"] == 24 and res["test"]["n_std"] == 24
    assert res["test"]["rmse"] == pytest.approx(_rmse(out), rel=1e-3)
    assert res["report"]["kernel"] == "matern52" and len(res["report"]["lengthscale"]) == 2


def test_fit_csv_with_header_subset_and_iterative(tmp_path, capsys):
    X, y = _xy(n=150, d=3, seed=1)
    path = tmp_path / "d.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header="a,b,c,target", comments="")
    code = main(["fit", "--data", str(path), "--n", "100", "--max-iter", "4", "--method", "iterative",
                 "--kernel", "rbf", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "n=100, d=3" in out and "method=iterative" in out and "CG CONVERGED" in out and "pivchol" in out


def test_demo_small(capsys):
    code = main(["fit", "--demo", "--n", "400", "--max-iter", "5", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "demo data (n=400, d=8" in out and "test RMSE" in out and "test NLL" in out
    assert _rmse(out) < 0.6  # the constant predictor is ~0.9 on the demo function


def test_checkpoint_resume_via_cli(tmp_path, capsys):
    X, y = _xy(n=60)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    args = ["fit", "--data", str(tmp_path / "d.npz"), "--quiet", "--checkpoint", str(tmp_path / "c.ckpt")]
    assert main(args + ["--max-iter", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--max-iter", "4"]) == 0
    assert "resumed at iteration 2" in capsys.readouterr().out


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: None, "does not exist"),
    (lambda p: np.savez(p / "data.npz", X=np.ones((5, 2))), "no array 'y'"),
    (lambda p: (p / "data.npz").write_bytes(b"garbage"), "cannot read"),
    (lambda p: (p / "data.csv").write_text("1,2\n3,x\n"), "not a comma-separated table"),
    (lambda p: (p / "data.txt").write_text("1,2\n"), "unsupported data format"),
])
def test_bad_data_exits_2_without_traceback(tmp_path, capsys, setup, fragment):
    setup(tmp_path)
    existing = [p.name for p in tmp_path.iterdir()]
    name = existing[0] if existing else "missing.npz"
    code = main(["fit", "--data", str(tmp_path / name), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and "Traceback" not in err and err.startswith("gpscale fit: error:")


@pytest.mark.parametrize("argv", [[], ["fit"], ["fit", "--demo", "--kernel", "cosine"], ["nope"],
                                  ["fit", "--demo", "--std-points", "0"], ["fit", "--demo", "--backend", "gpu"],
                                  ["fit", "--demo", "--backend", "cuda:tc4"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_backend_takes_a_fixed_cuda_variant():
    from gpscale.cli import build_parser

    assert build_parser().parse_args(["fit", "--demo", "--backend", "cuda:simt"]).backend == "cuda:simt"


def test_invalid_values_exit_2(tmp_path, capsys):
    X, y = _xy(n=20)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    assert main(["fit", "--data", str(tmp_path / "d.npz"), "--test-fraction", "1.5", "--quiet"]) == 2
    assert "test fraction" in capsys.readouterr().err
    X[3, 1] = np.nan
    np.savez(tmp_path / "d.npz", X=X, y=y)
    assert main(["fit", "--data", str(tmp_path / "d.npz"), "--quiet"]) == 2
    assert "NaN" in capsys.readouterr().err
    assert main(["fit", "--demo", "--n", "50", "--device", "tpu", "--quiet"]) == 2
    assert "device must be a device such as" in capsys.readouterr().err


def test_backend_and_device_reach_the_estimator(capsys):
    # --backend torch is always available: the report names the backend the products ran on
    code = main(["fit", "--demo", "--n", "300", "--max-iter", "2", "--method", "iterative", "--backend", "torch",
                 "--device", "cpu", "--quiet"])
    assert code == 0
    assert "kernel products on torch" in capsys.readouterr().out


def test_precision_reaches_the_estimator(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    code = main(["fit", "--demo", "--n", "400", "--max-iter", "1", "--method", "iterative", "--precision", "float16",
                 "--quiet", "--json", str(out_json)])
    assert code == 0
    assert "% of solves finished in float16" in capsys.readouterr().out
    res = json.loads(out_json.read_text())
    assert res["settings"]["precision"] == "float16" and res["report"]["precision"] == "float16"
    assert res["report"]["precision_check"]["ok"]
    assert main(["fit", "--demo", "--precision", "float8", "--quiet"]) == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data helpers
def test_make_demo_is_seeded_float32():
    X, y = make_demo(n=50, d=8, seed=3)
    assert X.dtype == np.float32 and X.shape == (50, 8) and y.shape == (50,)
    np.testing.assert_array_equal(make_demo(n=50, d=8, seed=3)[1], y)
    assert not np.array_equal(make_demo(n=50, d=8, seed=4)[1], y)


def test_split_and_load_round_trip(tmp_path):
    X, y = _xy(n=30)
    Xtr, Xte, ytr, yte = train_test_split(X, y, 0.2, seed=0)
    assert len(Xte) == 6 and len(Xtr) == 24
    assert sorted(np.concatenate([ytr, yte]).tolist()) == sorted(y.tolist())
    np.savez(tmp_path / "a.npz", X=X[:, 0], y=y)  # 1-D X is one input column
    Xl, yl = load_data(tmp_path / "a.npz")
    assert Xl.shape == (30, 1)
    np.testing.assert_array_equal(yl, y)
    with pytest.raises(DataError, match="at least 2"):
        train_test_split(X[:2], y[:2], 0.5)
