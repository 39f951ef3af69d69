"""The training loop: megatron-core's forward_backward_func (so every PP schedule works), megatron
DDP and optimizer, periodic validation, logging, checkpoints, resume and clean early exits.

Features plug in as :class:`Callback` objects (APEX, graceful exit, ...) rather than as branches in
the loop. One small all-reduce per step carries the loss, a non-finite flag and a stop request, so
that every rank takes the same decision at the same step.
"""

from __future__ import annotations

import atexit
import logging
import math
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_apex.compat.host_memory import keep_freed_memory
from megatron_apex.compat.process import forked_children_die_with_parent
from megatron_apex.config import Config
from megatron_apex.data.datasets import build_datasets, build_loader, check_datasets, resolve_vocab
from megatron_apex.distributed import ParallelContext
from megatron_apex.model.init import initialize_weights
from megatron_apex.model.llama import build_model, build_transformer_config, flops_per_token
from megatron_apex.training import checkpoint as ckpt
from megatron_apex.training.lock import LockHeldError, RunLock
from megatron_apex.training.metrics import MetricsWriter, Throughput, gpu_peak_tflops
from megatron_apex.training.optim import apply_lr, build_optimizer, wrap_ddp

logger = logging.getLogger(__name__)

EXIT_INCOMPLETE = 75  # a clean early stop (signal or time limit) after saving: resubmit to continue
EXIT_ERROR = 1        # training failed, or stopped early with nothing saved to continue from


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, too many skipped steps...)."""


class Callback:
    """Hooks a feature implements to take part in training. Every method is optional."""

    def on_model_built(self, trainer: "Trainer", model: torch.nn.Module) -> None:
        """Before DDP and optimizer exist: add parameters or hooks to the bare model chunk."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """After set-up and checkpoint loading, before the first step."""

    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        """Before the forward/backward passes of ``step``."""

    def before_grad_reduction(self, trainer: "Trainer") -> None:
        """After the backward passes of a training step, before megatron-core reduces the gradients over
        the data-parallel ranks (from its ``finalize_model_grads``): the last moment to change them."""

    def on_optimizer_step(self, trainer: "Trainer", step: int, skipped: bool) -> None:
        """Right after the optimizer update of ``step`` (``skipped``: the update was dropped)."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict) -> None:
        """After the optimizer update of ``step`` (metrics: loss, lr, grad_norm...)."""

    def on_evaluate(self, trainer: "Trainer", begin: bool) -> None:
        """Around forward-only validation passes (``begin`` True before, False after)."""

    def samples_read(self, trainer: "Trainer") -> int:
        """Training samples this callback reads from the start of the training set besides the steps' own
        (the training set is built to hold them)."""
        return 0

    def stop_requested(self, trainer: "Trainer") -> Optional[str]:
        """A reason to save and stop after this step, or None (reduced over all ranks)."""
        return None

    def on_train_end(self, trainer: "Trainer") -> None:
        """After the last step (before the final checkpoint is written)."""

    def common_state(self, trainer: "Trainer") -> dict:
        """Non-tensor state identical on all ranks, stored in checkpoints."""
        return {}

    def sharded_state(self, trainer: "Trainer", common: Optional[dict] = None) -> dict:
        """Sharded (per-rank) objects stored in checkpoints; ``common``: the state being loaded."""
        return {}

    def check_resume(self, trainer: "Trainer", common: dict) -> None:
        """Refuse (raise) a checkpoint this callback cannot continue from, given its common state; called
        before any tensor is loaded, so that the refusal comes before a loader's error about them."""

    def check_start(self, trainer: "Trainer", common: dict, path: str) -> None:
        """Refuse (raise) the checkpoint ``checkpoint.finetune_from`` names (at ``path``), whose weights alone
        start the run, given its common state; called before they are loaded."""

    def load_state(self, trainer: "Trainer", common: dict) -> None:
        """Restore from a checkpoint's common (and loaded sharded) state."""


@dataclass
class TrainResult:
    losses: dict = field(default_factory=dict)      # step -> training loss
    valid: dict = field(default_factory=dict)       # step -> validation loss
    step: int = 0
    exit_reason: str = "finished"
    checkpoint: Optional[str] = None

    @property
    def exit_code(self) -> int:
        """0 finished; 75 stopped early with a checkpoint of the stopping step (resubmit to continue)."""
        if self.exit_reason == "finished":
            return 0
        return EXIT_INCOMPLETE if self.checkpoint else EXIT_ERROR


