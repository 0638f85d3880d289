"""Benchmark reporting: aggregation over seeds, the Markdown table and matplotlib (Agg) plots."""

from __future__ import annotations

import math

import numpy as np


def aggregate(runs: list[dict], exact_logdet: float, rtols: list[float]) -> dict:
    """Means over seeds of one arm's runs, and the log-det error (mean, |mean|, std) per tolerance."""
    timed = [r for r in runs if not r.get("logdet_only")]
    out = {"rank_actual": float(np.mean([r["rank"] for r in timed])),
           "build_seconds": float(np.mean([r["build_seconds"] for r in timed]))}
    rt = [r["residual_trace_rel"] for r in timed if r.get("residual_trace_rel") is not None]
    out["residual_trace_rel"] = float(np.mean(rt)) if rt else None
    for rtol in rtols:
        ms = [r["solves"][f"{rtol:g}"] for r in timed]
        # log-det spread over every seed that solved at this tolerance (incl. --logdet-seeds extras)
        err = np.array([r["solves"][f"{rtol:g}"]["logdet"] - exact_logdet for r in runs if f"{rtol:g}" in r["solves"]])
        out[f"{rtol:g}"] = {
            "iters_y": float(np.mean([m["iters_y"] for m in ms])),
            "iters_probes_mean": float(np.mean([m["iters_probes_mean"] for m in ms])),
            "iters_probes_max": int(max(m["iters_probes_max"] for m in ms)),
            "wall_seconds": float(np.mean([m["wall_seconds"] for m in ms])),
            "converged": all(m["status"] == "CONVERGED" for m in ms),
            "logdet_error_mean": float(err.mean()), "logdet_abs_error_mean": float(np.abs(err).mean()),
            "logdet_std": float(err.std(ddof=1)) if len(err) > 1 else float("nan"),
            "logdet_seeds": int(len(err)),
        }
    return out


def logdet_rtol(settings: dict) -> float:
    """The tolerance the log-det columns report: the loosest when extra ``--logdet-seeds`` ran there."""
    extra = [x for x in (settings.get("logdet_seeds") or []) if x not in settings["seeds"]]
    return max(settings["rtols"]) if extra else min(settings["rtols"])


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def markdown(results: dict) -> str:
    """The results as Markdown: a settings header and one table per data set."""
    s, env = results["settings"], results["environment"]
    cpu_note = (" -- a CPU-sized run; the full data sets need a GPU and a larger `--max-n`"
                if env["device"] == "cpu" else "")
    lines = ["# Preconditioner benchmark (`gpscale bench precond`)", "",
             f"- device: {env['device']}; torch {env['torch']}, {env['threads']} threads; dtype {s['dtype']}; "
             f"kernel {s['kernel']} (ARD)",
             f"- each data set is a random subsample of at most **n = {s['max_n']}** rows (`--max-n {s['max_n']}`)"
             f"{cpu_note}",
             f"- hyperparameters fitted once per data set by Cholesky MLL on {s['hyper_n']} points (cached), so "
             "every arm solves the same system",
             f"- CG on `[z_1..z_{s['num_probes']}, y]` with probes `z ~ N(0, P)`; iterations: `y` column / mean over "
             f"the probe columns; times are means over seeds {s['seeds']}",
             f"- log-det error: SLQ estimate minus the Cholesky log-det on the first {s['logdet_max_n']} points "
             f"(all n if fewer), mean ± std over seeds {s.get('logdet_seeds') or s['seeds']}, at rtol "
             f"{_fmt(logdet_rtol(s))}", ""]
    lines += _summary(results)
    for name, ds in results["datasets"].items():
        lines += _table(name, ds, s["rtols"], logdet_rtol(s))
    lines += [f"Wall time of the whole run: {results.get('total_seconds', float('nan')):.0f} s.", ""]
    return "\n".join(lines)


def _arm(ds: dict, family: str, rank: int) -> dict | None:
    return next((a["summary"] for a in ds["arms"] if a["family"] == family and a["rank"] == rank), None)


