"""Collectives with clear failures: every call either returns on every rank or raises on every rank.

gpscale never waits on a collective without a bound: the process group's ``timeout`` (set by
:func:`init_process_group`, or by the caller's own ``torch.distributed.init_process_group``) caps
every call, and a rank that dies closes its sockets so its peers fail at once.  Errors of the
backend (``Connection closed by peer``, ``Timed out waiting ...``) are re-raised as
:class:`DistributedError` naming the operation, this rank and what to do.

A rank that *raises* inside gpscale's distributed code does not simply leave: it still joins the
next collective with a failure flag (:func:`gather_rows` and :func:`all_gather_vector` carry one),
so every other rank raises :class:`DistributedError` immediately instead of waiting for the timeout.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

#: Collective timeout of :func:`init_process_group` when none is given (seconds).
DEFAULT_TIMEOUT_S = 300.0

_LAUNCH_HINT = ("launch the script with torchrun (e.g. `torchrun --nproc_per_node=2 train.py`) and call "
                "gpscale.distributed.init_process_group() (or torch.distributed.init_process_group('gloo' on "
                "CPU, 'nccl' on GPU)) before using distributed=")


class DistributedError(RuntimeError):
    """A collective failed: another rank raised, died or did not answer within the timeout."""


def require_initialized(what: str = "distributed") -> None:
    """Raise a ``RuntimeError`` that says how to launch when no process group exists."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs an initialised torch.distributed process group: {_LAUNCH_HINT}")


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """True on the one process that writes checkpoints and output (rank 0, or no process group)."""
    return rank() == 0


