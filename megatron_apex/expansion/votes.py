"""APEX's shard-aware scoring: per-unit activation statistics of the local layers, ranked into votes
once per scored step and summed until the next stage boundary.

Per-unit squared norms are recorded per micro-batch: FFN from the SiLU megatron-core's MLP computes
(its activation function records; a forward hook on linear_fc1 that recomputes SiLU is the fallback),
attention per query group of the core-attention output (a pre-hook on linear_proj). The re-run
forward of activation recomputation is not recorded. When the step's backward passes are done the
statistics of all local layers are gathered over the TP group in *one* all-gather, ranked (top-K +1,
bottom-K -1) and added to local vote counts, identical on all TP ranks; the norms are summed
(``apex.statistic`` 'rank' and 'norm') or averaged over steps ('ema') as the raw score, which 'norm'
and 'ema' select by without voting. Votes and raw scores are summed over the data-parallel group
once, at the stage boundary.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.random import is_checkpointing

from megatron_apex.config import Config
from megatron_apex.expansion.scoring import (accumulate_scores, step_scores, unit_sq_norms_attn, unit_sq_norms_ffn,
                                             unit_sq_norms_silu)
from megatron_apex.expansion.state import reduce_votes


def _record_silu(mlp, recorder) -> bool:
    """Take the FFN statistic from the SiLU the MLP computes anyway, instead of computing it again.

    Possible when megatron-core's MLP applies ``config.activation_func`` to the gate half itself (the
    unfused SwiGLU path, which the model builder selects); the MLP then gets its own copy of the config
    whose activation function also records. Returns False (the caller falls back to a forward hook on
    linear_fc1 that recomputes SiLU) for any other activation path.
    """
    cfg = mlp.config
    if (cfg.use_te_activation_func or cfg.bias_activation_fusion or not cfg.gated_linear_unit
            or cfg.activation_func is not F.silu or cfg.activation_func_clamp_value is not None):
        return False
    mlp.config = copy.copy(cfg)
    mlp.config.activation_func = recorder
    return True


class VoteRecorder:
    """The votes (and raw scores) of the local layers since the last boundary."""

    def __init__(self, cfg: Config, units: dict):
        self.cfg, self.a = cfg, cfg.apex
        self.n = {kind: n for kind, (n, _, _) in units.items()}
        self.vote_k = {kind: k for kind, (_, k, _) in units.items()}
        self.recording = False    # this step (or scoring pass) records statistics
        self.vote_steps = 0       # steps (and initial scoring passes) whose votes count at the next boundary
        self.stats_time = 0.0     # seconds spent ranking since the last boundary
        self.ranked = None        # this step's votes, ranked before the gradient reduction, added at the step's end
        self.indices: list = []   # the global index of each local layer
        self._stats: list = []

    def attach(self, layer, global_index: int) -> None:
        """Record the statistics of one local transformer layer (in order)."""
        li = len(self.indices)
        self.indices.append(global_index)
        self._stats.append({"attn": [], "ffn": []})
        if not _record_silu(layer.mlp, self._silu_recorder(li)):
            layer.mlp.linear_fc1.register_forward_hook(self._ffn_hook(li))
        layer.self_attention.linear_proj.register_forward_pre_hook(self._attn_hook(li))

    def allocate(self, device) -> None:
        """Vote counters on the statistics' device (no device-to-host copy per step); the boundary
        reduces them over DP there and moves them to the host for the selection."""
        n_layers = len(self.indices)
        self.votes = {k: torch.zeros(n_layers, n, dtype=torch.int64, device=device) for k, n in self.n.items()}
        self.raw = {k: torch.zeros(n_layers, n, dtype=torch.float64, device=device) for k, n in self.n.items()}

    # ------------------------------------------------------------------ recording
    def _recording(self) -> bool:
        """Statistics are taken on the forward pass only: with activation recomputation megatron-core
        re-runs each layer's forward (with grad enabled) inside the backward, which must not vote twice."""
        return self.recording and not (is_checkpointing() and torch.is_grad_enabled())

    def _silu_recorder(self, li: int):
        def silu(x: torch.Tensor) -> torch.Tensor:
            y = F.silu(x)
            if self._recording():
                self._stats[li]["ffn"].append(unit_sq_norms_silu(y.detach()))
            return y
        return silu

    def _ffn_hook(self, li: int):
        def hook(module, inputs, output):
            if self._recording():
                out = output[0] if isinstance(output, tuple) else output  # [s, b, 2*f_local] = [gate | up]
                f_local = out.shape[-1] // 2
                self._stats[li]["ffn"].append(unit_sq_norms_ffn(out.detach()[..., :f_local]))
        return hook

    def _attn_hook(self, li: int):
        ng_local = self.cfg.model.query_groups // self.cfg.parallel.tensor_model_parallel_size

        def hook(module, inputs):
            if self._recording():  # inputs[0]: core attention output [s, b, np_local * d]
                self._stats[li]["attn"].append(unit_sq_norms_attn(inputs[0].detach(), ng_local))
        return hook

    # ------------------------------------------------------------------ ranking
    def rank_step(self, ctx):
        """The votes (None unless apex.statistic is 'rank') and norm sums of the step's recorded statistics,
        ``{kind: (votes, sums)}`` (None if nothing was recorded): one TP all-gather for all local layers,
        then scoring.step_scores on the statistics' device (no host synchronisation). The statistics are
        consumed."""
        t0 = time.perf_counter()
        if not self._stats or not self._stats[0]["ffn"]:
            return None
        n_layers, micro = len(self._stats), len(self._stats[0]["ffn"])
        if any(len(s[kind]) != micro for s in self._stats for kind in s):
            raise RuntimeError(f"APEX: uneven statistics in one step ({[{k: len(v) for k, v in s.items()} for s in self._stats]}"
                               f" per local layer); every layer must record each unit kind once per micro-batch")
        # [L*micro, n_a_loc + n_f_loc], layer-major: one stack per kind over every layer and micro-batch
        local = torch.cat([torch.stack([t for s in self._stats for t in s[kind]]) for kind in ("attn", "ffn")], dim=1)
        self.clear()
        if ctx.cp_size > 1:  # each CP rank saw two chunks of every sequence: their squared norms add up
            dist.all_reduce(local, group=ctx.cp_group)
        n_a_loc = self.n["attn"] // ctx.tp_size
        if ctx.tp_size > 1:
            parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
            dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
        else:
            parts = [local]
        stats = {"attn": torch.cat([p[..., :n_a_loc] for p in parts], dim=-1),
                 "ffn": torch.cat([p[..., n_a_loc:] for p in parts], dim=-1)}
        ranked = {}
        for kind, st in stats.items():  # st: [L*micro, n]
            k = self.vote_k[kind]
            if k == 0:
                continue
            # NaN statistics reach raw (sums keep NaN); the boundary refuses them before selecting.
            ranked[kind] = step_scores(st.view(n_layers, micro, st.shape[-1]), k, self.a.statistic)
        self.stats_time += time.perf_counter() - t0
        return ranked

    def commit(self, ranked) -> None:
        if ranked is not None:
            for kind, (votes, sums) in ranked.items():
                if votes is not None:  # apex.statistic 'rank'
                    self.votes[kind] += votes
                accumulate_scores(self.raw[kind], sums, self.a.statistic, self.a.ema_decay)
            self.vote_steps += 1

    def clear(self) -> None:
        for s in self._stats:
            s["attn"].clear()
            s["ffn"].clear()

    def rank_before_reduction(self, ctx) -> None:
        """Every micro-batch's statistics are in: rank them now, while the device still works on the
        backward, rather than after the step's host synchronisation (committed by :meth:`end_step`)."""
        if self.recording:
            self.ranked = self.rank_step(ctx)

    def end_step(self, ctx, skipped: bool) -> None:
        if self.recording:
            ranked, self.ranked = self.ranked, None
            if skipped:  # a non-finite step (train.nan_policy='skip') casts no votes
                self.clear()
            else:
                self.commit(ranked if ranked is not None else self.rank_step(ctx))
            self.recording = False

    # ------------------------------------------------------------------ scoring passes and boundaries
    def samples_read(self) -> int:
        """The initial scoring pass reads the first ``apex.init_scoring_samples`` (rounded up to whole global
        batches) of the training set, which may be more than the run trains on."""
        gbs = self.cfg.train.global_batch_size
        return -(-self.a.init_scoring_samples // gbs) * gbs

    def initial_scoring(self, trainer) -> None:
        """No-grad passes over the first ``apex.init_scoring_samples`` training samples."""
        from megatron_apex.data.datasets import build_loader

        gbs = self.cfg.train.global_batch_size
        steps = self.samples_read() // gbs
        if steps == 0:
            return
        ctx = trainer.ctx
        it = iter(build_loader(trainer.train_ds, self.cfg, 0, steps * gbs, ctx.dp_rank, ctx.dp_size))
        with torch.no_grad():
            for _ in range(steps):
                self.recording = True
                trainer.forward_only(it)
                self.commit(self.rank_step(ctx))
        self.recording = False

    def take(self, ctx, step: int) -> tuple[dict, dict, int]:
        """(votes, raw scores, scored steps) since the last boundary, summed over data-parallel ranks, on
        the host; the counters start again. Refuses NaN statistics (skipped non-finite steps cast none)."""
        votes = {k: reduce_votes(v, ctx.dp_only_group).cpu() for k, v in self.votes.items()}
        raw = {k: reduce_votes(v, ctx.dp_only_group).cpu() for k, v in self.raw.items()}
        for kind, r in raw.items():
            if torch.isnan(r).any():
                bad = sorted({self.indices[int(i)] for i in torch.nonzero(torch.isnan(r))[:, 0]})
                raise ValueError(f"APEX: the {kind} activation statistics of layers {bad} contain NaN since the "
                                 f"last boundary; refusing to select at step {step}")
        for kind in self.votes:
            self.votes[kind].zero_()
            self.raw[kind].zero_()
        vote_steps, self.vote_steps = self.vote_steps, 0
        return votes, raw, vote_steps

    def state(self) -> dict:
        return {"votes": {k: v.to("cpu", copy=True) for k, v in self.votes.items()},
                "raw": {k: v.to("cpu", copy=True) for k, v in self.raw.items()},
                "vote_steps": self.vote_steps}

    def load_state(self, state: dict) -> None:
        for kind in self.votes:
            self.votes[kind].copy_(state["votes"][kind])
            self.raw[kind].copy_(state["raw"][kind])
        self.vote_steps = state.get("vote_steps", 0)
