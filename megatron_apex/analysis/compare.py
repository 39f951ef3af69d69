"""Compare training runs: curves with seed bands, final losses with confidence intervals, paired
differences, and tokens-to-match.

A *run* is read from a run directory (TensorBoard events anywhere below it, and the ``eval.json`` that
``tools/evaluate.py --json`` wrote there, if any) or from a run summary JSON (the dict
:func:`read_run` returns, as ``examples/apex_cpt_study`` commits them). Runs are grouped by the caller;
a group's name is ``ARM/LABEL`` (``plain/full``, ``apex/third``), the arm being the part before the
slash. Seeds pair runs of two groups: the paired difference of two methods on the same seed is far
less noisy than the difference of two independent means.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Optional

# Two-sided 95 % Student t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_interval(values: list) -> tuple[float, float]:
    """(mean, half-width of its 95 % confidence interval) by Student's t; half-width NaN for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * sd / math.sqrt(n)


def read_tensorboard(path: str) -> dict:
    """{tag: [(step, value), ...]} of every scalar in the TensorBoard event files below ``path``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict = {}
    for events in sorted(glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(events, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points = curves.setdefault(tag, {})
            for e in acc.Scalars(tag):
                points[e.step] = e.value  # a resumed run writes a second file: later points win
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def read_run(path: str) -> dict:
    """One run as ``{"name", "seed", "tokens", "final": {dataset: loss}, "curves": {tag: [[step, value]]}}``.

    ``final`` holds the losses of ``eval.json`` (tools/evaluate.py) keyed by the dataset's file name,
    else the last point of each ``valid/loss``-like curve; ``seed`` and ``tokens`` come from there too
    (None when unknown)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        missing = {"name", "final", "curves"} - set(run)
        if missing:
            raise ValueError(f"{path}: not a run summary (no {', '.join(sorted(missing))})")
        return run
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such run directory or summary file")
    curves = {tag: [[s, v] for s, v in points] for tag, points in read_tensorboard(path).items()}
    run = {"name": os.path.basename(os.path.normpath(path)), "seed": None, "tokens": None, "final": {},
           "curves": curves}
    evaluation = os.path.join(path, "eval.json")
    if os.path.isfile(evaluation):
        with open(evaluation, encoding="utf-8") as f:
            ev = json.load(f)
        run["final"] = {os.path.basename(d["prefix"]): d["loss"] for d in ev["datasets"]}
        trained = ev.get("trained") or {}
        run["seed"], run["tokens"] = trained.get("seed"), trained.get("tokens")
    elif not curves:
        raise ValueError(f"{path}: neither TensorBoard events nor eval.json below it")
    else:
        run["final"] = {tag: points[-1][1] for tag, points in curves.items() if tag.endswith("loss")
                        and tag.startswith("valid")}
    return run


def group_table(groups: dict, metric: str) -> list:
    """One row per group: its runs' ``final[metric]`` mean, 95 % interval, seeds and mean tokens."""
    rows = []
    for name, runs in groups.items():
        values = [r["final"][metric] for r in runs if metric in r["final"]]
        if not values:
            raise ValueError(f"group {name}: no run has a final {metric!r} (have: "
                             f"{sorted({k for r in runs for k in r['final']})})")
        mean, half = mean_interval(values)
        tokens = [r["tokens"] for r in runs if r.get("tokens")]
        rows.append({"group": name, "n": len(values), "mean": mean, "ci95": half, "values": values,
                     "seeds": [r.get("seed") for r in runs], "tokens": sum(tokens) / len(tokens) if tokens else None})
    return rows


def paired_difference(runs: list, reference: list, metric: str) -> Optional[dict]:
    """Mean and 95 % interval of ``run - reference`` over the seeds both groups have (None: no pair)."""
    ref = {r.get("seed"): r["final"].get(metric) for r in reference if r.get("seed") is not None}
    diffs = [r["final"][metric] - ref[r["seed"]] for r in runs
             if r.get("seed") in ref and ref[r["seed"]] is not None and metric in r["final"]]
    if not diffs:
        return None
    mean, half = mean_interval(diffs)
    return {"n": len(diffs), "mean": mean, "ci95": half, "values": diffs}


