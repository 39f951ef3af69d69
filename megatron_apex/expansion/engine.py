"""APEX inside the parallel training loop: one trainer callback that dispatches to the method's pieces.

* votes.py (:class:`VoteRecorder`): the scoring hooks and the votes they cast;
* boundary.py (:class:`StageBoundary`): select, permute, build the operators and their optimizer, fuse;
* resume.py (:class:`ApexResume`): what checkpoints store, which ones a run can continue, the restore;
* geometry.py: how many units, in which layers and blocks, when the stages start.

Design (docs/method.md, "At scale"):

* **Operators live beside the model, not in it.** Each stage's operators (Monarch factors, alpha,
  beta; deltas in ``selected`` mode) are side modules, trained by their own small AdamW with the
  schedule's learning rate times ``apex.lr_scale``. megatron-core's DDP and optimizer therefore never
  see parameters appear or disappear; the operator's gradients are averaged over the data-parallel
  group with one all-reduce per step (skipped when DP = 1). Every model checkpoint is a plain LLaMA
  state dict; the operator state travels as one sharded object per rank.
* **Applied on the weights.** In mode ``all`` the W_eff rows of P and N are written into the weights
  once per step and the chain rule is applied to those rows of ``main_grad`` before megatron-core
  reduces it (expansion/inplace.py); otherwise the four linears of a layer get a forward override
  that builds ``W_eff = f(W, operator)`` once per call. Either way the cost is independent of the
  number of tokens.
* **Scoring** is shard-aware and costs one TP all-gather per step (votes.py); with
  ``apex.score_interval`` = n only every n-th step of a stage (counted from its start, so on every
  rank alike) records and ranks.
"""

from __future__ import annotations

import logging
import time

import torch

from megatron_apex.config import Config
from megatron_apex.expansion import geometry as geo
from megatron_apex.expansion.boundary import Layer, StageBoundary
from megatron_apex.expansion.geometry import UNIT_NAMES
from megatron_apex.expansion.inplace import GradReadyGate, InPlaceRunner, linear_bias
from megatron_apex.expansion.operator import monarch_summary
from megatron_apex.expansion.resume import ApexResume, refuse_unfused_start
from megatron_apex.expansion.state import ParamStates
from megatron_apex.expansion.votes import VoteRecorder
from megatron_apex.training.trainer import Callback

logger = logging.getLogger(__name__)


def _install_forward(linear, layer: Layer, kind: str) -> None:
    """Run the unchanged megatron-core linear with W_eff in place of its weight (and the QKV bias's b_eff in
    place of its bias)."""
    cls_forward = type(linear).forward
    names = {"weight": kind, **({"bias": "qkv_bias"} if kind == "qkv" and linear_bias(linear) is not None else {})}

    def forward(input_, *args, **kwargs):
        originals = {name: linear._parameters[name] for name in names}
        effective = {name: layer.effective(k, originals[name]) for name, k in names.items()}
        if all(effective[name] is originals[name] for name in names):
            return cls_forward(linear, input_, *args, **kwargs)
        linear._parameters.update(effective)  # bypasses Module.__setattr__'s Parameter check
        try:
            return cls_forward(linear, input_, *args, **kwargs)
        finally:
            linear._parameters.update(originals)

    linear.forward = forward


