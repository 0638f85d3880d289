"""Shared fixtures and dense float64 oracles for the gpscale test suite.

Everything random is drawn from an explicitly seeded :class:`torch.Generator`, so every test is
deterministic.  Oracles are computed densely in float64 through the kernel module's own
``forward`` (``kernel(X)``), never through the operators under test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpscale.kernels import RBF, Matern

#: Kernel specifications used across the suite: ``(family, nu)``; ``nu`` is ``None`` for RBF.
KERNEL_SPECS = [("rbf", None), ("matern", 0.5), ("matern", 1.5), ("matern", 2.5)]
KERNEL_IDS = ["rbf", "matern12", "matern32", "matern52"]


# ----------------------------------------------------------------------------- global hygiene
@pytest.fixture(autouse=True)
def _seed_default_rng():
    """Seed torch's default generator so that no test depends on execution order."""
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def regression():
    """1200 points in 3-d with a noisy smooth target: the mixed-precision MLL and fit tests' data set."""
    g = torch.Generator().manual_seed(0)
    X = torch.rand(1200, 3, generator=g) * 3
    y = torch.sin(X.sum(1)) + 0.3 * torch.randn(1200, generator=g)
    return X, y


@pytest.fixture(scope="session")
def tcb_builds(tmp_path_factory):
    """``get(*defines)``: the CPU emulation's tcb harness compiled with these ``-D`` options, once per session
    (``emu_harness.build_emulation``; skips without a host C++ compiler)."""
    from emu_harness import build_emulation  # noqa: PLC0415 - only the emulated tests need it

    cache: dict = {}

    def get(*defines: str):
        if defines not in cache:
            cache[defines] = build_emulation(tmp_path_factory, "tcb_harness", *defines)
        return cache[defines]

    return get


def make_generator(seed: int) -> torch.Generator:
    """Return a CPU :class:`torch.Generator` seeded with ``seed``."""
    return torch.Generator().manual_seed(int(seed))


def make_inputs(n: int, d: int, dtype=torch.float64, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """Uniform inputs on ``[0, scale]^d``.

    Drawn in float64 and cast afterwards, so float32 and float64 tests see the same points (up to
    rounding) for the same seed.
    """
    X = torch.rand(n, d, generator=make_generator(seed), dtype=torch.float64) * scale
    return X.to(dtype)


def make_targets(X: torch.Tensor, noise_std: float = 0.1, seed: int = 1, amplitude: float = 1.0,
                 offset: float = 0.3) -> torch.Tensor:
    """Smooth function of the inputs plus Gaussian noise (same dtype as ``X``)."""
    Xd = X.to(torch.float64)
    f = torch.sin(1.5 * Xd[:, 0]) + 0.5 * torch.cos(Xd[:, -1]) * Xd[:, -1]
    eps = torch.randn(X.shape[0], generator=make_generator(seed), dtype=torch.float64)
    return (amplitude * f + noise_std * eps + offset).to(X.dtype)


def build_kernel(family: str, nu=None, ard: bool = False, d: int = 3, dtype=torch.float64,
                 outputscale: float = 1.7):
    """Build an RBF / Matérn kernel with non-trivial hyperparameters.

    Parameters
    ----------
    family : {"rbf", "matern"}
    nu : float, optional
        Matérn smoothness.
    ard : bool
        One lengthscale per input dimension (values spread over ``[0.5, 1.3]``) instead of a shared
        lengthscale ``0.7``.
    d : int
        Input dimension (only used for ARD).
    dtype : torch.dtype
        Parameter dtype of the returned module.
    """
    ls = torch.linspace(0.5, 1.3, d) if ard else 0.7
    if family == "rbf":
        k = RBF(lengthscale=ls, outputscale=outputscale)
    else:
        k = Matern(nu=nu, lengthscale=ls, outputscale=outputscale)
    return k.to(dtype)


def dense_kernel(kernel, X: torch.Tensor, Z: torch.Tensor | None = None) -> torch.Tensor:
    """Dense float64 oracle ``K(X, Z)`` through the module's ``forward`` (no autograd graph).

    The kernel is deep-copied and promoted to float64, so float32 operators are compared against
    a float64 evaluation of the same hyperparameters and the same input values.
    """
    k64 = copy.deepcopy(kernel).to(torch.float64)
    with torch.no_grad():
        Zd = None if Z is None else Z.to(torch.float64)
        return k64(X.to(torch.float64), Zd)


def dense_oracle(kernel, X: torch.Tensor, noise: float) -> torch.Tensor:
    """Dense float64 ``K(X, X) + noise * I``."""
    K = dense_kernel(kernel, X)
    return K + float(noise) * torch.eye(X.shape[0], dtype=torch.float64)


# ----------------------------------------------------------------------------- dense linear algebra
def sym_fn(A: torch.Tensor, fn) -> torch.Tensor:
    """``fn(A)`` for a symmetric matrix through its eigendecomposition (float64)."""
    A = A.to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (A + A.T))
    return (evecs * fn(evals)) @ evecs.T


def sym_log(A: torch.Tensor) -> torch.Tensor:
    """Matrix logarithm of an SPD matrix."""
    return sym_fn(A, torch.log)


def sym_inv_sqrt(A: torch.Tensor) -> torch.Tensor:
    """``A^{-1/2}`` of an SPD matrix."""
    return sym_fn(A, torch.rsqrt)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def generator():
    """A fresh generator seeded with 1234."""
    return make_generator(1234)


@pytest.fixture(scope="session")
def small_spd_problem():
    """A small, well-conditioned kernel system: ``(X, kernel, noise, K_dense)`` in float64.

    ``n = 40`` RBF points in 2-D with noise 0.05 (condition number ~ 1e3).
    """
    X = make_inputs(40, 2, seed=11)
    k = build_kernel("rbf", d=2)
    noise = 0.05
    return X, k, noise, dense_oracle(k, X, noise)


def pytest_addoption(parser):
    parser.addoption("--tcbh-build", default=None, metavar="OPTIONS",
                     help="run the CUDA tests on this candidate build of the float32 default 'tcbh' (kmm_tcb.cu "
                          "-D options, e.g. --tcbh-build='-DTCB_DF16=2 -DTCB_BN=128', with '=') instead of the shipped "
                          "gpscale._ext.launch.DEFINES['tcbh']: a build is tested on a lent GPU before it ships")


def pytest_report_header(config):
    build = config.getoption("--tcbh-build")
    return [f"tcbh build under test: {build}"] if build else []


def pytest_configure(config):
    """Run torch single-threaded unless ``GPSCALE_TEST_THREADS`` says otherwise.

    The suite is dominated by many small tiled products; on a shared 2-core machine OpenMP
    synchronisation between two threads makes each tiny op orders of magnitude slower, while
    correctness never depends on the thread count.
    """
    import os

    torch.set_num_threads(int(os.environ.get("GPSCALE_TEST_THREADS", "1")))
    build = config.getoption("--tcbh-build", default=None)
    if build:  # before any test compiles tcbh (its modules are cached per build, so nothing stale is reused)
        from gpscale._ext import launch

        launch.DEFINES["tcbh"] = launch.parse_build(build)
    # torch.func's forward-mode autodiff (used by the derivative oracles) triggers this internally.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")
