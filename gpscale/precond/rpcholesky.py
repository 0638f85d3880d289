"""Randomly pivoted Cholesky preconditioners: simple and accelerated (block, rejection sampling).

Randomly pivoted Cholesky (RPCholesky) is the partial Cholesky of
:func:`~gpscale.precond.pivoted_cholesky.partial_cholesky` with a random pivot rule: each pivot is
drawn with probability proportional to the current residual diagonal
:math:`\\operatorname{diag}(K - L L^T)`.  It keeps greedy pivoting's cost but not its failure mode
(greedy pivots cluster on outliers), and its expected residual trace is within a small factor of
the best rank-k approximation (Chen, Epperly, Tropp & Webber, "Randomly pivoted Cholesky:
Practical approximation of a kernel matrix with few entry evaluations", CPAM 2023).

The accelerated variant (Epperly, Tropp & Webber, "Embrace rejection: Kernel matrix approximation
by accelerated randomly pivoted Cholesky", 2024) proposes ``b`` pivots at once from the *current*
residual diagonal and thins them by rejection sampling inside a ``b x b`` Cholesky: proposal ``i``
is accepted with probability (its residual diagonal now) / (its residual diagonal when proposed).
The accepted pivots have exactly the distribution of simple RPCholesky, but each round costs one
batched row evaluation and one ``(n x k) @ (k x s)`` product instead of ``s`` sequential
rank-one updates, so it runs at matrix-matrix speed (and with few host synchronisations on GPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .._validation import check_bool, check_positive_int, check_tolerance
from .base import LowRankPlusDiagonal, Preconditioner, low_rank_preconditioner
from .pivoted_cholesky import partial_cholesky


def make_generator(seed: int | None, device) -> torch.Generator:
    """A :class:`torch.Generator` on ``device``, seeded (``None``: from torch's default generator)."""
    g = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    return g.manual_seed(int(seed))


def sample_proportional(weights: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` indices drawn i.i.d. with probability ``weights / weights.sum()`` (with replacement).

    Inverse-CDF sampling (cumulative sum in float64 and ``searchsorted``): :math:`O(n)` and, unlike
    ``torch.multinomial``, not limited to :math:`2^{24}` categories.  Zero weights are never drawn.
    """
    cdf = torch.cumsum(weights.to(torch.float64), 0)
    u = torch.rand(num, dtype=torch.float64, device=weights.device, generator=generator) * cdf[-1]
    idx = torch.searchsorted(cdf, u, right=True)
    return idx.clamp_max_(weights.numel() - 1)


def _rejection_cholesky(H: torch.Tensor, proposed_diag: torch.Tensor, u: torch.Tensor):
    """Cholesky of the ``b x b`` residual block ``H`` with rejection-sampled pivots.

    Row ``i`` is accepted when ``u_i * proposed_diag_i < H_ii`` after the updates of the
    previously accepted rows (a repeated index has residual 0 there and is always rejected).

    Returns
    -------
    accepted : list of int
        Positions (into the proposals) that were accepted, in elimination order.
    C : (s, s) lower-triangular tensor
        Cholesky factor of the accepted block of ``H`` (dtype and device of ``H``).

    Notes
    -----
    :math:`O(b^3)` arithmetic on a small matrix, done in float64 on the host: one transfer in and
    one out per round, not one synchronisation per proposal.
    """
    Hc = H.detach().to("cpu", torch.float64).clone()
    thresh = (u.to("cpu", torch.float64) * proposed_diag.to("cpu", torch.float64)).tolist()
    accept = []
    for i in range(Hc.shape[0]):
        hii = float(Hc[i, i])
        if not thresh[i] < hii:
            continue
        accept.append(i)
        col = Hc[i:, i] / hii ** 0.5
        Hc[i:, i] = col
        Hc[i + 1:, i + 1:] -= torch.outer(col[1:], col[1:])
    C = torch.tril(Hc[accept][:, accept])
    return accept, C.to(dtype=H.dtype, device=H.device)


def block_rp_cholesky(op, rank: int, tol: float, block_size: int, generator: torch.Generator):
    """Accelerated (block, rejection-sampled) RPCholesky of the kernel part ``K`` of ``op``.

    Parameters
    ----------
    op : KernelOperator
        Needs ``kernel_diagonal()`` and ``kernel_rows(idx)``.
    rank : int
        Maximum number of pivots ``k``.
    tol : float
        Stop once :math:`\\operatorname{tr}(K - LL^T) \\le \\mathrm{tol}\\cdot\\operatorname{tr}(K)`;
        the last block is truncated to the first accepted column that meets it, so the factor is
        exactly as long as simple RPCholesky's would be for the same pivots.
    block_size : int
        Proposals ``b`` per round.
    generator : torch.Generator
        On ``op.device``.

    Returns
    -------
    L : (n, k') tensor, ``k' <= rank``, and statistics (pivots, rounds, acceptance rate).

    Notes
    -----
    Per round: ``b`` kernel rows (:math:`O(nbd)`), an :math:`O(nkb)` GEMM and a :math:`b^3`
    rejection Cholesky.  Memory :math:`O(nk + nb)`.  Rejected proposals cost their kernel row only.
    """
    n = op.shape[0]
    rank = min(rank, n)
    diag = op.kernel_diagonal().clone()
    trace0 = float(diag.sum())
    L = torch.zeros(n, rank, dtype=op.dtype, device=op.device)
    pivots: list[int] = []
    k, rounds, proposed = 0, 0, 0
    residual = trace0
    while k < rank and residual > tol * trace0 and residual > 0:
        b = min(block_size, rank - k)
        S = sample_proportional(diag, b, generator)
        u = torch.rand(b, dtype=diag.dtype, device=diag.device, generator=generator)
        rows = op.kernel_rows(S)  # (b, n): K[S, :]
        G = rows - L[S, :k] @ L[:, :k].T  # residual rows (K - L L^T)[S, :]
        accept, C = _rejection_cholesky(G[:, S], diag[S], u)
        rounds, proposed = rounds + 1, proposed + b
        acc = torch.tensor(accept[: rank - k], dtype=torch.long, device=diag.device)
        C = C[: acc.numel(), : acc.numel()]
        cols = torch.linalg.solve_triangular(C, G[acc], upper=False).T  # (n, s)
        drop = torch.cumsum((cols * cols).sum(0), 0)
        s = acc.numel()
        if tol > 0:  # truncate to the first column that meets the tolerance
            met = ((residual - drop) <= tol * trace0).nonzero()
            s = int(met[0]) + 1 if met.numel() else s
        L[:, k:k + s] = cols[:, :s]
        diag.sub_((cols[:, :s] ** 2).sum(1)).clamp_min_(0)
        diag[S[acc[:s]]] = 0
        pivots.extend(S[acc[:s]].tolist())
        k += s
        residual = float(diag.sum())
    stats = {"rank": k, "pivots": pivots, "residual_trace": residual, "trace": trace0, "rounds": rounds,
             "proposals": proposed, "acceptance_rate": k / max(proposed, 1)}
    return L[:, :k].contiguous(), stats


@dataclass(frozen=True)
class RPCholesky(Preconditioner):
    """Randomly pivoted Cholesky preconditioner :math:`P = L_k L_k^T + \\sigma^2 I`.

    Parameters
    ----------
    rank : int, default 100
        Maximum rank ``k``.
    tol : float, default 1e-6
        Stop early when :math:`\\operatorname{tr}(K - LL^T) \\le \\mathrm{tol}\\cdot\\operatorname{tr}(K)`.
    block_size : int, default 1
        ``1``: simple RPCholesky (Chen et al. 2023), one pivot and one kernel row at a time.
        ``b > 1``: accelerated RPCholesky (Epperly, Tropp & Webber 2024) proposing ``b`` pivots per
        round and accepting them by rejection sampling -- the same pivot distribution, fewer and
        larger operations (use ``b`` of 50-200 on GPU).
    seed : int or None, default 0
        Seeds a :class:`torch.Generator` on the operator's device, so a build is reproducible on a
        given device and dtype; ``None`` draws the seed from torch's global generator.
    residual_diagonal : bool, default False
        Add :math:`\\operatorname{diag}(K - LL^T)` to the noise on the diagonal of ``P`` (FITC-style,
        Cutajar et al. 2016): ``P`` then has the diagonal of :math:`\\hat K`.  Lowers the spread of the
        log-det estimator when the low-rank part leaves much kernel mass unexplained; may raise the
        CG iterations (see :class:`LowRankPlusDiagonal`).

    Notes
    -----
    Build: ``k`` kernel rows (plus rejected proposals for ``b > 1``), :math:`O(nk^2)` arithmetic,
    :math:`O(nk)` memory; apply: :math:`O(nk)` per column (Woodbury).  With ``rank = n`` and
    ``tol = 0`` the factor is an exact (permuted) Cholesky factor of ``K``: :math:`LL^T = K`.
    ``stats`` holds ``pivots``, ``residual_trace``, ``trace``, ``build_seconds`` and, for
    ``b > 1``, ``rounds``, ``proposals`` and ``acceptance_rate``.

    Examples
    --------
    >>> P = RPCholesky(rank=200, block_size=100, seed=1).build(op)
    >>> gpscale.cg(op, y, preconditioner=P)
    """

    rank: int = 100
    tol: float = 1e-6
    block_size: int = 1
    seed: int | None = 0
    residual_diagonal: bool = False

    def __post_init__(self):
        check_positive_int("rank", self.rank, minimum=0)
        check_tolerance("tol", self.tol)
        check_positive_int("block_size", self.block_size)
        check_bool("residual_diagonal", self.residual_diagonal)
        if self.seed is not None:
            check_positive_int("seed", self.seed, minimum=0)

    def build(self, op) -> LowRankPlusDiagonal:
        t0 = time.perf_counter()
        g = make_generator(self.seed, op.device)
        if self.block_size == 1:
            L, stats = partial_cholesky(op, self.rank, self.tol,
                                        lambda d: sample_proportional(d, 1, g)[0])
        else:
            L, stats = block_rp_cholesky(op, self.rank, self.tol, self.block_size, g)
        stats.update(name="rpchol", block_size=self.block_size, seed=self.seed,
                     build_seconds=time.perf_counter() - t0)
        return low_rank_preconditioner(op, L, stats, self.residual_diagonal)
