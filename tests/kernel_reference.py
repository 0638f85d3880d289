"""Float64 references and the error measure shared by the GPU kernel tests and their CPU emulation.

Per output entry: ``|got - want| <= rtol * max(max(|G| |V|), max|V|) + env`` (see
``tests/test_cuda_kernels.py``).  Kept importable without CUDA: ``tests/test_tcb_emulated.py`` runs
the same checks on the CPU emulation of the kernels.
"""

from __future__ import annotations

import torch

from gpscale.kernels import RBF, Matern
from gpscale.operators.expansion import expansion_delta

KERNELS = {"rbf": RBF(), "matern12": Matern(nu=0.5), "matern32": Matern(nu=1.5), "matern52": Matern(nu=2.5)}


def make_data(n, m, d, t, ls, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=torch.float64) * 3
    Z = torch.rand(m, d, generator=g, dtype=torch.float64) * 3
    V = torch.randn(m, t, generator=g, dtype=torch.float64)
    c = X.mean(0)
    return (X - c) / ls, (Z - c) / ls, V


def _profiles(name, q, mode):
    f, fp = KERNELS[name].profile_and_derivative(q)
    return {"f": [f], "d": [fp], "f_dq": [f, fp * q]}[mode]


def reference(Xs, Zs, V, name, mode, expansion=False, symmetric=False):
    """float64 dense reference with error scales: ``[(want, |G| |V|, envelope), ...]``, one per output.

    Difference-form distances and the kernel module's own profile; ``envelope`` is 0 unless
    ``expansion`` (tensor-core variants), then what any ``q'`` in ``[q - delta, q + delta]``
    (``delta = expansion_delta``, clamped at 0) moves the product by -- except on the diagonal when
    ``symmetric``: the kernels set ``q_ii = 0`` exactly there.  The profiles are monotone in ``q > 0``,
    so the interval's ends bound the change, plus its positive limit at 0 where ``q <= delta``: the
    Matérn-1/2 derivative ``f' ~ -1 / (2 sqrt q)`` is unbounded there (the convention ``f'(0) = 0``
    is not its limit), so a pair closer than the expansion resolves may take any value of it.
    """
    diff = torch.cdist(Xs, Zs, compute_mode="donot_use_mm_for_euclid_dist")
    q = diff * diff
    floor = V.abs().max()
    out = [[G @ V, (G.abs() @ V.abs()).clamp_min(floor), torch.zeros(Xs.shape[0], V.shape[1], dtype=V.dtype)]
           for G in _profiles(name, q, mode)]
    if expansion:
        r2 = Xs.pow(2).sum(1).max().item() + Zs.pow(2).sum(1).max().item()
        delta = expansion_delta(r2)
        tiny = torch.finfo(q.dtype).tiny
        for shifted in (q + delta, (q - delta).clamp_min(0), (q - delta).clamp_min(tiny)):
            if symmetric:
                shifted.fill_diagonal_(0.0)
            for o, G, Gs in zip(out, _profiles(name, q, mode), _profiles(name, shifted, mode)):
                o[2] = torch.maximum(o[2], (Gs - G).abs().nan_to_num(posinf=1e30) @ V.abs())
    return out


def assert_products(got, ref, rtol, mode, what=""):
    """:func:`assert_within` for every output of a product: ``got`` is a pair for ``mode="f_dq"``."""
    outs = got if mode == "f_dq" else (got,)
    names = ("F V", "(F' o Q) V") if mode == "f_dq" else (f"mode {mode}",)
    assert len(outs) == len(ref)
    for g, r, name in zip(outs, ref, names):
        assert_within(g, r, rtol, f"{what} {name}".strip())


def assert_within(got, ref, rtol, what):
    want, absprod, env = ref
    got = got.double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite entries"
    err = (got - want).abs()
    allowed = rtol * absprod.max() + env
    worst = (err - allowed).argmax()
    assert (err <= allowed).all(), (f"{what}: error {err.flatten()[worst]:.3e} > allowed "
                                    f"{allowed.flatten()[worst]:.3e} (rtol {rtol:g} x scale {absprod.max():.3e} "
                                    f"+ expansion envelope {env.flatten()[worst]:.3e}); max error {err.max():.3e}")