class ApexCallback(Callback):
    """APEX for one run: see the module docstring."""

    Boundary = StageBoundary  # the stage boundary's class (tests record through a subclass)

    def __init__(self, cfg: Config):
        self.cfg, self.a = cfg, cfg.apex
        self.geometry = geo.check(cfg)  # also for a config built without the entry points' checks
        self.layers: list = []
        # Once per step on the changed rows (inplace.py), unless the base weights have no gradient
        # buffer (selected mode); with overlapped gradient reduction through a GradReadyGate.
        self.inplace = self.a.mode == "all"
        self._runner = InPlaceRunner(self.a.cuda_graphs) if self.inplace else None
        self._gate = None
        self.recorder = VoteRecorder(cfg, self.geometry.units)
        self.boundary = self.Boundary(cfg, self.geometry, self.layers, self.inplace)
        self.resume = ApexResume(cfg, self)

    # ------------------------------------------------------------------ set-up
    def on_model_built(self, trainer, model) -> None:
        ctx = trainer.ctx  # its layout is the config's, which geometry.check accepted in __init__
        if ctx.rank == 0:
            self._log_geometry()
        decoder = getattr(model, "decoder", None)
        # Per call: every linear off the in-place path, and those of a unit kind whose operator spans the
        # tensor-parallel ranks (expansion/spanning.py) on it.
        per_call = [kind for kind in ("qkv", "proj", "fc1", "fc2")
                    if not self.inplace or self.geometry.spanning["attn" if kind in ("qkv", "proj") else "ffn"]]
        for layer in getattr(decoder, "layers", []):
            entry = Layer(layer, layer.layer_number - 1)
            for kind in per_call:
                _install_forward(entry.linears[kind], entry, kind)
            self.recorder.attach(layer, entry.index)
            self.layers.append(entry)
        self.recorder.allocate(ctx.device)
        if self.a.mode == "selected":
            # Base weights frozen; embeddings and output layer stay trainable (norms frozen too).
            for name, p in model.named_parameters():
                if "embedding" not in name and "output_layer" not in name:
                    p.requires_grad_(False)

    def _log_geometry(self) -> None:
        g, n_layers = self.geometry, self.cfg.model.num_layers
        logger.info("APEX per layer: %s", "; ".join(
            f"{UNIT_NAMES[kind]}: k={k} of {n} in {b} partitions" + (
                f" in {g.layers[kind]} of {n_layers} layers per stage (budget below one unit per layer; layers "
                f"drawn from train.seed and the stage)" if k and g.layers[kind] < n_layers else "")
            for kind, (n, k, b) in g.units.items()))
        for line in geo.path_notes(self.cfg, g):
            logger.info("APEX: %s", line)
        if self.a.progressive:
            logger.info("APEX progressive: k per stage: %s", "; ".join(
                f"{UNIT_NAMES[kind]} {ks}" for kind, ks in g.stage_ks.items()))
        if g.boundaries and g.boundaries[0] == 0 and self.a.init_scoring_samples == 0:
            logger.warning("APEX: the first stage starts at step 0 with apex.init_scoring_samples=0, so its P and "
                           "N units are chosen without scores (by unit index); set apex.init_scoring_samples > 0 "
                           "or start the first stage later")
        for kind, (n, k, _) in g.units.items():
            if k == 0:
                ratio = self.a.kind_ratio(kind)
                tuned = getattr(self.a, f"{kind}_tuned_ratio")
                unused = (f"; selected mode tunes only selected units, so apex.{kind}_tuned_ratio={tuned} has no "
                          f"effect: no {UNIT_NAMES[kind]} are tuned" if self.a.mode == "selected" and tuned > 0 else "")
                logger.warning("APEX: the %s ratio %s selects none of the %d %s (floor(%s x %d) = 0): they are not "
                               "expanded%s; apex.%s_ratio >= %.4g would select one", kind, ratio, n, UNIT_NAMES[kind],
                               ratio, n, unused, kind, 1 / n)

    def on_train_start(self, trainer) -> None:
        if self._runner is not None and self.cfg.parallel.overlap_grad_reduce:
            self._gate = GradReadyGate(self._runner, list(getattr(trainer.model, "bucket_groups", [])))
        self.boundary.param_states = ParamStates(trainer.optimizer, trainer.ctx.dp_group)
        self.resume.restore(trainer)

    # ------------------------------------------------------------------ every step
    def on_step_start(self, trainer, step: int) -> None:
        b = self.boundary
        if b.finished:
            return
        boundaries = self.geometry.boundaries
        while b.stage < len(boundaries) and step >= boundaries[b.stage]:
            self._boundary(trainer, step)
        # Votes are needed for a later boundary; taken every apex.score_interval steps from the stage's start.
        since = step - (boundaries[b.stage - 1] if b.stage > 0 else 0)
        self.recorder.recording = b.stage < len(boundaries) and since % self.a.score_interval == 0
        for entry in self.layers:  # the in-place path writes its operators' gradients itself (InPlaceRunner)
            for op in entry.operators():
                if not self.inplace or getattr(op, "span", None) is not None:
                    op.zero_grad(set_to_none=True)
        self._materialize()
        if self._gate is not None:
            self._gate.arm()

    def before_grad_reduction(self, trainer) -> None:
        self.recorder.rank_before_reduction(trainer.ctx)
        self._restore_weights(with_grads=True)  # the chain rule, before megatron-core reduces main_grad

    def on_optimizer_step(self, trainer, step: int, skipped: bool) -> None:
        if not skipped:
            self.boundary.optimizer_step(trainer, step)

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        self.recorder.end_step(trainer.ctx, bool(metrics.get("skipped")))

    def on_evaluate(self, trainer, begin: bool) -> None:
        if self._gate is not None:
            self._gate.disarm()  # forward only: nothing to hold
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

    # ------------------------------------------------------------------ stages
    def _boundary(self, trainer, step: int) -> None:
        t0 = time.perf_counter()
        ctx, b, rec = trainer.ctx, self.boundary, self.recorder
        if b.stage == 0 and self.a.init_scoring_samples > 0:
            rec.initial_scoring(trainer)
        votes, raw, vote_steps = rec.take(ctx, step)  # before anything changes
        op_norm = b.operator_norm(ctx)
        if self._runner is not None:
            self._runner.release()  # the stage's CUDA graphs and their buffers
        summary = b.advance(trainer, votes, raw)
        # A collective over the model-parallel group: every rank counts, rank 0 of each replica logs.
        counts = self.trainable_counts(trainer) if self.a.mode == "selected" else None
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:  # one line per pipeline stage
            logger.info("APEX stage %d/%d starts at step %d (boundary %.2fs; previous stage: operator |M| %.4g, "
                        "%s scores of %d steps, scoring %.2fs; new Monarch nb x bs: %s): %s", b.stage,
                        len(self.geometry.boundaries), step, time.perf_counter() - t0, op_norm, self.a.statistic,
                        vote_steps, rec.stats_time,
                        monarch_summary(self.layers[0].attn_op, self.layers[0].ffn_op) if self.layers else "-",
                        "; ".join(summary))
            if counts is not None and ctx.pp_rank == 0:
                trained, total = counts
                logger.info("APEX selected mode: %.1fM parameters trained (deltas on the tuned units, operators, "
                            "embeddings and output layer) = %.1f%% of the model's %.1fM", trained / 1e6,
                            100 * trained / total, total / 1e6)
        rec.stats_time = 0.0

    def on_train_end(self, trainer) -> None:
        if self.boundary.finished:
            return
        t0 = time.perf_counter()
        self._restore_weights(with_grads=False)
        self.boundary.finish()
        if self._runner is not None:
            self._runner.release()
        if trainer.ctx.rank == 0:
            logger.info("APEX: final fuse done in %.2fs; the model is a plain LLaMA again", time.perf_counter() - t0)

    def samples_read(self, trainer) -> int:
        """Counted whether or not the initial scoring pass is still to come, so that a resume builds the
        training set the same size."""
        return self.recorder.samples_read()

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
        import torch.distributed as dist
        from megatron.core.transformer.module import param_is_not_shared

        ctx = trainer.ctx

        def counted(p) -> int:  # replicated parameters on tensor-parallel rank 0 only; shared copies never
            if not param_is_not_shared(p):
                return 0
            return p.numel() if ctx.tp_rank == 0 or getattr(p, "tensor_model_parallel", False) else 0

        model_params = list(trainer.model.parameters())
        spanning = {id(p) for p in self.boundary.spanning_params()}  # replicated over TP: counted on its rank 0
        operators = sum(p.numel() for p in self.boundary.op_params() if ctx.tp_rank == 0 or id(p) not in spanning)
        counts = torch.tensor([sum(counted(p) for p in model_params if p.requires_grad) + operators,
                               sum(counted(p) for p in model_params)], dtype=torch.float64, device=ctx.device)
        if ctx.tp_size * ctx.pp_size > 1:
            dist.all_reduce(counts, group=ctx.mp_group)
        return int(counts[0].item()), int(counts[1].item())

    def trainable_fraction(self, trainer) -> float:
        """Share of the plain model's parameter count being trained (:meth:`trainable_counts`)."""
        trained, total = self.trainable_counts(trainer)
        return trained / total

    # ------------------------------------------------------------------ checkpoints (resume.py)
    def common_state(self, trainer) -> dict:
        return self.resume.common_state()

    def sharded_state(self, trainer, common=None) -> dict:
        return self.resume.sharded_state(trainer, common)

    def check_resume(self, trainer, common: dict) -> None:
        self.resume.check(trainer, common)

    def check_start(self, trainer, common: dict, path: str) -> None:
        refuse_unfused_start(common, path, self.cfg.checkpoint.finetune_from)

    def load_state(self, trainer, common: dict) -> None:
        self.resume.load(trainer, common)
