"""Heat map of the APEX advantage scores and selections stored in a checkpoint saved mid-APEX.

One panel per unit kind (attention units = query groups, FFN channels): layers on the y axis, units
on the x axis, this stage's scores as color (summed over data-parallel ranks): the vote counts, or,
for a run with ``apex.statistic`` 'norm' or 'ema' (which do not vote), the summed activation norms or
their moving average. The units of the current stage's P (advantageous) and N (disadvantageous) sets
are marked. Both the votes and the
marks are in the layer's *current* unit order (after the stage's balancing permutation), which is
the order the votes are being collected in: P/N are drawn at ``p_pos``/``n_pos``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_apex.analysis.checkpoint_io import atomic_output, global_votes, load_apex_states

KINDS = (("attn", "attention units (query groups)"), ("ffn", "FFN channels"))
SCORE_LABELS = {"rank": "votes", "norm": "summed norm", "ema": "EMA of norm"}


def report_data(checkpoint: str) -> dict:
    """Votes, raw sums and selections of a checkpoint, plus its step and stage."""
    common, states = load_apex_states(checkpoint)
    data = global_votes(common, states)
    data.update({"step": common["step"], "stage": common["apex"]["stage"], "finished": common["apex"]["finished"],
                 "boundaries": common["apex"]["boundaries"], "layout": common["layout"],
                 "statistic": common["apex"].get("statistic", "rank")})  # saved before the option: votes
    return data


def scores(data: dict, kind: str):
    """(``[L, n]`` scores the selection ranks by, their label): votes, or the raw score without votes."""
    statistic = data.get("statistic", "rank")
    matrix = data["votes"][kind] if statistic == "rank" else data["raw"][kind]
    return matrix, SCORE_LABELS.get(statistic, statistic)


def marks(selection: dict, kind: str, key: str) -> list:
    sel = (selection or {}).get(kind)
    if not sel or sel.get(key) is None:
        return []
    return [int(x) for x in torch.as_tensor(sel[key]).reshape(-1).tolist()]


def render(data: dict, output: str, title: Optional[str] = None) -> str:
    """Write the heat map PNG; returns the output path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [(k, label) for k, label in KINDS if k in data["votes"]]
    widths = [max(4.0, min(14.0, data["votes"][k].shape[1] * 0.12)) for k, _ in kinds]
    n_layers = next(iter(data["votes"].values())).shape[0]
    fig, axes = plt.subplots(1, len(kinds), figsize=(sum(widths) + 2, 1.5 + 0.45 * n_layers), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (kind, label) in zip(axes[0], kinds):
        matrix, what = scores(data, kind)
        matrix = matrix.float().numpy()
        if data.get("statistic", "rank") == "rank":  # signed counts around 0
            lim = max(1.0, float(abs(matrix).max()))
            im = ax.imshow(matrix, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        else:  # non-negative norms
            im = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
        for li in range(n_layers):
            sel = data["selection"].get(li, {})
            p, n = marks(sel, kind, "p_pos"), marks(sel, kind, "n_pos")
            ax.scatter(p, [li] * len(p), marker="^", s=18, c="black", label="P" if li == 0 else None)
            ax.scatter(n, [li] * len(n), marker="v", s=18, facecolors="none", edgecolors="black",
                       label="N" if li == 0 else None)
        ax.set_title(f"{label}: {what}, P (▲) / N (▽)", fontsize=9)
        ax.set_xlabel("unit (current order)")
        ax.set_ylabel("layer")
        ax.set_yticks(range(n_layers))
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label(what, fontsize=8)
    # Scores restart at every boundary and are not collected after the last one: a finished run's
    # panels are empty by design.
    state = ("finished: no scores are collected after the last boundary" if data["finished"]
             else f"stage {data['stage']}/{len(data['boundaries'])}")
    fig.suptitle(title or f"APEX scores at step {data['step']} ({state}, boundaries {data['boundaries']})",
                 fontsize=10)
    fig.tight_layout()
    try:
        with atomic_output(output) as tmp:
            fig.savefig(tmp, dpi=110, format="png")  # a PNG whatever the name ends with
    finally:
        plt.close(fig)
    return output
