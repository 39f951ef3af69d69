"""APEX inside the parallel training loop: scoring hooks, stage boundaries, operator training, fuse.

The whole method plugs into the trainer as one :class:`ApexCallback`; the mathematics lives in the
pure modules beside this one (scoring, selection, partition, monarch, operator, partial).

Design (docs/method.md, "At scale"):

* **Operators live beside the model, not in it.** Each stage's operators (Monarch factors, alpha,
  beta; deltas in ``selected`` mode) are side modules held here, trained by their own small AdamW
  with the schedule's learning rate times ``apex.lr_scale``. megatron-core's DDP and optimizer
  therefore never see parameters appear or disappear; the operator's gradients are averaged over
  the data-parallel group with one all-reduce per step (skipped when DP = 1). Every model checkpoint
  is a plain LLaMA state dict; the operator state travels as one sharded object per rank.
* **Applied on the weights.** In mode ``all`` the W_eff rows of P and N are written into the weights
  once per step and the chain rule is applied to those rows of ``main_grad`` (expansion/inplace.py);
  otherwise the four linears of a layer get a forward override that builds ``W_eff = f(W, operator)``
  once per call. Either way the cost is independent of the number of tokens.
* **Shard-aware scoring.** Per-unit squared norms are recorded per micro-batch: FFN from the SiLU
  megatron-core's MLP computes (its activation function records; a forward hook on linear_fc1 that
  recomputes SiLU is the fallback), attention per query group of the core-attention output (a
  pre-hook on linear_proj). The re-run forward of activation recomputation is not recorded. At the end of a step the step's
  statistics of all local layers are gathered over the TP group in *one* all-gather, ranked (top-K
  +1, bottom-K -1) and added to local vote counts, identical on all TP ranks; the norms are summed
  (``apex.statistic`` 'rank' and 'norm') or averaged over steps ('ema') as the raw score, which 'norm'
  and 'ema' select by without voting. Votes and raw scores are summed over the data-parallel group
  once, at the stage boundary. With ``apex.score_interval`` = n only every n-th step of a stage
  (counted from its start, so on every rank alike) records and ranks.
* **Cross-rank expansion by permutation.** At a boundary the finished operator is fused into the
  master weights, P and N are selected per layer from the reduced votes, and one global
  function-preserving permutation per layer (partition.balance_permutation) gives every one of the
  ``apex.partitions`` blocks k/B P and k/B N units, packed at the start of the block
  (partition.pack_partitions, so the in-place operator reads strided blocks). It is applied to weights, fp32 master weights and
  Adam moments (state.ParamStates; one TP all-gather per tensor, at boundaries only). The operator is
  block-diagonal over those blocks, so it is rank-local and TP=1 computes exactly what TP=2 does.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.random import is_checkpointing

from megatron_apex.config import APEX_UNIT_NAMES, Config, ConfigError, apex_block_ranks, unit_share
from megatron_apex.expansion.inplace import InPlaceLayer, InPlaceRunner
from megatron_apex.expansion.operator import (AttentionExpansion, FFNExpansion, monarch_sq_norms, monarch_summary,
                                              state_shape_mismatches)
from megatron_apex.expansion.partial import PartialDeltas, local_units, tuned_units
from megatron_apex.expansion.partition import (balance_permutation, local_blocks, pack_partitions, permute_fc1,
                                               permute_units, round_k_to_partitions, shard_positions)
from megatron_apex.expansion.scoring import (accumulate_scores, step_scores, unit_sq_norms_attn, unit_sq_norms_ffn,
                                             unit_sq_norms_silu)
from megatron_apex.expansion.selection import progressive_k, select_units, select_units_partial
from megatron_apex.expansion.state import ParamStates, reduce_and_clip_grads, reduce_votes, tp_gather, tp_shard
from megatron_apex.training.optim import lr_at
from megatron_apex.training.trainer import Callback

logger = logging.getLogger(__name__)

STATE_KEY = "apex_state"


def _mid_stage(saved: dict) -> bool:
    """Whether a checkpoint's APEX state (``common["apex"]``) was saved with a boundary still to come."""
    return not saved["finished"] and saved["stage"] < len(saved["boundaries"])


class _Layer:
    """One local transformer layer: its linears, global index, and this stage's operators."""

    def __init__(self, layer, global_index: int):
        self.layer = layer
        self.index = global_index
        attn, mlp = layer.self_attention, layer.mlp
        self.linears = {"qkv": attn.linear_qkv, "proj": attn.linear_proj, "fc1": mlp.linear_fc1,
                        "fc2": mlp.linear_fc2}
        self.attn_op: Optional[AttentionExpansion] = None
        self.ffn_op: Optional[FFNExpansion] = None
        self.deltas: Optional[PartialDeltas] = None
        self.inplace: Optional[InPlaceLayer] = None
        self.selection: dict = {}  # global index sets of the current stage (for logs and checkpoints)

    def operators(self) -> list:
        return [m for m in (self.attn_op, self.ffn_op, self.deltas) if m is not None]

    def effective(self, kind: str, w: torch.Tensor) -> torch.Tensor:
        op = self.attn_op if kind in ("qkv", "proj") else self.ffn_op
        if self.deltas is not None:
            return getattr(self.deltas, f"effective_{kind}")(w, expansion=op)
        if op is None:
            return w
        return getattr(op, f"effective_{kind}")(w)


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


