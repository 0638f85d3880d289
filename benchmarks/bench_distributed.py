"""Weak and strong scaling of gpscale.distributed (columns / rows / hybrid) on CPU with gloo.

One measurement = ``p`` worker processes started torchrun-style (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), one torch thread each, that time ``--repeats`` MLL + gradient
evaluations (``gpscale.mll_estimate(..., distributed=strategy)``, float64, RBF, fixed seed) after one
warm-up evaluation.  The workers also time every ``torch.distributed`` collective they enter, so
the record separates communication (including waiting for the slowest rank) from compute.

* **weak scaling**: ``--cols-per-rank`` CG columns per rank, i.e. ``num_probes = cols * p - 1``;
  efficiency ``T(1) / T(p)``;
* **strong scaling**: ``num_probes = --strong-probes`` whatever ``p``; efficiency ``T(1) / (p T(p))``.

Writes ``--out`` (JSON: every worker record, machine information) and the ``distributed_cpu``
section of ``--markdown`` (default ``docs/distributed.md``).  Smoke run::

    python benchmarks/bench_distributed.py --n 600 --ranks 1,2 --repeats 1 --out /tmp/d.json --markdown /tmp/d.md
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULT_TAG,
    emit_result,
    fmt,
    machine_info,
    read_json,
    replace_markdown_section,
    write_json,
)

STRATEGIES = ("columns", "rows", "hybrid")


# ---------------------------------------------------------------------------------------------- worker
def _timed_collectives(dist, clock: dict) -> None:
    """Wrap the collectives gpscale uses so that their wall time accumulates in ``clock``."""
    for name in ("all_gather", "broadcast", "broadcast_object_list"):
        fn = getattr(dist, name)

        def timed(*a, _fn=fn, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                clock["seconds"] += time.perf_counter() - t0
                clock["calls"] += 1
        setattr(dist, name, timed)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.pin and hasattr(os, "sched_setaffinity"):
        # One core per rank, as `torchrun` + `taskset`/`numactl` would bind them: without it the
        # scheduler migrates the single-threaded ranks between cores and the 2-rank runs pay for it.
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(os.environ.get("LOCAL_RANK", "0")) % len(cores)]})
    import gpscale
    import gpscale.distributed
    from gpscale.precond import PivotedCholesky

    gpscale.distributed.init_process_group(backend="gloo", timeout_s=600)
    clock = {"seconds": 0.0, "calls": 0}
    _timed_collectives(dist, clock)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.n, args.d, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1)) + 0.1 * torch.randn(args.n, generator=g, dtype=torch.float64)
    k = gpscale.kernels.RBF(lengthscale=1.5).double()

    def evaluate():
        k.zero_grad(set_to_none=True)
        res = gpscale.mll_estimate(X, y, k, 0.1, method="iterative", rtol=args.rtol, num_probes=args.probes,
                                   preconditioner=PivotedCholesky(rank=args.precond_rank), seed=0,
                                   distributed=args.strategy, warn=False, memory_budget=args.memory_budget)
        res.value.backward()
        return res

    evaluate()  # warm-up: tile cache, process groups
    times, comm, calls = [], [], []
    for _ in range(args.repeats):
        clock.update(seconds=0.0, calls=0)
        dist.barrier()
        t0 = time.perf_counter()
        res = evaluate()
        times.append(time.perf_counter() - t0)
        comm.append(clock["seconds"])
        calls.append(clock["calls"])
    st = res.stats
    emit_result({"status": "ok", "rank": dist.get_rank(), "world": dist.get_world_size(), "times": times,
                 "comm_seconds": comm, "collectives": calls, "grid": st["grid"],
                 "iterations_max": st["iterations_max"], "num_matmuls": st["num_matmuls"],
                 "value": float(res.value.detach())})
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------- parent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(strategy: str, p: int, probes: int, args) -> dict:
    """Run one ``p``-rank measurement; return rank 0's record with the other ranks' times."""
    import json

    port, procs = _free_port(), []
    for r in range(p):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(p), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        argv = [sys.executable, __file__, "--worker", "--strategy", strategy, "--probes", str(probes),
                "--n", str(args.n), "--d", str(args.d), "--rtol", str(args.rtol), "--repeats", str(args.repeats),
                "--precond-rank", str(args.precond_rank)] + (["--pin"] if args.pin else [])
        if args.memory_budget is not None:
            argv += ["--memory-budget", str(args.memory_budget)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    records = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"status": "failed", "error": f"timeout after {args.timeout} s"}
        rec = next((json.loads(line[len(RESULT_TAG):]) for line in out.splitlines() if line.startswith(RESULT_TAG)),
                   {"status": "failed", "error": err[-2000:]})
        records.append(rec)
    if any(r.get("status") != "ok" for r in records):
        return {"status": "failed", "error": next(r["error"] for r in records if r.get("status") != "ok")}
    r0 = records[0]
    return {"status": "ok", "strategy": strategy, "ranks": p, "num_probes": probes, "grid": r0["grid"],
            "seconds": statistics.median(r0["times"]), "times_by_rank": [r["times"] for r in records],
            "comm_seconds": statistics.median(r0["comm_seconds"]), "collectives": r0["collectives"][0],
            "iterations_max": r0["iterations_max"], "num_matmuls": r0["num_matmuls"], "value": r0["value"]}


def message_bytes(strategy_grid: str, n: int, d: int, columns: int) -> dict:
    """Bytes each rank sends per CG iteration (row all-gather) and per evaluation (the final reduction)."""
    R, C = (int(v) for v in strategy_grid.split("x"))
    per_iter = 0 if R == 1 else 8 * (n * -(-columns // C) + 1)  # a partial product + failure flag
    return {"per_iteration": per_iter, "per_evaluation": 8 * (1 + 12 + 8 + 1 + d)}


def run(args) -> dict:
    results = []
    for strategy in args.strategies:
        for mode in ("weak", "strong"):
            rounds = {p: [] for p in args.ranks}
            # Rounds alternate the rank counts (1, 2, 1, 2, ...): this VM's speed drifts by 10-25% over
            # minutes, so an efficiency is only trustworthy as a median of *paired* ratios.
            for rnd in range(args.rounds):
                for p in args.ranks:
                    probes = _probes(args, mode, p)
                    print(f"[bench_distributed] {strategy:8s} {mode:6s} p={p} num_probes={probes} "
                          f"round {rnd + 1}/{args.rounds} ...", flush=True)
                    rec = launch(strategy, p, probes, args)
                    print(f"    -> {fmt(rec.get('seconds'))} s ({rec['status']})", flush=True)
                    rounds[p].append(rec)
            for p in args.ranks:
                rec = _combine_rounds(rounds[p])
                probes = _probes(args, mode, p)
                rec.update(mode=mode, strategy=strategy, ranks=p, num_probes=probes)
                if rec["status"] == "ok":
                    rec["bytes"] = message_bytes(rec["grid"], args.n, 1, probes + 1)
                    rec["compute_seconds"] = rec["seconds"] - rec["comm_seconds"]
                results.append(rec)
    _efficiencies(results)
    return {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "worker"},
            "results": results}


def _probes(args, mode: str, p: int) -> int:
    """Probe count of a run: ``cols_per_rank`` CG columns per rank (weak) or ``strong_probes`` (strong)."""
    return args.cols_per_rank * p - 1 if mode == "weak" else args.strong_probes


def _combine_rounds(recs: list) -> dict:
    """One record from the rounds of one (strategy, mode, p): medians, and every round's time kept."""
    failed = [r for r in recs if r.get("status") != "ok"]
    if failed:
        return dict(failed[0])
    out = dict(recs[0])
    out["seconds_rounds"] = [r["seconds"] for r in recs]
    out["seconds"] = statistics.median(out["seconds_rounds"])
    out["comm_seconds"] = statistics.median(r["comm_seconds"] for r in recs)
    out["times_by_rank"] = [t for r in recs for t in r["times_by_rank"]] if len(recs) > 1 else out["times_by_rank"]
    return out


