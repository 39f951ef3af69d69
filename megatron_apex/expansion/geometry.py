"""APEX geometry: how many units of each kind a stage expands, in which layers, in how many operator
blocks, on which tensor-parallel ranks, and when the stages start. Pure arithmetic on the config's
numbers (no torch), so the dry run, the config checks and the engine read the same answers.

A layer has ``n`` units of each kind ('attn': query groups, 'ffn': FFN channels). A stage selects k
of them as P (advantageous) and k as N (disadvantageous) and mixes P into N through an operator that
is block-diagonal over B blocks. A block normally lies on one tensor-parallel rank; where one block's P and
N units cannot (more of them than a rank holds), the kind's operator *spans* the ranks: it is replicated
on every rank of the group and the rows it reads are exchanged (docs/method.md). Either way the layout
does not change the method.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

from megatron_apex.config import Config, ConfigError

UNIT_NAMES = {"attn": "attention units", "ffn": "FFN channels"}  # the unit kinds, as messages name them


def unit_share(frac: float, n_units: int) -> int:
    """floor(frac * n_units), robust to binary rounding (0.1875 * 32 is exactly 6, not 5)."""
    return int(math.floor(frac * n_units + 1e-9))


def block_count(n_units: int, partitions: int, k: int = 0) -> int:
    """B = gcd(``apex.partitions``, n_units, k): the operator's blocks of a layer's units of one kind.

    B divides the units and the k selected units (k = 0 leaves k out), so every block holds k/B P and
    k/B N units and no selected unit is lost to rounding. B does not depend on the TP degree: every
    block lies on one rank (:func:`block_ranks`). 32 heads, k = 4, partitions 8: B = 4.
    """
    if n_units <= 0 or partitions <= 0 or k < 0:
        raise ValueError(f"block_count needs positive n_units and partitions and k >= 0, got "
                         f"{n_units}, {partitions}, {k}")
    return math.gcd(partitions, n_units, k)


def budget_layers(ratio: float, n_units: int, n_layers: int) -> int:
    """Layers in which a unit kind expands at every stage.

    All ``n_layers`` when floor(ratio x n_units) selects at least one unit per layer. Below that (4 query
    groups at ratio 0.125) the kind is not dropped: the model-wide budget round(ratio x n_units x n_layers)
    is spent as one P/N pair in that many layers, as the released code does for small head budgets
    (:func:`expanded_layers` picks them). TinyLlama's 4 groups x 22 layers at 0.125: 11 layers.
    """
    if unit_share(ratio, n_units) >= 1:
        return n_layers
    return min(n_layers, int(math.floor(ratio * n_units * n_layers + 0.5)))


def expanded_layers(seed: int, stage: int, kind: str, n_layers: int, count: int) -> list[int]:
    """The global indices of the ``count`` layers that expand unit kind ``kind`` in stage ``stage``
    (0-based), ascending: every layer when ``count == n_layers``, else a draw determined by
    (``train.seed``, stage, kind) alone, so every rank and every parallel layout picks the same."""
    if count >= n_layers:
        return list(range(n_layers))
    rng = random.Random(f"apex-layers:{seed}:{stage}:{kind}")  # str seeds hash with SHA-512: stable
    return sorted(rng.sample(range(n_layers), count))


def units_per_layer(ratio: float, n_units: int, partitions: int, n_layers: int = 0) -> tuple[int, int]:
    """(k, B) of one unit kind at the first stage: k = floor(ratio * n_units) P (and N) units per layer,
    over B = :func:`block_count` blocks. With ``n_layers`` a budget below one unit per layer that still
    spends at least one model-wide (:func:`budget_layers`) gives k = 1 (in those layers)."""
    k = unit_share(ratio, n_units)
    if k == 0 and n_layers and budget_layers(ratio, n_units, n_layers):
        k = 1
    return k, block_count(n_units, partitions, k)


def block_ranks(n_units: int, blocks: int, k: int, tp_size: int) -> Optional[list[int]]:
    """The tensor-parallel rank that holds each of the B operator blocks of a unit kind, or None when
    a block cannot lie on one rank (the kind's operator then spans the ranks, :func:`spans`).

    After the stage's permutation the k/B P and k/B N units of block b are packed at the start of its
    partition, units [b x U, b x U + 2k/B) with U = n/B; rank q holds units [q x n/t, (q+1) x n/t). When t
    divides B every rank holds B/t blocks; with fewer blocks than ranks some ranks hold none and do no
    operator work. Either way TP=1 computes the same function, so the layout never changes the method.
    """
    if k == 0:
        return []
    size, per_rank, span = n_units // blocks, n_units // tp_size, 2 * (k // blocks)
    ranks = []
    for b in range(blocks):
        q = b * size // per_rank
        if b * size + span > (q + 1) * per_rank:
            return None
        ranks.append(q)
    return ranks


def spans(n_units: int, blocks: int, k: int, tp_size: int) -> bool:
    """Whether a unit kind's operator spans the tensor-parallel ranks: some block's k/B P and k/B N units
    do not fit on one rank (4 query groups, k = 1 at TP=4: each rank holds one group, and the block
    needs two). Such an operator is replicated on every rank of the group; each call gathers the P and N
    rows of the layer from the ranks that hold them and writes back its own (expansion/spanning.py)."""
    return k > 0 and block_ranks(n_units, blocks, k, tp_size) is None


def stage_k(k: int, stage: int, progressive: bool, blocks: int = 1) -> int:
    """k of stage ``stage`` (0-based) of a unit kind whose first stage selects ``k`` in ``blocks`` blocks
    (B, which divides k): k throughout, or with ``apex.progressive`` halved at every stage, rounded
    down to a multiple of B and never below B (one unit per block, so a halved stage still expands).
    32 heads, k = 4, B = 4: 4, 4, 4. 128 channels, k = 16, B = 8: 16, 8, 8."""
    if not progressive or k == 0:
        return k
    return max(blocks, (k >> stage) // blocks * blocks)


@dataclass(frozen=True)
class Geometry:
    """The APEX geometry of one config (:func:`of`)."""

    units: dict        # kind -> (units per layer n, k, blocks B) of the first stage
    boundaries: list   # the steps at which the stages start
    stage_ks: dict     # kind -> k of every stage (progressive stages halve it)
    layers: dict       # kind -> in how many layers it expands at every stage (all, unless a small budget)
    num_layers: int
    seed: int
    spanning: dict = None  # kind -> whether its operator spans the tensor-parallel ranks (:func:`spans`)

    def stage_layers(self, stage: int) -> dict:
        """Per unit kind: the global layer indices expanding it in stage ``stage`` (0-based)."""
        return {kind: expanded_layers(self.seed, stage, kind, self.num_layers, count)
                for kind, count in self.layers.items()}


def stage_boundaries(cfg: Config) -> list:
    """Stage start steps: ``apex.boundaries``, or ``apex.stages`` evenly spaced over the run (the first
    at step 0)."""
    if cfg.apex.boundaries:
        return list(cfg.apex.boundaries)
    n = cfg.apex.stages
    return [round(i * cfg.train.train_steps / n) for i in range(n)]


def of(cfg: Config) -> Geometry:
    """The geometry the config's model, APEX settings and run length give (unchecked: :func:`check`)."""
    a, layers = cfg.apex, cfg.model.num_layers
    units = {kind: (n, *units_per_layer(a.kind_ratio(kind), n, a.partitions, layers))
             for kind, n in (("attn", cfg.model.query_groups), ("ffn", cfg.model.ffn_hidden_size))}
    boundaries = stage_boundaries(cfg)
    return Geometry(
        units=units, boundaries=boundaries,
        stage_ks={kind: [stage_k(k, s, a.progressive, b) for s in range(len(boundaries))]
                  for kind, (_, k, b) in units.items()},
        layers={kind: budget_layers(a.kind_ratio(kind), n, layers) if k else 0 for kind, (n, k, _) in units.items()},
        num_layers=layers, seed=cfg.train.seed,
        spanning={kind: spans(n, b, k, cfg.parallel.tensor_model_parallel_size) for kind, (n, k, b) in units.items()})


def _check(ok: bool, name: str, value, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {problem}")


def check(cfg: Config) -> Optional[Geometry]:
    """What the APEX settings ask of the model, the layout and the run, as :class:`ConfigError` naming
    the keys to change (the fields' own ranges are checked by ``ApexConfig.validate``). Returns the
    geometry, or None when APEX is off (its settings are then neither checked nor used)."""
    a, m, t = cfg.apex, cfg.model, cfg.train
    if not a.enabled:
        return None
    g = of(cfg)
    if not any(k for _, k, _ in g.units.values()):
        keys = {kind: f"apex.{kind}_ratio" if getattr(a, f"{kind}_ratio") is not None else "apex.ratio"
                for kind in g.units}
        layers = m.num_layers
        raise ConfigError(
            "APEX selects no unit: round(ratio x units x layers) is 0 for the " + " and the ".join(
                f"{n} {UNIT_NAMES[kind]} ({keys[kind]}={a.kind_ratio(kind)}; >= {0.5 / (n * layers):.4g} "
                f"selects one in one of the {layers} layers, >= {1 / n:.4g} one in every layer)"
                for kind, (n, _, _) in g.units.items()) + "; raise one of them, or set apex.enabled=false")
    if a.boundaries:
        b = g.boundaries
        _check(b[0] >= 0 and b[-1] < t.train_steps, "apex.boundaries", b,
               f"must lie in [0, train.train_steps={t.train_steps})")
    else:
        _check(1 <= a.stages <= t.train_steps, "apex.stages", a.stages,
               f"must lie in [1, train.train_steps={t.train_steps}]")
    if a.progressive:  # every stage picks its P and N (and E) among units not yet used as N
        for kind, (n_u, _, _) in g.units.items():
            tuned = unit_share(getattr(a, f"{kind}_tuned_ratio"), n_u) if a.mode == "selected" else 0
            used = 0
            for stage, k in enumerate(g.stage_ks[kind]):
                need = max(2 * k, tuned if k else 0)
                _check(need <= n_u - used, "apex.progressive", True,
                       f"stage {stage + 1} of {len(g.stage_ks[kind])} would select {need} of the {n_u} "
                       f"{UNIT_NAMES[kind]} per layer, but only {n_u - used} have not been N units of an earlier "
                       f"stage (k per stage: {g.stage_ks[kind]}); use fewer stages, a smaller ratio"
                       + (" or tuned ratio" if a.mode == "selected" else "") + ", or apex.progressive=false")
                used += k
    return g


def path_notes(cfg: Config, g: Geometry) -> list:
    """How the operator runs, for the dry run and the start-up log: the path, then one line per unit kind
    whose operator spans the tensor-parallel ranks (those run per linear call)."""
    a, p = cfg.apex, cfg.parallel
    if a.mode == "selected":
        notes = ["the operator runs per linear call (W_eff built in every call): apex.mode='selected' freezes the "
                 "base weights, which then have no gradient buffer for the in-place path"]
    else:
        notes = ["the operator runs in place, once per step on the P and N rows" + (
            "; its chain rule runs before megatron-core reduces each bucket during the backward pass "
            "(parallel.overlap_grad_reduce)" if p.overlap_grad_reduce else "")]
    tp = p.tensor_model_parallel_size
    m = cfg.model
    r, d, h = m.num_attention_heads // m.query_groups, m.head_dim, m.hidden_size
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and p.backend != "gloo")
    for kind, (n, k, b) in g.units.items():
        if not g.spanning.get(kind):
            continue
        rows = 2 * k * ((r + 2) * d + r * d) if kind == "attn" else 2 * k * 3  # of qkv + proj, or fc1 + fc2
        mib = rows * h * (2 if bf16 else 4) / 2 ** 20
        notes.append(f"{UNIT_NAMES[kind]}: a block's {2 * (k // b)} P and N units do not fit on one of the "
                     f"TP={tp} ranks ({n // tp} each), so the operator spans the ranks: replicated on every rank, "
                     f"per linear call (not in place), the rows of the layer's {2 * k} P and N units gathered and "
                     f"their gradients summed over the group (all-reduces of {mib:.3g} MiB per layer and "
                     f"micro-batch, forward and backward each)")
    return notes
