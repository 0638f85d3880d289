"""Markdown rendering of ``bench_mll.py`` results (the ``mll_cpu`` section of docs/benchmarks.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REFERENCE = "cholesky-ref"

def ratio_line(records, n) -> str | None:
    by = {r["library"]: r for r in records if r["n"] == n}
    a, b = by.get("gpscale"), by.get("gpytorch")
    if not a or not b:
        return None
    if a["status"] == "ok" and b["status"] == "ok":
        return (f"n = {n}: gpscale / GPyTorch time {a['total_s'] / b['total_s']:.2f}x "
                f"(GPyTorch / gpscale {b['total_s'] / a['total_s']:.2f}x), peak RSS "
                f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}x ({a['peak_rss_gb']:.2f} vs {b['peak_rss_gb']:.2f} GB)")
    ok = [x for x in (a, b) if x["status"] == "ok"]
    failed = [x for x in (a, b) if x["status"] != "ok"]
    txt = ", ".join(f"{x['library']} failed ({x.get('reason', x.get('error', '?'))})" for x in failed)
    if ok:
        txt += f"; {ok[0]['library']} ran ({ok[0]['total_s']:.1f} s, {ok[0]['peak_rss_gb']:.2f} GB)"
    return f"n = {n}: {txt}"


def _table_row(r: dict) -> str:
    """One record as a row of :func:`render_markdown`'s table."""
    data = (r.get("data") or {}).get("source", "—")
    if r["status"] == "ok":
        warn = " (warnings)" if r.get("warnings") else ""
        status = (r.get("cg_status") or "ok") + warn
        return (f"| {r['n']} | {data} | {r['library']} | {r['forward_s']:.2f} | {r['backward_s']:.2f} | "
                f"{r['total_s']:.2f} | {r['peak_rss_gb']:.2f} | {C.fmt(r.get('cg_iterations'), 'd')} | "
                f"{r['mll_per_point']:+.4f} | {C.fmt(r.get('mll_rel_err'), '.1e')} | "
                f"{C.fmt(r.get('logdet_rel_err'), '.1e')} | {C.fmt(r.get('grad_rel_err'), '.1e')} | {status} |")
    reason = r.get("reason") or "failed"
    err = str(r.get("error", ""))
    err = (err.split("; ")[0] if reason == "oom" else err).replace("|", "/")[:90]
    return (f"| {r['n']} | {data} | {r['library']} | — | — | — | "
            f"{C.fmt(r.get('peak_rss_gb'), '.2f')} | — | — | — | — | — | failed: {reason} ({err}) |")


def _data_notes(recs: list, st: dict) -> list:
    """The "Data:" paragraph of :func:`render_markdown`: where each problem's points came from."""
    srcs = {}
    for r in recs:
        d = r.get("data") or {}
        if d:
            srcs.setdefault(d.get("source"), set()).add(r["n"])
    if not srcs:
        return []
    notes = []
    for s, ns in srcs.items():
        if s and s.startswith("synthetic"):
            notes.append(f"`{s}` (n = {', '.join(map(str, sorted(ns)))}): X ~ N(0, I), y a random-Fourier-feature "
                         f"draw from the GP prior at these hyperparameters plus noise")
        else:
            notes.append(f"`{s}` (n = {', '.join(map(str, sorted(ns)))}): random subsample (seed {st['seed']})")
    return ["Data: " + "; ".join(notes) + ". X columns and y standardised per problem.", ""]


def render_markdown(payload: dict) -> str:
    st, m = payload["settings"], payload["machine"]
    recs = sorted(payload["records"], key=lambda r: (r["n"], {REFERENCE: 0, "gpscale": 1, "gpytorch": 2}.get(r["library"], 3)))
    lines = [
        "## Marginal log-likelihood forward + backward: gpscale vs GPyTorch (CPU)",
        "",
        f"One MLL forward + backward at fixed hyperparameters, kernel {st['kernel'].upper()} (shared lengthscale "
        f"{st['lengthscale']}, outputscale {st['outputscale']}), noise {st['noise']}, d = {st['d']}, {st['dtype']}; "
        f"both libraries run BBMM with CG rtol {st['rtol']}, {st['num_probes']} probes, pivoted-Cholesky "
        f"preconditioner of rank {st['rank']}, max {st['max_iter']} CG iterations. Each (library, n) runs in a "
        f"fresh process (peak RSS = that process's high-water mark, including the Python/torch baseline of "
        f"about {_baseline(recs)} GB), address space capped at {st['memory_limit_gb']} GB. Times are the {st.get('stat', 'median')} of "
        f"{st['repeats']} run(s) after a warm-up at n = {st['warmup']}. Errors are relative to an exact float64 "
        f"dense-Cholesky reference (`{REFERENCE}`, computed for n <= {st['cholesky_max']}); the gradient error is "
        f"the vector norm over (lengthscale, outputscale, noise).",
        "",
        f"Machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpu_count')} logical CPUs ({_threads(recs)} torch threads), "
        f"{m.get('mem_total_gb')} GB RAM; torch {m.get('torch_version')}, gpytorch {m.get('gpytorch_version')}, "
        f"linear_operator {m.get('linear_operator_version')}, gpscale {m.get('gpscale_version')} "
        f"(commit {str(m.get('git_commit'))[:10]}{' + local changes' if m.get('git_dirty') else ''}); "
        f"{m.get('date_utc')}; load average at start {_load(m.get('loadavg_at_start'))}.",
        "",
        f"Command: `{m.get('command')}`",
        "",
        "| n | data | library | fwd s | bwd s | total s | peak RSS GB | CG iters | MLL / n | MLL rel err "
        "| log-det rel err | grad rel err | status |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_table_row(r) for r in recs]
    lines.append("")
    ratios = [ratio_line(recs, n) for n in sorted({r["n"] for r in recs})]
    ratios = [x for x in ratios if x]
    if ratios:
        lines += ["Ratios (total time; peak RSS):", ""] + [f"- {x}" for x in ratios] + [""]
    lines += _data_notes(recs, st)
    lines += [
        "CG iters: gpscale reports the largest iteration count over its 11 right-hand sides (it stops when "
        "every column reaches rtol); GPyTorch stops when the *mean* relative residual over the columns reaches "
        "rtol, never before 11 iterations, and (when computing a log-det) never before "
        "`max_lanczos_quadrature_iterations` (20) iterations; its Lanczos log-det uses at most those 20 steps.",
        "",
    ]
    return "\n".join(lines)


def _baseline(recs) -> str:
    vals = [r["rss_before_gb"] for r in recs if r.get("rss_before_gb") and r["library"] != REFERENCE]
    return f"{min(vals):.2f}" if vals else "?"


def _threads(recs) -> str:
    vals = sorted({r.get("torch_threads") for r in recs if r.get("torch_threads")})
    return "/".join(map(str, vals)) if vals else "?"


def _load(x) -> str:
    return ", ".join(f"{v:.1f}" for v in x) if x else "?"