def _install_forward(linear, layer: _Layer, kind: str) -> None:
    """Run the unchanged megatron-core linear with W_eff in place of its weight."""
    cls_forward = type(linear).forward

    def forward(input_, *args, **kwargs):
        w = linear._parameters["weight"]
        w_eff = layer.effective(kind, w)
        if w_eff is w:
            return cls_forward(linear, input_, *args, **kwargs)
        linear._parameters["weight"] = w_eff  # bypasses Module.__setattr__'s Parameter check
        try:
            return cls_forward(linear, input_, *args, **kwargs)
        finally:
            linear._parameters["weight"] = w

    linear.forward = forward


class ApexCallback(Callback):
    """APEX for one run: see the module docstring."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.a = cfg.apex
        self.boundaries = cfg.apex_boundaries
        self.stage = 0            # number of boundaries applied
        self.finished = False     # operators fused for good
        self.recording = False
        self.layers: list = []
        self.op_optimizer = None
        self._pending_load = None
        self._resume_checked = False  # check_resume ran (before the tensors were loaded)
        self.stats_time = 0.0
        self.vote_steps = 0       # steps (and initial scoring passes) whose votes count at the next boundary
        self._ranked = None       # this step's votes, ranked in finalize_model_grads, added at on_step_end
        # Once per step on the changed rows (inplace.py), unless the base weights have no gradient
        # buffer (selected mode) or megatron-core reduces gradients during the backward pass.
        self.inplace = self.a.mode == "all" and not cfg.parallel.overlap_grad_reduce
        self._runner = InPlaceRunner(self.a.cuda_graphs) if self.inplace else None
        self.excluded = {}        # progressive mode: layer -> {"attn": tensor, "ffn": tensor} of former N units

    # ------------------------------------------------------------------ geometry
    def _geometry(self, ctx) -> None:
        m = self.cfg.model
        geometry = self.cfg.apex_geometry  # kind -> (n, k, B); the config checked that every block fits a rank
        self.n = {kind: n for kind, (n, _, _) in geometry.items()}
        self.vote_k = {kind: k for kind, (_, k, _) in geometry.items()}
        self.parts = {kind: b for kind, (_, _, b) in geometry.items()}
        for kind, (n, k, b) in geometry.items():
            if apex_block_ranks(n, b, k, ctx.tp_size) is None:  # a config built without validate()
                raise ConfigError(f"APEX: the {b} {kind} operator blocks of k={k} do not each fit on one of "
                                  f"parallel.tensor_model_parallel_size={ctx.tp_size} ranks")
        self.stage_layers = {kind: set() for kind in geometry}  # global layers expanding each kind this stage
        self.r = m.num_attention_heads // m.query_groups
        self.d = m.head_dim

    def _log_geometry(self) -> None:
        names = APEX_UNIT_NAMES
        geometry = self.cfg.apex_geometry
        layers = self.cfg.apex_layers
        logger.info("APEX per layer: %s", "; ".join(
            f"{names[kind]}: k={k} of {n} in {b} partitions" + (
                f" in {layers[kind]} of {self.cfg.model.num_layers} layers per stage (budget below one unit per "
                f"layer; layers drawn from train.seed and the stage)" if k and layers[kind] < self.cfg.model.num_layers
                else "") for kind, (n, k, b) in geometry.items()))
        if self.a.progressive:
            logger.info("APEX progressive: k per stage: %s", "; ".join(
                f"{names[kind]} {ks}" for kind, ks in self.cfg.apex_stage_ks.items()))
        if self.boundaries and self.boundaries[0] == 0 and self.a.init_scoring_samples == 0:
            logger.warning("APEX: the first stage starts at step 0 with apex.init_scoring_samples=0, so its P and "
                           "N units are chosen without scores (by unit index); set apex.init_scoring_samples > 0 "
                           "or start the first stage later")
        for kind, (n, k, _) in geometry.items():
            if k == 0:
                ratio = self.a.kind_ratio(kind)
                tuned = getattr(self.a, f"{kind}_tuned_ratio")
                unused = (f"; selected mode tunes only selected units, so apex.{kind}_tuned_ratio={tuned} has no "
                          f"effect: no {names[kind]} are tuned" if self.a.mode == "selected" and tuned > 0 else "")
                logger.warning("APEX: the %s ratio %s selects none of the %d %s (floor(%s x %d) = 0): they are not "
                               "expanded%s; apex.%s_ratio >= %.4g would select one", kind, ratio, n, names[kind], ratio,
                               n, unused, kind, 1 / n)

    def _k(self, kind: str, layer: Optional[int] = None) -> tuple[int, int]:
        """(k, k_per) of the current stage for a unit kind (a multiple of its partitions); (0, 0) in a
        ``layer`` (global index) that does not expand the kind this stage (small budgets)."""
        if layer is not None and layer not in self.stage_layers[kind]:
            return 0, 0
        k0 = progressive_k(self.vote_k[kind], max(self.stage - 1, 0), self.a.progressive, self.parts[kind])
        return round_k_to_partitions(k0, self.parts[kind])

    # ------------------------------------------------------------------ callback hooks
    def on_model_built(self, trainer, model) -> None:
        ctx = trainer.ctx
        self._geometry(ctx)
        if ctx.rank == 0:
            self._log_geometry()
        decoder = getattr(model, "decoder", None)
        for li, layer in enumerate(getattr(decoder, "layers", [])):
            entry = _Layer(layer, layer.layer_number - 1)
            if not self.inplace:
                for kind, linear in entry.linears.items():
                    _install_forward(linear, entry, kind)
            if not _record_silu(layer.mlp, self._silu_recorder(li)):
                entry.linears["fc1"].register_forward_hook(self._ffn_hook(li))
            entry.linears["proj"].register_forward_pre_hook(self._attn_hook(li))
            self.layers.append(entry)
        n_layers = len(self.layers)
        # Votes are counted where the statistics are (no device-to-host copy per step); the boundary
        # reduces them over DP there and moves them to the host for the selection.
        dev = ctx.device
        self.votes = {k: torch.zeros(n_layers, n, dtype=torch.int64, device=dev) for k, n in self.n.items()}
        self.raw = {k: torch.zeros(n_layers, n, dtype=torch.float64, device=dev) for k, n in self.n.items()}
        self._stats = [{"attn": [], "ffn": []} for _ in range(n_layers)]
        if self.a.mode == "selected":
            # Base weights frozen; embeddings and output layer stay trainable (norms frozen too).
            for name, p in model.named_parameters():
                if "embedding" not in name and "output_layer" not in name:
                    p.requires_grad_(False)

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

    def on_train_start(self, trainer) -> None:
        self.param_states = ParamStates(trainer.optimizer, trainer.ctx.dp_group)
        finalize = trainer.tconfig.finalize_model_grads_func

        def finalize_with_apex(*args, **kwargs):
            # Every micro-batch's statistics are in: rank them now, while the device still works on the
            # backward, rather than after the step's host synchronisation (committed at on_step_end).
            if self.recording:
                self._ranked = self._rank_step(trainer.ctx)
            self._restore_weights(with_grads=True)  # before megatron-core reduces main_grad
            return finalize(*args, **kwargs)

        if getattr(finalize, "apex_callback", None) is not self:  # once, even if training starts again
            finalize_with_apex.apex_callback = self
            trainer.tconfig.finalize_model_grads_func = finalize_with_apex
        if self._pending_load is not None:
            self._restore(trainer, self._pending_load)
            self._pending_load = None

    def on_step_start(self, trainer, step: int) -> None:
        if self.finished:
            return
        while self.stage < len(self.boundaries) and step >= self.boundaries[self.stage]:
            self._boundary(trainer, step)
        # Votes are needed for a later boundary; taken every apex.score_interval steps from the stage's start.
        since = step - (self.boundaries[self.stage - 1] if self.stage > 0 else 0)
        self.recording = self.stage < len(self.boundaries) and since % self.a.score_interval == 0
        if not self.inplace:  # the in-place path writes the operators' gradients itself (InPlaceRunner)
            for entry in self.layers:
                for op in entry.operators():
                    op.zero_grad(set_to_none=True)
        self._materialize()

    def on_evaluate(self, trainer, begin: bool) -> None:
        if begin:
            self._materialize()
        else:
            self._restore_weights(with_grads=False)

    def _inplace_layers(self) -> list:
        return [entry.inplace for entry in self.layers if entry.inplace is not None]

    def _materialize(self) -> None:
        if self._runner is not None:
            self._runner.materialize(self._inplace_layers())

    def _restore_weights(self, with_grads: bool) -> None:
        if self._runner is not None:
            self._runner.restore(self._inplace_layers(), with_grads)

    def on_optimizer_step(self, trainer, step: int, skipped: bool) -> None:
        # Decided alike on every rank: a rank (or pipeline stage) without operator blocks of its own still
        # takes part in the clipping norm's reduction, with nothing to add.
        if self.finished or skipped or self.stage == 0 or not self._operators_anywhere:
            return
        params = [p for p in self._op_params() if p.grad is not None]
        reduce_and_clip_grads([p.grad for p in params], trainer.ctx, self.cfg.optimizer.clip_grad)
        if self.op_optimizer is None or not params:
            return
        for group in self.op_optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, step) * group["lr_mult"]
        self.op_optimizer.step()

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self.recording:
            ranked, self._ranked = self._ranked, None
            if metrics.get("skipped"):  # a non-finite step (train.nan_policy='skip') casts no votes
                self._clear_stats()
            else:
                self._commit_votes(ranked if ranked is not None else self._rank_step(trainer.ctx))
            self.recording = False

    def on_train_end(self, trainer) -> None:
        if self.finished:
            return
        t0 = time.perf_counter()
        self._restore_weights(with_grads=False)
        self._fuse(trainer)
        for entry in self.layers:
            entry.attn_op = entry.ffn_op = entry.deltas = entry.inplace = None
        if self._runner is not None:
            self._runner.release()
        self.op_optimizer = None
        self.finished = True
        if trainer.ctx.rank == 0:
            logger.info("APEX: final fuse done in %.2fs; the model is a plain LLaMA again", time.perf_counter() - t0)

    # ------------------------------------------------------------------ scoring
    def _commit_votes(self, ranked) -> None:
        if ranked is not None:
            for kind, (votes, sums) in ranked.items():
                if votes is not None:  # apex.statistic 'rank'
                    self.votes[kind] += votes
                accumulate_scores(self.raw[kind], sums, self.a.statistic, self.a.ema_decay)
            self.vote_steps += 1

    def _rank_step(self, ctx):
        """The votes (None unless apex.statistic is 'rank') and norm sums of the step's recorded statistics,
        ``{kind: (votes, sums)}`` (None if nothing was recorded): one TP all-gather for all local layers,
        then scoring.step_scores on the statistics' device (no host synchronisation). The statistics are
        consumed."""
        t0 = time.perf_counter()
        if not self.layers or not self._stats[0]["ffn"]:
            return None
        n_layers, micro = len(self._stats), len(self._stats[0]["ffn"])
        if any(len(s[kind]) != micro for s in self._stats for kind in s):
            raise RuntimeError(f"APEX: uneven statistics in one step ({[{k: len(v) for k, v in s.items()} for s in self._stats]}"
                               f" per local layer); every layer must record each unit kind once per micro-batch")
        # [L*micro, n_a_loc + n_f_loc], layer-major: one stack per kind over every layer and micro-batch
        local = torch.cat([torch.stack([t for s in self._stats for t in s[kind]]) for kind in ("attn", "ffn")], dim=1)
        self._clear_stats()
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

    def _clear_stats(self) -> None:
        for s in self._stats:
            s["attn"].clear()
            s["ffn"].clear()

    def samples_read(self, trainer) -> int:
        """The initial scoring pass reads the first ``apex.init_scoring_samples`` (rounded up to whole global
        batches) of the training set, which may be more than the run trains on. Counted whether or not the
        pass is still to come, so that a resume builds the training set the same size."""
        gbs = self.cfg.train.global_batch_size
        return -(-self.a.init_scoring_samples // gbs) * gbs

    def _initial_scoring(self, trainer) -> None:
        """No-grad passes over the first ``apex.init_scoring_samples`` training samples."""
        from megatron_apex.data.datasets import build_loader

        gbs = self.cfg.train.global_batch_size
        steps = self.samples_read(trainer) // gbs
        if steps == 0:
            return
        ctx = trainer.ctx
        it = iter(build_loader(trainer.train_ds, self.cfg, 0, steps * gbs, ctx.dp_rank, ctx.dp_size))
        with torch.no_grad():
            for _ in range(steps):
                self.recording = True
                trainer._run_microbatches(it, forward_only=True)
                self._commit_votes(self._rank_step(ctx))
        self.recording = False

    # ------------------------------------------------------------------ stage boundary
    def _boundary(self, trainer, step: int) -> None:
        t0 = time.perf_counter()
        ctx = trainer.ctx
        if self.stage == 0 and self.a.init_scoring_samples > 0:
            self._initial_scoring(trainer)
        votes = {k: reduce_votes(v, ctx.dp_only_group).cpu() for k, v in self.votes.items()}
        raw = {k: reduce_votes(v, ctx.dp_only_group).cpu() for k, v in self.raw.items()}
        for kind, r in raw.items():  # before anything changes (skipped non-finite steps cast no votes)
            if torch.isnan(r).any():
                bad = sorted({self.layers[int(i)].index for i in torch.nonzero(torch.isnan(r))[:, 0]})
                raise ValueError(f"APEX: the {kind} activation statistics of layers {bad} contain NaN since the "
                                 f"last boundary; refusing to select at step {step}")
        op_norm = self._operator_norm(ctx)
        if self._runner is not None:
            self._runner.release()  # the stage's CUDA graphs and their buffers
        self._fuse(trainer)
        self.stage += 1
        self._set_stage_layers()
        summary = []
        for li, entry in enumerate(self.layers):
            perms = {}
            for kind in ("attn", "ffn"):
                perms[kind] = self._select(entry, li, kind, votes[kind][li], raw[kind][li])
            self._permute(trainer, entry, perms)
            self._build_operators(ctx, entry)
            summary.append(self._summarize(entry))
        self._build_op_optimizer(trainer)
        for kind in self.votes:
            self.votes[kind].zero_()
            self.raw[kind].zero_()
        vote_steps, self.vote_steps = self.vote_steps, 0
        # A collective over the model-parallel group: every rank counts, rank 0 of each replica logs.
        counts = self.trainable_counts(trainer) if self.a.mode == "selected" else None
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:  # one line per pipeline stage
            logger.info("APEX stage %d/%d starts at step %d (boundary %.2fs; previous stage: operator |M| %.4g, "
                        "%s scores of %d steps, scoring %.2fs; new Monarch nb x bs: %s): %s", self.stage,
                        len(self.boundaries), step, time.perf_counter() - t0, op_norm, self.a.statistic,
                        vote_steps, self.stats_time,
                        monarch_summary(self.layers[0].attn_op, self.layers[0].ffn_op) if self.layers else "-",
                        "; ".join(summary))
            if counts is not None and ctx.pp_rank == 0:
                trained, total = counts
                logger.info("APEX selected mode: %.1fM parameters trained (deltas on the tuned units, operators, "
                            "embeddings and output layer) = %.1f%% of the model's %.1fM", trained / 1e6,
                            100 * trained / total, total / 1e6)
        self.stats_time = 0.0

    def _set_stage_layers(self) -> None:
        """The layers that expand each unit kind in the current stage (every layer, unless the kind's
        budget is below one unit per layer: then a draw from train.seed and the stage); none before the
        first boundary."""
        self.stage_layers = ({kind: set(layers) for kind, layers in self.cfg.apex_stage_layers(self.stage - 1).items()}
                             if self.stage > 0 else {kind: set() for kind in APEX_UNIT_NAMES})

    def _select(self, entry: _Layer, li: int, kind: str, votes: torch.Tensor, raw: torch.Tensor):
        """Select P, N (and E) of one layer and unit kind; returns the global permutation (or None)."""
        n = self.n[kind]
        k, k_per = self._k(kind, entry.index)
        if k_per == 0:
            entry.selection[kind] = None
            return None
        exclude = self.excluded.get((entry.index, kind)) if self.a.progressive else None
        mask = None
        if exclude is not None:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[exclude] = True
        if self.a.mode == "selected":
            ratio = self.a.attn_tuned_ratio if kind == "attn" else self.a.ffn_tuned_ratio
            e = max(0, unit_share(ratio, n) - 2 * k)
            p_units, n_units, e_units = select_units_partial(votes, raw.float(), k, e, exclude=mask)
        else:
            p_units, n_units = select_units(votes, raw.float(), k, exclude=mask)
            e_units = torch.empty(0, dtype=torch.int64)
        perm, p_pos, n_pos = pack_partitions(*balance_permutation(p_units, n_units, n, self.parts[kind]))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n)
        if self.a.progressive:
            # Votes of the next stage are indexed by the units' positions *after* this permutation, so
            # the excluded set (former N units, including those of earlier stages) moves with it.
            prev = self.excluded.get((entry.index, kind))
            former = n_units if prev is None else torch.cat([prev, n_units])
            self.excluded[(entry.index, kind)] = torch.sort(inv[former]).values
        entry.selection[kind] = {"P": p_units, "N": n_units, "E": inv[e_units] if e_units.numel() else e_units,
                                 "p_pos": p_pos, "n_pos": n_pos}
        return None if torch.equal(perm, torch.arange(n)) else perm

    def _permute(self, trainer, entry: _Layer, perms: dict) -> None:
        """Apply the layer's unit permutations to weights, master weights and Adam moments."""
        ctx = trainer.ctx
        r, d = self.r, self.d
        plan = []
        if perms.get("attn") is not None:
            plan += [("qkv", 0, (r + 2) * d, perms["attn"], False), ("proj", 1, r * d, perms["attn"], False)]
        if perms.get("ffn") is not None:
            plan += [("fc1", 0, 1, perms["ffn"], True), ("fc2", 1, 1, perms["ffn"], False)]
        for kind, dim, unit, perm, swiglu in plan:
            param = entry.linears[kind].weight
            tensors = self.param_states.gather(param)
            for key, t in tensors.items():
                full = tp_gather(t, dim, ctx.tp_group, ctx.tp_size, swiglu)
                full = permute_fc1(full, perm) if swiglu else permute_units(full, perm, unit, dim)
                tensors[key] = tp_shard(full, dim, ctx.tp_rank, ctx.tp_size, swiglu).contiguous()
            self.param_states.scatter(param, tensors)

    def _build_operators(self, ctx, entry: _Layer) -> None:
        """Fresh zero-initialised operators (and deltas) for the layer's new selection."""
        dev = entry.linears["qkv"].weight.device
        entry.attn_op = entry.ffn_op = entry.deltas = entry.inplace = None
        for kind_id, kind in enumerate(("attn", "ffn")):
            sel = entry.selection.get(kind)
            if sel is None:
                continue
            # One generator per operator: a rank without a block of it (fewer blocks than TP ranks) draws
            # nothing, and the other operator's draw stays the same.
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + self.stage * 104729 + 2 * entry.index
                                                + kind_id)
            first, b_local = local_blocks(sel["p_pos"], ctx.tp_rank, ctx.tp_size, self.n[kind])
            k_per = sel["p_pos"].shape[1]
            if kind == "attn":
                op = AttentionExpansion(b_local, k_per, self.d, self.r, device=dev,
                                        monarch_blocks=self.a.monarch_blocks)
            else:
                op = FFNExpansion(b_local, k_per, device=dev, monarch_blocks=self.a.monarch_blocks)
            op.reset_parameters(gen, first, sel["p_pos"].shape[0])
            p_loc, n_loc = shard_positions(sel["p_pos"], sel["n_pos"], ctx.tp_rank, ctx.tp_size, self.n[kind])
            op.set_positions(p_loc.to(dev), n_loc.to(dev))
            setattr(entry, f"{kind}_op", op)
        if self.a.mode == "selected":
            units = {}
            for kind in ("attn", "ffn"):
                sel = entry.selection.get(kind)
                if sel is None:
                    units[kind] = torch.empty(0, dtype=torch.int64)
                    continue
                allu = tuned_units(sel["p_pos"].reshape(-1), sel["n_pos"].reshape(-1), sel["E"])
                units[kind] = local_units(allu, ctx.tp_rank, ctx.tp_size, self.n[kind])
            entry.deltas = PartialDeltas(units["attn"].to(dev), units["ffn"].to(dev), self.cfg.model.hidden_size,
                                         self.d, self.r, device=dev)
        entry.inplace = InPlaceLayer(entry.linears, entry.attn_op, entry.ffn_op, self.d, self.r) \
            if self.inplace else None

    def _op_params(self) -> list:
        return [p for entry in self.layers for op in entry.operators() for p in op.parameters()]

    @property
    def _operators_anywhere(self) -> bool:
        """Whether the current stage expands some unit anywhere in the model (the same on every rank)."""
        return any(layers and self._k(kind)[1] for kind, layers in self.stage_layers.items())

    def _build_op_optimizer(self, trainer) -> None:
        """The operators' own AdamW (fresh state at every stage, as the method prescribes)."""
        o = self.cfg.optimizer
        ops, deltas = [], []
        for entry in self.layers:
            for op in (entry.attn_op, entry.ffn_op):
                if op is not None:
                    ops += list(op.parameters())
            if entry.deltas is not None:
                deltas += list(entry.deltas.parameters())
        groups = [{"params": ops, "lr_mult": self.a.lr_scale, "weight_decay": self.a.operator_weight_decay}]
        if deltas:
            groups.append({"params": deltas, "lr_mult": 1.0, "weight_decay": o.weight_decay})
        groups = [g for g in groups if g["params"]]
        cuda = bool(groups) and groups[0]["params"][0].is_cuda
        self.op_optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                              fused=cuda or None) if groups else None

    def _operator_norm(self, ctx=None) -> float:
        """Mean over this pipeline stage's operators of the Frobenius norm of their whole dense M (0 right
        after insertion). Under TP each rank holds some of an operator's partitions: with ``ctx`` the
        squared norms are summed over the TP group (a collective), so every layout logs the same value."""
        sq = monarch_sq_norms([op for e in self.layers for op in (e.attn_op, e.ffn_op) if op is not None])
        if sq.numel() == 0:
            return 0.0
        if ctx is not None and ctx.tp_size > 1:
            sq = sq.to(ctx.device)
            dist.all_reduce(sq, group=ctx.tp_group)
        return sq.sqrt().mean().item()

    def trainable_counts(self, trainer) -> tuple[int, int]:
        """(parameters trained, parameters of the plain model), over the whole model.

        Trained: the model's parameters that require gradients (selected mode: embeddings and output
        layer), the deltas of the tuned units and the operators. The plain model's count is the
        denominator of the share the method reports, so a share above 100 % is possible where nearly
        every unit is tuned (the operators come on top). Tensor-parallel shards are summed over the
        model-parallel group, replicated parameters (the norms) counted once, and the last pipeline
        stage's copy of tied embeddings not at all. A collective over that group: every rank of it must
        call this.
        """
        from megatron.core.transformer.module import param_is_not_shared

        ctx = trainer.ctx

        def counted(p) -> int:  # replicated parameters on tensor-parallel rank 0 only; shared copies never
            if not param_is_not_shared(p):
                return 0
            return p.numel() if ctx.tp_rank == 0 or getattr(p, "tensor_model_parallel", False) else 0

        model_params = list(trainer.model.parameters())
        counts = torch.tensor([
            sum(counted(p) for p in model_params if p.requires_grad) + sum(p.numel() for p in self._op_params()),
            sum(counted(p) for p in model_params)], dtype=torch.float64, device=ctx.device)
        if ctx.tp_size * ctx.pp_size > 1:
            dist.all_reduce(counts, group=ctx.mp_group)
        return int(counts[0].item()), int(counts[1].item())

    def trainable_fraction(self, trainer) -> float:
        """Share of the plain model's parameter count being trained (:meth:`trainable_counts`)."""
        trained, total = self.trainable_counts(trainer)
        return trained / total

    def _fuse(self, trainer) -> None:
        """Fold the current operators (and deltas) into the master weights."""
        for entry in self.layers:
            if not entry.operators():
                continue
            for kind, linear in entry.linears.items():
                tensors = self.param_states.gather(linear.weight)
                with torch.no_grad():
                    fused = entry.effective(kind, tensors["param"]).detach()
                self.param_states.scatter(linear.weight, {"param": fused})

    def _summarize(self, entry: _Layer) -> str:
        parts = []
        for kind in ("attn", "ffn"):
            sel = entry.selection.get(kind)
            if sel is None:
                parts.append(f"{kind} -")
                continue
            p = sel["P"].tolist()
            shown = ",".join(map(str, p[:4])) + ("..." if len(p) > 4 else "")
            parts.append(f"{kind} k={len(p)} P=[{shown}]")
        return f"L{entry.index}: " + " ".join(parts)

    # ------------------------------------------------------------------ checkpoints
    def common_state(self, trainer) -> dict:
        return {"apex": {"version": 1, "stage": self.stage, "finished": self.finished,
                         "boundaries": list(self.boundaries), "statistic": self.a.statistic,
                         "ema_decay": self.a.ema_decay, "mode": self.a.mode, "ratio": self.a.ratio,
                         "attn_ratio": self.a.attn_ratio, "ffn_ratio": self.a.ffn_ratio,
                         "partitions": self.a.partitions, "progressive": self.a.progressive,
                         "geometry": {kind: list(g) for kind, g in self.cfg.apex_geometry.items()}}}

    def _rank_state(self) -> dict:
        return {
            "votes": {k: v.to("cpu", copy=True) for k, v in self.votes.items()},
            "raw": {k: v.to("cpu", copy=True) for k, v in self.raw.items()},
            "vote_steps": self.vote_steps,
            "monarch_blocks": self.a.monarch_blocks,
            "excluded": {f"{li}:{kind}": v for (li, kind), v in self.excluded.items()},
            "layers": [{"index": e.index, "selection": e.selection,
                        "ops": {name: getattr(e, name).state_dict() for name in ("attn_op", "ffn_op", "deltas")
                                if getattr(e, name) is not None}} for e in self.layers],
            "op_optimizer": self.op_optimizer.state_dict() if self.op_optimizer is not None else None,
        }

    @staticmethod
    def _same_layout(trainer, common: dict) -> bool:
        """Whether ``common`` was saved under the current layout; refuses mid-stage APEX state otherwise.

        Called before the sharded state is loaded (the per-rank object exists only for the saved
        layout), so the user gets this message rather than a missing-key error from the loader.
        """
        layout = {"tp": trainer.ctx.tp_size, "pp": trainer.ctx.pp_size, "dp": trainer.ctx.dp_size,
                  "cp": trainer.ctx.cp_size}
        if common.get("layout") == layout:
            return True
        if not common["apex"]["finished"]:
            raise ConfigError(f"resuming in the middle of an APEX stage needs the layout it was saved with "
                              f"({common.get('layout')}), not {layout}; resume with that layout, or from a "
                              "checkpoint saved at or after the final fuse")
        return False

    def sharded_state(self, trainer, common: Optional[dict] = None) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        if common is not None and ("apex" not in common or not self._same_layout(trainer, common)):
            return {}  # nothing saved, or a finished run resumed under another layout (nothing needed)
        ctx = trainer.ctx
        return {STATE_KEY: ShardedObject(STATE_KEY, self._rank_state(), (ctx.pp_size, ctx.tp_size, ctx.dp_size),
                                         (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=ctx.cp_rank)}

    def check_resume(self, trainer, common: dict) -> None:
        """Refuses APEX state that this run's settings cannot continue (another mode, ratio, ... before
        the final fuse; another layout or statistic mid-stage), before the optimizer state is loaded:
        another apex.mode, say, trains other parameters, which the loader would report as a mismatch
        of parameter groups."""
        saved = common.get("apex")
        if saved is None:
            return
        self._same_layout(trainer, common)  # raises mid-stage under another layout
        if saved["finished"] and trainer.ctx.rank == 0 and common.get("step", 0) < self.cfg.train.train_steps:
            logger.warning("APEX: this checkpoint (step %d) holds a finished APEX run, its operators fused into "
                           "the weights; training on from it is plain training and apex.* has no effect here. "
                           "To expand again, start a new run from it with checkpoint.finetune_from",
                           common.get("step", 0))
        if not saved["finished"]:
            self._check_run_continues(saved, common.get("step", 0))
        if _mid_stage(saved):
            self._check_scores_continue(saved)
        self._resume_checked = True

    def load_state(self, trainer, common: dict) -> None:
        saved = common.get("apex")
        if saved is None:
            if common.get("step", 0) > (self.boundaries[0] if self.boundaries else 0):
                logger.warning("resuming from a checkpoint without APEX state: APEX starts at the next boundary")
                self.stage = sum(1 for b in self.boundaries if b < common["step"])
                self._set_stage_layers()
            return
        if not self._resume_checked:
            self.check_resume(trainer, common)
        self._resume_checked = False
        self.stage, self.finished = saved["stage"], saved["finished"]
        self._set_stage_layers()
        self._pending_load = common.get(STATE_KEY)

    def _check_run_continues(self, saved: dict, step: int) -> None:
        """A checkpoint saved before the final fuse continues under the same selections and operators:
        refuses another mode, ratio (of either kind), partitions or progressive flag, and a schedule that
        moves a boundary already applied; warns where only boundaries still to come moved."""
        where = (f"this checkpoint (step {step}) was saved during an APEX run, at stage {saved['stage']} of "
                 f"{len(saved['boundaries'])} and before the final fuse")
        after = "or resume from a checkpoint saved after the final fuse"
        for key in ("mode", "ratio", "attn_ratio", "ffn_ratio", "partitions", "progressive"):
            old, new = saved.get(key, getattr(self.a, key)), getattr(self.a, key)  # absent: saved before checked
            if old != new:
                raise ConfigError(f"apex.{key}={new!r}: {where} with apex.{key}={old!r}, on which its selections and "
                                  f"operators depend; resume with apex.{key}={old!r}, {after}")
        geometry = {kind: list(g) for kind, g in self.cfg.apex_geometry.items()}
        if saved.get("geometry", geometry) != geometry:
            raise ConfigError(f"{where} with (units, k, partitions) per kind {saved['geometry']}, but this version "
                              f"computes {geometry} from the same settings; {after}")
        old_b, new_b, stage = list(saved["boundaries"]), list(self.boundaries), saved["stage"]
        if new_b[:stage] != old_b[:stage] or (len(new_b) > stage and new_b[stage] < step):
            raise ConfigError(f"apex.boundaries={new_b} (from apex.boundaries/apex.stages and train.train_steps): "
                              f"{where} with the boundaries {old_b}; the {stage} already applied must stay and the "
                              f"next cannot come before step {step}: pass apex.boundaries={old_b}, {after}")
        if new_b != old_b:
            logger.warning("APEX: the stage boundaries still to come change from %s to %s", old_b[stage:],
                           new_b[stage:])

    def _check_scores_continue(self, saved: dict) -> None:
        """A mid-stage checkpoint's accumulated scores continue under this run's statistic: refuses
        another statistic, warns where the scores were accumulated differently from how they go on."""
        stat = saved.get("statistic", "rank")  # saved before apex.statistic existed: votes
        if stat != self.a.statistic:
            raise ConfigError(f"apex.statistic={self.a.statistic!r}: this checkpoint was saved in the middle of "
                              f"an APEX stage with apex.statistic={stat!r}, whose accumulated scores mean something "
                              f"else; resume with apex.statistic={stat!r}, or from a checkpoint after the last "
                              "boundary")
        if "statistic" not in saved:
            logger.warning("APEX: this mid-stage checkpoint predates apex.statistic: its tie-break sums are of "
                           "squared norms and now continue with norms (this only affects units with equal votes)")
        decay = saved.get("ema_decay")
        if stat == "ema" and decay is not None and decay != self.a.ema_decay:
            logger.warning(f"APEX: apex.ema_decay={self.a.ema_decay}, but this mid-stage checkpoint's moving "
                           f"averages were taken with {decay}: they continue with the new decay, so the run does "
                           "not continue exactly as an uninterrupted one would")

    def _restore(self, trainer, state: dict) -> None:
        ctx = trainer.ctx
        for kind in self.votes:
            self.votes[kind].copy_(state["votes"][kind])
            self.raw[kind].copy_(state["raw"][kind])
        self.vote_steps = state.get("vote_steps", 0)
        self.excluded = {(int(k.split(":")[0]), k.split(":")[1]): v for k, v in state["excluded"].items()}
        for entry, saved in zip(self.layers, state["layers"]):
            entry.selection = saved["selection"]
            if self.finished:
                continue
            self._build_operators(ctx, entry)
            for name, sd in saved["ops"].items():
                bad = state_shape_mismatches(getattr(entry, name), sd)
                if bad:
                    raise ConfigError(f"apex.monarch_blocks={self.a.monarch_blocks}: the operators of this mid-stage "
                                      f"checkpoint (saved with apex.monarch_blocks={state.get('monarch_blocks', 0)}) "
                                      f"have other shapes (layer {entry.index} {name}: {'; '.join(bad)}); resume "
                                      "with the APEX settings it was saved with (apex.monarch_blocks, apex.ratio, "
                                      "apex.partitions)")
                getattr(entry, name).load_state_dict(sd)
        if not self.finished:
            self._build_op_optimizer(trainer)
            if state["op_optimizer"] is not None and self.op_optimizer is not None:
                self.op_optimizer.load_state_dict(state["op_optimizer"])