def _efficiencies(results: list) -> None:
    """Weak ``t1 / tp``, strong ``t1 / (p tp)``; with rounds, the median of the per-round paired ratios."""
    base = {(r["strategy"], r["mode"]): r for r in results if r["status"] == "ok" and r["ranks"] == 1}
    for r in results:
        b = base.get((r["strategy"], r["mode"]))
        if r["status"] != "ok" or b is None:
            continue
        scale = 1 if r["mode"] == "weak" else r["ranks"]
        pairs = [t1 / (scale * tp) for t1, tp in zip(b.get("seconds_rounds", [b["seconds"]]),
                                                    r.get("seconds_rounds", [r["seconds"]]))]
        r["efficiency"] = statistics.median(pairs)  # one round: the plain ratio
        if len(pairs) > 1:
            r["efficiency_rounds"] = pairs


def _eff_text(r: dict) -> str:
    pairs = r.get("efficiency_rounds")
    rng = f" ({min(pairs):.0%}–{max(pairs):.0%})" if pairs and r["ranks"] > 1 else ""
    return fmt(r.get("efficiency"), ".0%") + rng


def render(payload: dict) -> str:
    s, m = payload["settings"], payload["machine"]
    budget = "1 GiB" if s.get("memory_budget") is None else f"{s['memory_budget']} B"
    pinned = "one core per rank (pinned)" if s.get("pin") else "ranks placed by the OS"
    rounds = s.get("rounds", 1)
    paired = (f"; {rounds} alternating rounds (1 rank, 2 ranks, 1, 2, ...): times are medians over rounds, "
              "efficiency the median of the per-round paired ratios (range in brackets)") if rounds > 1 else ""
    head = (f"CPU gloo, one torch thread per rank, {pinned}, median of {s.get('repeats')} evaluations, n = {s['n']}, d = {s['d']}, RBF, float64, rtol {s['rtol']}, "
            f"pivoted-Cholesky rank {s['precond_rank']}, memory budget {budget}; weak: {s['cols_per_rank']} CG "
            f"columns per rank, strong: {s['strong_probes']} probes.  Machine: {m.get('cpu_model', '?')}, "
            f"{m.get('cpu_count')} cores, load average at start {m.get('loadavg_at_start')}; {m.get('date_utc')}, "
            f"commit {(m.get('git_commit') or '?')[:9]}{paired}.")
    lines = [head, "",
             "| strategy | mode | ranks | grid | probes | CG its | time / eval (s) | comm (s) | efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['strategy']} | {r['mode']} | {r['ranks']} | — | {r['num_probes']} | — | failed: "
                         f"{r.get('error', '')[:60]} | — | — |")
            continue
        lines.append(f"| {r['strategy']} | {r['mode']} | {r['ranks']} | {r['grid']} | {r['num_probes']} | "
                     f"{r['iterations_max']} | {fmt(r['seconds'])} | {fmt(r['comm_seconds'])} | "
                     f"{_eff_text(r)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="columns", help=argparse.SUPPRESS)
    ap.add_argument("--probes", type=int, default=7, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--rtol", type=float, default=1e-2)
    ap.add_argument("--precond-rank", type=int, default=50)
    ap.add_argument("--memory-budget", type=int, default=None,
                    help=("bytes per kernel operator (default 1 GiB); a small budget recomputes the tiles every "
                          "product, the regime of n beyond the cache"))
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts (1 must be included)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--cols-per-rank", type=int, default=8)
    ap.add_argument("--strong-probes", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="launch every rank count this many times, alternating; efficiency = median paired ratio")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="bind rank r to core r (default on; --no-pin lets the OS place the ranks)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    ap.add_argument("--out", default="benchmarks/results/distributed_cpu.json")
    ap.add_argument("--markdown", default="docs/distributed.md")
    ap.add_argument("--render", help="re-render the Markdown section from a saved JSON and exit")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.render:
        replace_markdown_section(args.markdown, "distributed_cpu", render(read_json(args.render)),
                                 title="# Distributed inference")
        return None
    args.ranks = [int(v) for v in args.ranks.split(",")]
    args.strategies = [v for v in args.strategies.split(",") if v]
    if 1 not in args.ranks:
        ap.error("--ranks must include 1 (the baseline of the efficiencies)")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1 (launches per rank count), got {args.rounds}")
    payload = run(args)
    write_json(args.out, payload)
    replace_markdown_section(args.markdown, "distributed_cpu", render(payload), title="# Distributed inference")
    print(render(payload))
    return None


if __name__ == "__main__":
    main()