class Trainer:
    """Builds model, optimizer and data from a config, then trains."""

    def __init__(self, cfg: Config, ctx: ParallelContext, callbacks: Optional[list] = None):
        self.cfg, self.ctx = cfg, ctx
        self.callbacks = list(callbacks or [])
        self.step = 0
        self.consumed_samples = 0  # the data position: training samples read so far, over all steps
        self.latest_checkpoint = None  # the newest checkpoint saved or loaded by this run...
        self.checkpoint_state = None   # ...and the (step, callback state) it holds
        self.hf_import = None  # what the imported Hugging Face model's ids and generation config were
        self.loading: Optional[str] = None  # the checkpoint directory the run starts from (for messages)
        self.lock: Optional[RunLock] = None  # checkpoint.save's run lock (global rank 0)
        self.pending_save: Optional[ckpt.PendingSave] = None  # checkpoint.async_save: the save in flight
        self._async_queue = None
        self.result = TrainResult()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> "Trainer":
        cfg, ctx = self.cfg, self.ctx
        if ctx.device.type == "cpu":  # every step frees and re-allocates the same tensors: keep their pages
            keep_freed_memory()
        forked_children_die_with_parent()  # checkpoint writers and data workers never outlive this process
        self.vocab_size, self.eod_id = resolve_vocab(cfg)
        # The datasets' start-up checks first: bad data stops a run before any model is built or loaded (the
        # datasets themselves are built after the load, which gives the data position).
        data_checks = check_datasets(cfg, self.vocab_size, self.eod_id,
                                     valid_samples=cfg.train.eval_steps * cfg.train.global_batch_size)
        self.padded_vocab = cfg.padded_vocab_size(self.vocab_size)
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())
        self.params_dtype = torch.bfloat16 if bf16 else torch.float32
        self.tconfig = build_transformer_config(cfg, self.params_dtype, use_cpu=not torch.cuda.is_available())
        model = build_model(cfg, self.tconfig, self.padded_vocab, ctx.is_first_stage, ctx.is_last_stage)
        initialize_weights(model, cfg, ctx.tp_rank, ctx.tp_size)
        for cb in self.callbacks:
            cb.on_model_built(self, model)
        model.to(ctx.device)
        if bf16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(self.tconfig, model)
        self.model = wrap_ddp(cfg, model, self.tconfig)
        self.optimizer = build_optimizer(cfg, [self.model], self.params_dtype)
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.tconfig.no_sync_func = self.model.no_sync
        trainer = weakref.ref(self)  # no cycle through the transformer config: the trainer, and with it the
        # data loader's workers, go as soon as the last reference does (they ignore the stop signals)

        def finalize_grads(*args, **kwargs):
            for cb in trainer().callbacks:
                cb.before_grad_reduction(trainer())
            return finalize_model_grads(*args, **kwargs)

        self.tconfig.finalize_model_grads_func = finalize_grads
        self.tconfig.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()
        common = self._load()
        t = cfg.train
        self.num_micro = cfg.num_micro_batches(ctx.world_size)
        # The sampler reads global sample indices from consumed_samples on; the dataset must reach past
        # the last step's samples and past those a callback reads (its size can change the order across
        # epochs, see _check_data_order).
        self.train_samples = max([self.consumed_samples + max(t.train_steps - self.step, 0) * t.global_batch_size,
                                  *(cb.samples_read(self) for cb in self.callbacks)])
        if common is not None:
            self._check_data_order(common)
        total_valid = t.eval_steps * t.global_batch_size
        self.train_ds, self.valid_ds = build_datasets(cfg, self.vocab_size, self.eod_id, self.train_samples,
                                                      total_valid, checks=data_checks)
        self.train_iter = iter(build_loader(self.train_ds, cfg, self.consumed_samples, self.train_samples,
                                            ctx.dp_rank, ctx.dp_size))
        self.total_valid = total_valid
        self.metrics = MetricsWriter(ctx.is_logging_rank, cfg.logging.tensorboard_dir, cfg.logging.wandb_project,
                                     cfg.to_dict())
        self.throughput = Throughput(t.global_batch_size * cfg.data.seq_length, flops_per_token(self._shape_cfg()),
                                     ctx.world_size, gpu_peak_tflops(t.gpu_peak_tflops))
        return self

    def _shape_cfg(self) -> Config:
        import copy

        c = copy.deepcopy(self.cfg)
        c.model.vocab_size = self.vocab_size
        return c

    def _start_point(self) -> tuple:
        """(resume source, its directory, why), or (None, the finetune_from directory or None, ''): chosen and
        checked (checkpoint.verify) by global rank 0 alone, one read of the checkpoint, and broadcast."""
        c = self.cfg.checkpoint
        checksums = c.verify == "checksums"
        result = [None]
        if self.ctx.rank == 0:
            try:
                if c.save and self.lock is None:  # held until the run ends (or its process does)
                    self.lock = RunLock(c.save).acquire()
                    atexit.register(self.lock.release)
                source, path, why = ckpt.resume_source(self.cfg, checksums)
                if source is None and c.finetune_from:
                    path = ckpt.resolve_checkpoint_dir(c.finetune_from, "checkpoint.finetune_from", checksums)
                result = [(source, path, why, None)]
            except (ckpt.CheckpointError, LockHeldError) as exc:
                result = [(None, None, None, str(exc))]
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(result, src=0)
        source, path, why, error = result[0]
        if error is not None:
            raise ckpt.CheckpointError(error)
        return source, path, why

    def _load(self) -> Optional[dict]:
        """Resume (or initialise weights from checkpoint.finetune_from); the loaded common state."""
        c, t = self.cfg.checkpoint, self.cfg.train
        source, path, why = self._start_point()
        self.loading = path
        if source is not None:
            saved = ckpt.read_common(path)
            for cb in self.callbacks:
                cb.check_resume(self, saved)
            common = ckpt.load_checkpoint(
                path, self.model, self.optimizer, self.cfg, self.ctx, self.padded_vocab, c.load_optimizer,
                c.load_rng, extra_sharded=self._sharded_extra(saved))
            self.step, self.consumed_samples = common["step"], common["consumed_samples"]
            self.hf_import = saved.get("hf_import")
            for cb in self.callbacks:
                cb.load_state(self, common)
            self.latest_checkpoint, self.checkpoint_state = path, (self.step, self._callback_state())
            if self.ctx.rank == 0:
                logger.info("resumed from %s at step %d (%s)", source, self.step, why)
            saved_gbs = common["config"]["train"]["global_batch_size"]
            if saved_gbs != t.global_batch_size and self.ctx.rank == 0:
                logger.warning("train.global_batch_size changed from %d (checkpoint) to %d: training continues at "
                               "sample %d, where the checkpoint's run stopped reading", saved_gbs,
                               t.global_batch_size, self.consumed_samples)
            return common
        if path is not None:  # checkpoint.finetune_from
            saved = ckpt.read_common(path)
            for cb in self.callbacks:
                cb.check_start(self, saved, path)
            # The export of this run carries the imported model's token ids and generation config on.
            self.hf_import = saved.get("hf_import")
            ckpt.load_checkpoint(path, self.model, self.optimizer, self.cfg, self.ctx, self.padded_vocab,
                                 load_optimizer=False, load_rng=False)
            if self.ctx.rank == 0:
                logger.info("initialised weights from %s (fresh optimizer and schedule, step 0)", c.finetune_from)
        return None

    def _check_data_order(self, common: dict) -> None:
        """Say so when the training set is built for another number of samples than the checkpoint's run
        built it for: megatron-core's GPTDataset shuffles over all the epochs it builds, so when the run
        spans more than one epoch of the corpus the sample order after the resume point changes."""
        before = common.get("train_samples", common["config"]["train"]["train_steps"]
                            * common["config"]["train"]["global_batch_size"])
        if before != self.train_samples and not self.cfg.data.mock and self.ctx.rank == 0:
            logger.info("the training set is built for %d samples, the checkpoint's run built it for %d "
                        "(train.train_steps or train.global_batch_size changed, or the samples a feature reads "
                        "besides the steps', such as APEX's initial scoring pass): if that is more than one epoch "
                        "of the data, the samples after the resume point come in another order than that run's",
                        self.train_samples, before)

    def _callback_state(self) -> dict:
        state = {}
        for cb in self.callbacks:
            state.update(cb.common_state(self))
        return state

    def _sharded_extra(self, common: Optional[dict] = None) -> dict:
        extra = {}
        for cb in self.callbacks:
            extra.update(cb.sharded_state(self, common))
        return extra

    # ------------------------------------------------------------------ one step
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        dev = self.ctx.device
        tokens = batch["tokens"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        position_ids = batch["position_ids"].to(dev, non_blocking=True)
        loss_mask = batch["loss_mask"].to(dev, non_blocking=True).float()
        count = loss_mask.sum()  # the micro-batch's loss tokens, over the whole sequence
        if self.ctx.cp_size > 1:  # this rank's two sequence chunks, as megatron-core's rotary embedding expects
            tokens, labels, position_ids, loss_mask = get_batch_on_this_cp_rank(
                {"tokens": tokens, "labels": labels, "position_ids": position_ids, "loss_mask": loss_mask},
                self.ctx.cp_group).values()
        mask = batch.get("attention_mask")  # data.reset_attention_mask: [b, 1, s, s], True where attention is barred
        if mask is not None:
            mask = mask.to(dev, non_blocking=True)
        output = model(tokens, position_ids, mask, labels=labels)  # [b, s] per-token losses
        return output, partial(_masked_mean_loss, loss_mask, count)

    def forward_only(self, data_iter) -> list:
        """Forward passes (no gradients) over one global batch from ``data_iter``, as validation runs them;
        the micro-batches' losses. Callbacks score with it (APEX's initial scoring pass)."""
        return self._run_microbatches(data_iter, forward_only=True)

    def _run_microbatches(self, data_iter, forward_only: bool) -> list:
        return self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=data_iter, model=[self.model],
            num_microbatches=self.num_micro, seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only)

    def _grads_finite(self) -> torch.Tensor:
        """Whether this rank's (already data-parallel reduced) gradients are all finite.

        One reduction per gradient buffer: a sum is non-finite iff some element is (or the sum
        overflows fp32, which only happens for gradients that are useless anyway).
        """
        sums = [buf.grad_data.sum() for buf in getattr(self.model, "buffers", [])]
        return torch.isfinite(torch.stack(sums)).all() if sums else torch.tensor(True)

    def _reduce(self, losses: list, stop: bool, grads_finite=None) -> tuple[float, bool, bool]:
        """(mean loss over all micro-batches of all DP ranks, non-finite loss or grads?, stop requested?)."""
        ctx = self.ctx
        # Under CP each rank's micro-batch loss is its chunks' share of the micro-batch mean: summed
        # over the CP ranks, counted once.
        counts = ctx.is_last_stage and ctx.tp_rank == 0
        vals = torch.stack([x["lm loss"].float() for x in losses]) if counts and losses else None
        t = torch.zeros(5, dtype=torch.float64, device=ctx.device)
        if vals is not None:
            finite = torch.isfinite(vals).all()
            t[0] = vals.sum().double() if finite else 0.0
            t[1] = len(losses) if ctx.cp_rank == 0 else 0
            t[2] = 0.0 if finite else 1.0
        if grads_finite is not None:
            t[3] = (~grads_finite).double()
        t[4] = float(stop)
        dist.all_reduce(t)
        loss = float("nan") if t[2] > 0 else (t[0] / max(t[1].item(), 1)).item()
        return loss, bool(t[2] + t[3] > 0), bool(t[4] > 0)

    def train_step(self, step: int) -> dict:
        lr = apply_lr(self.cfg, self.optimizer, step)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run_microbatches(self.train_iter, forward_only=False)
        stop_reason = next((r for r in (cb.stop_requested(self) for cb in self.callbacks) if r), None)
        # Loss and gradients are checked *before* the update: megatron-core's fp32 optimizer would
        # apply NaN gradients. The check rides on the step's one all-reduce.
        loss, nonfinite, stop = self._reduce(losses, stop_reason is not None, self._grads_finite())
        metrics = {"loss": loss, "lr": lr, "stop": stop}
        if nonfinite:
            return self._non_finite(step, metrics)
        ok, grad_norm, _ = self.optimizer.step()
        metrics["grad_norm"] = grad_norm
        if grad_norm is not None and not math.isfinite(grad_norm):
            return self._non_finite(step, metrics)
        for cb in self.callbacks:
            cb.on_optimizer_step(self, step, skipped=False)
        return metrics

    def _non_finite(self, step: int, metrics: dict) -> dict:
        self.skipped = getattr(self, "skipped", 0) + 1
        t = self.cfg.train
        if t.nan_policy == "stop" or self.skipped > t.max_skipped_steps:
            raise TrainingError(
                f"non-finite loss or gradient at step {step + 1} (loss={metrics['loss']}); "
                + ("train.nan_policy='stop'" if t.nan_policy == "stop" else
                   f"{self.skipped} steps skipped > train.max_skipped_steps={t.max_skipped_steps}")
                + ". Lower optimizer.lr, raise warmup, or resume from the last checkpoint.")
        logger.warning("step %d: non-finite loss/gradient, update skipped (%d so far)", step + 1, self.skipped)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        for cb in self.callbacks:
            cb.on_optimizer_step(self, step, skipped=True)
        return {**metrics, "skipped": True}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Optional[float]:
        if self.valid_ds is None:
            return None
        self.model.eval()
        for cb in self.callbacks:
            cb.on_evaluate(self, begin=True)
        it = iter(build_loader(self.valid_ds, self.cfg, 0, self.total_valid, self.ctx.dp_rank, self.ctx.dp_size))
        total = 0.0
        with torch.no_grad():
            for _ in range(self.cfg.train.eval_steps):
                total += self._reduce(self.forward_only(it), False)[0]
        for cb in self.callbacks:
            cb.on_evaluate(self, begin=False)
        self.model.train()
        return total / self.cfg.train.eval_steps

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        for cb in self.callbacks:
            cb.on_train_start(self)
        logger.info("training from step %d to %d (%d micro-batches of %d per step per DP rank)",
                    self.step, t.train_steps, self.num_micro, t.micro_batch_size)
        self.throughput.reset()
        interval_losses, interval_skipped = [], 0  # a skipped step's loss (maybe NaN) is not averaged
        try:
            while self.step < t.train_steps:
                step = self.step
                for cb in self.callbacks:
                    cb.on_step_start(self, step)
                metrics = self.train_step(step)
                self.step = step + 1
                self.consumed_samples += t.global_batch_size
                self.throughput.step()
                self.result.losses[step] = metrics["loss"]
                if metrics.get("skipped"):
                    interval_skipped += 1
                else:
                    interval_losses.append(metrics["loss"])
                for cb in self.callbacks:
                    cb.on_step_end(self, step, metrics)
                if self.pending_save is not None:
                    with self.throughput.paused():  # publishing (checksums, renames) is the save's time
                        self._finish_save(blocking=False)
                if self.step % t.log_interval == 0 or self.step == t.train_steps:
                    self._log(step, metrics, interval_losses, interval_skipped)
                    interval_losses, interval_skipped = [], 0
                if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.train_steps:
                    self._validate()
                if metrics["stop"]:
                    if self.step < t.train_steps:
                        self.result.exit_reason = "stopped"
                        break
                    if self.ctx.rank == 0:
                        logger.info("stop requested during the last step: finishing the run")
                c = cfg.checkpoint
                if c.save and c.save_interval and self.step % c.save_interval == 0 and self.step < t.train_steps:
                    with self.throughput.paused():
                        self.save(background=cfg.checkpoint.async_save)
        except TrainingError:  # decided on every rank at the same step: a save in flight is still published
            if self.pending_save is not None:
                self._finish_save(blocking=True)
            raise
        except BaseException:  # anything else (a crash, the second Ctrl-C): the unpublished save is given up
            if self.pending_save is not None:
                self.pending_save.abort()
                self.pending_save = None
            raise
        if self.pending_save is not None:  # at most one save in flight; the last one is published first
            self._finish_save(blocking=True)
        if self.result.exit_reason == "finished":
            for cb in self.callbacks:
                cb.on_train_end(self)
            if t.eval_steps:
                self._validate()
        if cfg.checkpoint.save:  # unless nothing changed since the load (a finished run started again)
            if self.checkpoint_state != (self.step, self._callback_state()):
                self.save()
            elif self.ctx.rank == 0:
                logger.info("nothing changed since %s was loaded: not saving it again", self.latest_checkpoint)
        if self.checkpoint_state is not None and self.checkpoint_state[0] == self.step:
            self.result.checkpoint = self.latest_checkpoint
        self.result.step = self.step
        self.close_data()
        self.metrics.close()
        if self.lock is not None:  # after the last save: the directory is free for the next run
            self.lock.release()
        return self.result

    def close_data(self) -> None:
        """Stop the training data loader's worker processes (they ignore the job's stop signals, so the
        interpreter's exit, which terminates leftover children with SIGTERM, cannot)."""
        it, self.train_iter = getattr(self, "train_iter", None), None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _validate(self) -> None:
        with self.throughput.paused():  # tokens/s counts training only
            loss = self.evaluate()
        if loss is None:
            return
        self.result.valid[self.step] = loss
        ppl = math.exp(min(loss, 50.0))
        if self.ctx.is_logging_rank:
            logger.info("validation | step %d | loss %.4f | perplexity %.3f", self.step, loss, ppl)
        self.metrics.write(self.step, {"loss": loss, "perplexity": ppl}, prefix="valid")

    def _log(self, step: int, metrics: dict, interval_losses: list, skipped: int = 0) -> None:
        """One line (and one metrics point) per logging interval: the loss averaged over the interval's
        steps that were not skipped (NaN when all were), and how many were skipped."""
        perf = self.throughput.report()
        loss = sum(interval_losses) / len(interval_losses) if interval_losses else float("nan")
        values = {"loss": loss, "lr": metrics["lr"], "skipped_steps": skipped, **perf,
                  "grad_norm": None if metrics.get("skipped") else metrics.get("grad_norm")}  # inf/NaN if skipped
        if self.ctx.is_logging_rank:
            parts = [f"step {step + 1}/{self.cfg.train.train_steps}", f"loss {values['loss']:.4f}",
                     f"lr {values['lr']:.3e}"]
            if skipped:
                parts.append(f"skipped {skipped} of {skipped + len(interval_losses)} steps")
            if values["grad_norm"] is not None:
                parts.append(f"grad norm {values['grad_norm']:.3f}")
            parts.append(f"{perf['tokens_per_s']:.0f} tok/s")
            parts.append(f"{perf['step_time_s'] * 1000:.0f} ms/step")
            if torch.cuda.is_available():
                parts.append(f"{perf['tflops_per_gpu']:.1f} TFLOP/s/GPU")
                if "mfu" in perf:
                    parts.append(f"MFU {100 * perf['mfu']:.1f}%")
            logger.info(" | ".join(parts))
        self.metrics.write(step + 1, values)

    def save(self, background: bool = False) -> str:
        """Save a checkpoint of this step; with ``background`` (checkpoint.async_save) its files are written by
        a forked process while training goes on, and it is published at a later step (:meth:`_finish_save`).
        At most one save is in flight: a save waits for the one before it."""
        if self.pending_save is not None:
            self._finish_save(blocking=True)
        if background and self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()
        state = self._callback_state()
        saved = ckpt.save_checkpoint(self.cfg.checkpoint.save, self.step, self.model, self.optimizer, self.cfg,
                                     self.ctx, self.padded_vocab, self.consumed_samples,
                                     extra_common={"train_samples": self.train_samples, **state,
                                                   **({"hf_import": self.hf_import} if self.hf_import else {})},
                                     extra_sharded=self._sharded_extra(),
                                     async_queue=self._async_queue if background else None)
        if isinstance(saved, ckpt.PendingSave):
            self.pending_save, self._pending_state = saved, (self.step, state)
            return saved.target
        self.latest_checkpoint, self.checkpoint_state = saved, (self.step, state)
        return saved

    def _finish_save(self, blocking: bool) -> None:
        """Publish the save in flight once every rank's writer is done (a collective: every rank calls it
        at the same step); ``blocking`` waits for them."""
        if self.pending_save.poll(blocking):
            self.latest_checkpoint, self.checkpoint_state = self.pending_save.target, self._pending_state
            self.pending_save = None


def _masked_mean_loss(loss_mask: torch.Tensor, count: torch.Tensor, output: torch.Tensor):
    """Mean token loss of a micro-batch (megatron-core's schedule divides by the micro-batch count).

    ``count`` is the micro-batch's number of loss tokens over the whole sequence; under context
    parallelism ``output`` and ``loss_mask`` cover this rank's chunks only, so the result is their
    share of the mean (megatron-core's schedule multiplies it by the CP size for the backward pass,
    and the gradient average over data x context parallel ranks restores the mean's gradient).
    """
    losses = output.float().view(-1)
    mask = loss_mask.view(-1)
    loss = (losses * mask).sum() / count.clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches.
    return loss, {"lm loss": loss.detach().clone()}