def tokens_to_match(rows: list, reference: str) -> dict:
    """Per arm (other than the reference's): the fewest tokens of a group of that arm whose mean is at or
    below the reference group's mean, with an interval from the groups' own intervals (optimistic: lower
    bound at or below; conservative: upper bound at or below). None where no group of the arm reaches it."""
    by_name = {r["group"]: r for r in rows}
    if reference not in by_name:
        raise ValueError(f"--reference {reference}: no such group (have {', '.join(by_name)})")
    target = by_name[reference]["mean"]
    ref_arm = reference.split("/")[0]
    out = {}
    for arm in dict.fromkeys(r["group"].split("/")[0] for r in rows):
        if arm == ref_arm:
            continue
        mine = sorted((r for r in rows if r["group"].split("/")[0] == arm and r["tokens"]), key=lambda r: r["tokens"])

        def first(ok):
            return next((r["tokens"] for r in mine if ok(r)), None)

        half = lambda r: 0.0 if math.isnan(r["ci95"]) else r["ci95"]  # noqa: E731
        out[arm] = {"tokens": first(lambda r: r["mean"] <= target),
                    "optimistic": first(lambda r: r["mean"] - half(r) <= target),
                    "conservative": first(lambda r: r["mean"] + half(r) <= target),
                    "reference_tokens": by_name[reference]["tokens"], "reference_mean": target}
    return out


def _fmt_tokens(t) -> str:
    if t is None:
        return "not reached"
    return f"{t / 1e6:.3g}M" if t >= 1e5 else f"{t:.0f}"


def markdown_report(rows: list, metric: str, paired: dict, matched: dict, reference: Optional[str]) -> str:
    lines = [f"Final {metric}: mean and 95 % confidence interval over seeds (Student t).", "",
             "| group | runs | tokens | mean | 95 % CI | " + ("paired diff. vs " + reference + " | " if reference else ""),
             "|---|---|---|---|---|" + ("---|" if reference else "")]
    for r in rows:
        ci = "n/a" if math.isnan(r["ci95"]) else f"± {r['ci95']:.4f}"
        cell = ""
        if reference:
            p = paired.get(r["group"])
            cell = "-" if p is None or r["group"] == reference else (
                f"{p['mean']:+.4f} ± {p['ci95']:.4f} (n={p['n']})" if not math.isnan(p["ci95"]) else f"{p['mean']:+.4f} (n=1)")
            cell += " | "
        lines.append(f"| {r['group']} | {r['n']} | {_fmt_tokens(r['tokens'])} | {r['mean']:.4f} | {ci} | {cell}")
    if matched:
        lines += ["", f"Tokens to match {reference} ({_fmt_tokens(next(iter(matched.values()))['reference_tokens'])} "
                  "tokens): the fewest tokens of an arm whose mean is at or below the reference mean "
                  "(interval: the groups' CI bounds at or below it).", ""]
        for arm, m in matched.items():
            lines.append(f"- {arm}: {_fmt_tokens(m['tokens'])} (interval {_fmt_tokens(m['optimistic'])} .. "
                         f"{_fmt_tokens(m['conservative'])})")
    return "\n".join(lines) + "\n"


def plot_curves(groups: dict, tag: str, path: str, title: Optional[str] = None) -> None:
    """One line per group (the mean over its runs at the steps all of them logged) with a band from the
    lowest to the highest run, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    drawn = 0
    for name, runs in groups.items():
        series = [dict((s, v) for s, v in r["curves"].get(tag, [])) for r in runs]
        series = [s for s in series if s]
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        if not steps:
            continue
        values = [[s[step] for s in series] for step in steps]
        mean = [sum(v) / len(v) for v in values]
        line, = ax.plot(steps, mean, label=f"{name} (n={len(series)})", lw=1.4)
        if len(series) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.18, lw=0)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no run has a {tag!r} curve")
    ax.set_xlabel("step")
    ax.set_ylabel(tag)
    ax.set_title(title or f"{tag}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(groups: dict, metric: str, reference: Optional[str] = None) -> dict:
    """Everything the report needs: per-group rows, paired differences and tokens-to-match vs ``reference``."""
    rows = group_table(groups, metric)
    paired, matched = {}, {}
    if reference is not None:
        if reference not in groups:
            raise ValueError(f"--reference {reference}: no such group (have {', '.join(groups)})")
        paired = {name: paired_difference(runs, groups[reference], metric) for name, runs in groups.items()}
        matched = tokens_to_match(rows, reference)
    return {"metric": metric, "reference": reference, "groups": rows, "paired": paired, "tokens_to_match": matched}