def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group that ``torchrun`` describes in the environment, with a collective timeout.

    Parameters
    ----------
    backend : {"gloo", "nccl"}, optional
        Default: ``nccl`` when CUDA is available, else ``gloo``.  With NCCL the current CUDA device
        is set to ``LOCAL_RANK``.
    timeout_s : float, default 300
        Upper bound on every collective: a rank that stops answering ends the job on every rank with
        :class:`DistributedError` after at most this long (a rank that dies ends it at once).

    Notes
    -----
    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by ``torchrun``).
    For NCCL, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (torch's default) makes the timeout abort the job.
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"gpscale.distributed.init_process_group: environment variables {missing} are not set; "
                           f"{_LAUNCH_HINT}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=float(timeout_s)))


def _comm_device(like: torch.device) -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, host memory for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _run(name: str, fn):
    try:
        return fn()
    except DistributedError:
        raise
    except RuntimeError as exc:  # DistBackendError is a RuntimeError
        raise DistributedError(
            f"rank {rank()}: collective {name} failed: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}. "
            "Another rank raised an exception, died, or did not reach this collective within the process "
            "group's timeout; this rank stops too. Look for the first error in the other ranks' logs.") from exc


def _raise_peer_failure(flags: torch.Tensor, group_ranks: list[int], name: str) -> None:
    failed = [r for r, f in zip(group_ranks, flags.tolist()) if f]
    if failed:
        raise DistributedError(f"rank {rank()}: rank(s) {failed} raised an exception during {name} (their own "
                               "tracebacks are in their logs); every rank stops.")


def all_gather_vector(vec: torch.Tensor, failed: bool = False, group=None, name: str = "all_gather") -> torch.Tensor:
    """Stack an equal-length 1-D vector from every rank of ``group`` (world by default): ``(p, L)``.

    One collective.  Callers reduce the rows in rank order, so every rank gets bitwise the same
    result (an all-reduce with a deterministic order).  ``failed=True`` marks this rank as failed:
    every rank then raises (this one with its own exception, which the caller re-raises).
    """
    flag = torch.tensor([1.0 if failed else 0.0], dtype=vec.dtype, device=vec.device)
    payload = torch.cat([vec.reshape(-1), flag]).to(_comm_device(vec.device))
    size = dist.get_world_size(group)
    out = [torch.empty_like(payload) for _ in range(size)]
    _run(name, lambda: dist.all_gather(out, payload.contiguous(), group=group))
    rows = torch.stack(out).to(vec.device)
    if not failed:
        _raise_peer_failure(rows[:, -1], _group_ranks(group, size), name)
    return rows[:, :-1]


def gather_rows(block: torch.Tensor | None, like: torch.Tensor, n: int, group, size: int,
                name: str = "row all_gather") -> torch.Tensor:
    """Concatenate the ``(b_r, t)`` row blocks of every rank of ``group`` into the full ``(n, t)`` tensor.

    Blocks are padded to ``ceil(n / size)`` rows plus one flag row (gloo and NCCL gather equal
    sizes), so the message is ``(ceil(n / size) + 1) t`` numbers per rank.  ``like`` (the ``(n, t)``
    right-hand side) gives ``t``, dtype and device.  A ``block`` of ``None`` means this rank failed
    locally; the others then raise at once.
    """
    b = -(-n // size)
    failed = block is None
    buf = torch.zeros(b + 1, like.shape[1], dtype=like.dtype, device=_comm_device(like.device))
    if failed:
        buf[b] = 1.0
    else:
        buf[:block.shape[0]] = block
    out = [torch.empty_like(buf) for _ in range(size)]
    _run(name, lambda: dist.all_gather(out, buf, group=group))
    flags = torch.stack([o[b, 0] for o in out]).cpu() if like.shape[1] else torch.zeros(size)
    if not failed:
        _raise_peer_failure(flags, _group_ranks(group, size), name)
    return torch.cat([o[:b] for o in out], dim=0)[:n].to(like.device)


def gather_columns(local: torch.Tensor | None, like: torch.Tensor, total: int, grid, name: str = "column all_gather"):
    """Assemble the ``(m, total)`` result whose contiguous column shares the column groups computed.

    One all-gather over the world of ``(m, ceil(total / C))`` blocks plus a flag row; the copy of row
    rank 0 of each column group is used.  ``like`` is any ``(m, *)`` tensor giving ``m``, dtype and
    device; ``local=None`` marks a local failure (every rank then raises).
    """
    m, w = like.shape[0], -(-total // grid.cols)
    buf = torch.zeros(m + 1, w, dtype=like.dtype, device=_comm_device(like.device))
    if local is None:
        buf[m] = 1.0
    else:
        buf[:m, :local.shape[1]] = local
    out = [torch.empty_like(buf) for _ in range(grid.world_size)]
    _run(name, lambda: dist.all_gather(out, buf, group=None))
    if local is not None:
        _raise_peer_failure(torch.stack([o[m, 0] for o in out]).cpu(), list(range(grid.world_size)), name)
    parts = []
    for c in range(grid.cols):
        c0, c1 = share_range(total, grid.cols, c)
        parts.append(out[c * grid.rows][:m, :c1 - c0])
    return torch.cat(parts, dim=1).to(like.device)


def share_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous share ``[start, stop)`` of part ``index`` when ``total`` items go to ``parts`` (sizes differ by <= 1)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def broadcast_tensor(t: torch.Tensor, src: int = 0, name: str = "broadcast") -> torch.Tensor:
    """``t`` from rank ``src`` on every rank (a copy; the input is not modified)."""
    out = t.detach().clone().contiguous().to(_comm_device(t.device))
    _run(name, lambda: dist.broadcast(out, src=src))
    return out.to(t.device)


def broadcast_object(obj, src: int = 0, name: str = "broadcast_object"):
    """A picklable object from rank ``src`` on every rank (e.g. a checkpoint read by rank 0)."""
    box = [obj]
    _run(name, lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def from_rank0(fn, name: str = "broadcast from rank 0"):
    """``fn()`` evaluated on rank 0 only, its result (or its exception) on every rank.

    An exception on rank 0 (e.g. an incompatible checkpoint) is re-raised there and becomes a
    :class:`DistributedError` with its message on the other ranks, instead of leaving them waiting.
    """
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    box = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"), name=name)
    if error is not None:
        raise error
    if box[1] is not None:
        raise DistributedError(f"rank {rank()}: rank 0 failed ({box[1]}); every rank stops.")
    return box[0]


def _group_ranks(group, size: int) -> list[int]:
    if group is None:
        return list(range(size))
    try:
        return list(dist.get_process_group_ranks(group))
    except (RuntimeError, ValueError):
        return list(range(size))