def _summary(results: dict, family: str = "rpchol", rank: int | None = None) -> list[str]:
    """One row per data set: ``family`` at ``rank`` against no preconditioner and greedy pivoted Cholesky.

    ``rank`` defaults to 200 (the issue's reference rank) when it was run, else the largest rank run.

    Iterations of the ``y`` column at the tightest tolerance, construction time as a share of the CG
    time it saves there, and the log-det spread over seeds (Wenger et al. 2022: the preconditioned
    estimator's variance falls with the preconditioner's quality).
    """
    s = results["settings"]
    ranks = [int(r) for r in s.get("ranks") or [200]]
    rank = rank if rank is not None else (200 if 200 in ranks else max(ranks))
    rt, lt = f"{min(s['rtols']):g}", f"{logdet_rtol(s):g}"
    rows = []
    for name, ds in results["datasets"].items():
        base, ours, piv = _arm(ds, "none", 0), _arm(ds, family, rank), _arm(ds, "pivchol", rank)
        if base is None or ours is None:
            continue
        saved = base[rt]["wall_seconds"] - ours[rt]["wall_seconds"]
        share = f"{ours['build_seconds'] / saved:.1%}" if saved > 0 else "no time saved"
        piv_its = _fmt(piv[rt]["iters_y"], 4) if piv else "-"
        ratio = base[lt]["logdet_std"] / ours[lt]["logdet_std"] if ours[lt]["logdet_std"] > 0 else float("nan")
        capped = "" if base[rt]["converged"] else " (max_iter: a lower bound)"
        rows.append(f"| {name} | {_fmt(ds['hypers']['noise'])} | {base[rt]['iters_y']:.0f}{capped} | "
                    f"{ours[rt]['iters_y']:.0f} ({ours[rt]['iters_y'] / max(base[rt]['iters_y'], 1):.2f}x) | "
                    f"{piv_its} | {_fmt(ours['build_seconds'])} s / {_fmt(saved)} s = {share} | "
                    f"{_fmt(base[lt]['logdet_std'])} → {_fmt(ours[lt]['logdet_std'])} ({_fmt(ratio)}x) |")
    if not rows:
        return []
    return [f"## Summary: {family} at rank {rank}", "",
            f"| data set | noise | iters y, none @{rt} | iters y, {family} {rank} | iters y, pivchol {rank} | "
            f"build / CG time saved @{rt} | log-det std none → {family} {rank} @{lt} |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def _table(name: str, ds: dict, rtols: list[float], ld_rtol: float) -> list[str]:
    lines = [f"## {name} (n = {ds['n']} of {ds['rows_total']}, d = {ds['d']}, "
             f"noise = {_fmt(ds['hypers']['noise'])}, log-det on m = {ds['logdet_n']}: {ds['exact_logdet']:.6g})", ""]
    head = ["preconditioner", "rank", "k", "build s"]
    for rtol in rtols:
        head += [f"iters y/probes @{_fmt(rtol)}", f"CG s @{_fmt(rtol)}"]
    head += [f"log-det err ± std @{_fmt(ld_rtol)}", "tr(K-LLᵀ)/tr(K)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in ds["arms"]:
        a = arm["summary"]
        row = [arm["family"], str(arm["rank"]), _fmt(a["rank_actual"], 4), _fmt(a["build_seconds"])]
        for rtol in rtols:
            m = a[f"{rtol:g}"]
            flag = "" if m["converged"] else " (max_iter)"
            row += [f"{m['iters_y']:.0f} / {m['iters_probes_mean']:.0f}{flag}", _fmt(m["wall_seconds"])]
        m = a[f"{ld_rtol:g}"]
        row += [f"{m['logdet_error_mean']:+.3g} ± {_fmt(m['logdet_std'])}", _fmt(a["residual_trace_rel"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def plots(results: dict, out_dir: str) -> list[str]:
    """Residual curves, log-det error vs rank, and iterations / time vs rank (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    rtol = logdet_rtol(results["settings"])
    files = []
    for fname, draw in (("residuals.png", _draw_residuals), ("logdet_error.png", _draw_logdet),
                        ("iterations.png", _draw_iterations)):
        fig, axes = plt.subplots(1 if fname != "iterations.png" else 2, len(names), squeeze=False,
                                 figsize=(4.2 * len(names), 3.6 if fname != "iterations.png" else 6.6))
        for j, name in enumerate(names):
            draw(axes[:, j], name, results["datasets"][name],
                 min(results["settings"]["rtols"]) if draw is _draw_residuals else rtol)
        axes[0, -1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = f"{out_dir}/{fname}"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def _extreme_rank_arms(ds: dict) -> list[tuple[dict, str]]:
    """Per family the smallest-rank (dashed) and the largest-rank (solid) arm."""
    fams = _by_family(ds)
    out = []
    for arms in fams.values():
        arms = sorted(arms, key=lambda a: a["rank"])
        out.append((arms[-1], "-"))
        if len(arms) > 1:
            out.append((arms[0], "--"))
    return out


def _draw_residuals(axes, name, ds, rtol):
    ax = axes[0]
    colors = {}
    for arm, ls in _extreme_rank_arms(ds):
        h = arm.get("history_y")
        if h:
            label = arm["family"] + (f" k={arm['rank']}" if arm["rank"] else "")
            kw = {"color": colors[arm["family"]]} if arm["family"] in colors else {}
            (line,) = ax.semilogy(np.arange(len(h)), np.maximum(h, 1e-300), ls=ls, label=label, **kw)
            colors[arm["family"]] = line.get_color()
    ax.axhline(rtol, color="gray", lw=0.6, ls=":")
    ax.set(title=f"{name}: y-column residual", xlabel="CG iteration", ylabel="||r|| / ||y||")


def _by_family(ds):
    fams: dict = {}
    for arm in ds["arms"]:
        fams.setdefault(arm["family"], []).append(arm)
    return fams


def _draw_logdet(axes, name, ds, rtol):
    ax = axes[0]
    for fam, arms in _by_family(ds).items():
        m = [a["summary"][f"{rtol:g}"] for a in arms]
        bias = np.abs([x["logdet_error_mean"] for x in m])
        std = np.array([x["logdet_std"] if x["logdet_std"] is not None else np.nan for x in m], dtype=float)
        if len(arms) == 1 and arms[0]["rank"] == 0:
            line = ax.axhline(std[0], ls="-", lw=0.8, color="k" if fam == "none" else "gray", label=f"{fam} (std)")
            ax.axhline(bias[0], ls=":", lw=0.8, color=line.get_color())
            continue
        ranks = [a["rank"] for a in arms]
        (line,) = ax.plot(ranks, std, marker="o", label=f"{fam} (std)")
        ax.plot(ranks, bias, marker="x", ls=":", color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="rank", ylabel="nats",
           title=f"{name}: log-det error (— std, ·· |mean|)")


def _draw_iterations(axes, name, ds, rtol):
    for fam, arms in _by_family(ds).items():
        it = [a["summary"][f"{rtol:g}"]["iters_y"] for a in arms]
        tot = [a["summary"]["build_seconds"] + a["summary"][f"{rtol:g}"]["wall_seconds"] for a in arms]
        if len(arms) == 1 and arms[0]["rank"] == 0:
            color = "k" if fam == "none" else "gray"
            axes[0].axhline(it[0], ls="--", lw=0.8, color=color, label=fam)
            axes[1].axhline(tot[0], ls="--", lw=0.8, color=color, label=fam)
            continue
        ranks = [a["rank"] for a in arms]
        axes[0].plot(ranks, it, marker="o", label=fam)
        axes[1].plot(ranks, tot, marker="o", label=fam)
    axes[0].set(xscale="log", yscale="log", title=f"{name}: CG iterations (y) to rtol {rtol:g}", xlabel="rank")
    axes[1].set(xscale="log", yscale="log", title="build + CG seconds", xlabel="rank")
