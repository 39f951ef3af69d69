"""APEX state in checkpoints: what a save stores, which checkpoints a run can continue, and the restore.

A checkpoint's common state carries ``common["apex"]`` (stage, finished, the settings selections and
operators depend on); each rank stores its votes, selections, operators and operator optimizer as one
sharded object. Before the final fuse the weights alone are not the model, so such a checkpoint is
refused where it would be used without its operators (a run without APEX, a ``finetune_from``).
"""

from __future__ import annotations

import logging
from typing import Optional

from megatron_apex.config import Config, ConfigError
from megatron_apex.expansion.operator import state_shape_mismatches
from megatron_apex.training.trainer import Callback

logger = logging.getLogger(__name__)

STATE_KEY = "apex_state"


def mid_stage(saved: dict) -> bool:
    """Whether a checkpoint's APEX state (``common["apex"]``) was saved with a boundary still to come."""
    return not saved["finished"] and saved["stage"] < len(saved["boundaries"])


def unfused_stage(common: dict) -> Optional[str]:
    """'S of N' when a checkpoint was saved during an APEX run before its final fuse (its weights alone
    are then not the model), else None."""
    apex = common.get("apex")
    return None if apex is None or apex["finished"] else f"{apex['stage']} of {len(apex['boundaries'])}"


def refuse_unfused_start(saved: dict, path: str, finetune_from: str) -> None:
    """``checkpoint.finetune_from`` takes weights only: refused from the middle of an APEX stage."""
    stage = unfused_stage(saved)
    if stage is not None:
        raise ConfigError(f"checkpoint.finetune_from={finetune_from}: {path} was saved in the middle of "
                          f"APEX stage {stage}; its weights without the stage's operators are another model. "
                          "Resume that run (checkpoint.load), or start from its export "
                          "(tools/convert_checkpoint.py export fuses the operators, import brings the model back)")


class UnfusedCheckpointGuard(Callback):
    """For runs without APEX: a checkpoint saved before an APEX run's final fuse is refused, to resume
    (its weights without the operators are another model) and to start from."""

    def check_resume(self, trainer, common: dict) -> None:
        stage = unfused_stage(common)
        if stage is not None:
            raise ConfigError(f"apex.enabled=false: {trainer.loading} was saved during an APEX run (stage {stage}), "
                              "before the final fuse folded its operators into the weights, which alone are another "
                              "model; resume it with apex.enabled=true and its APEX settings, or export it "
                              "(tools/convert_checkpoint.py fuses the operators)")

    def check_start(self, trainer, common: dict, path: str) -> None:
        refuse_unfused_start(common, path, trainer.cfg.checkpoint.finetune_from)


class ApexResume:
    """The checkpoint side of one APEX run (``engine``: its :class:`~megatron_apex.expansion.engine.ApexCallback`)."""

    def __init__(self, cfg: Config, engine):
        self.cfg, self.a, self.engine = cfg, cfg.apex, engine
        self.checked = False  # check ran (before the tensors were loaded)
        self.pending = None   # the loaded per-rank state, restored when training starts

    # ------------------------------------------------------------------ saving
    def common_state(self) -> dict:
        b = self.engine.boundary
        return {"apex": {"version": 1, "stage": b.stage, "finished": b.finished,
                         "boundaries": list(self.engine.geometry.boundaries), "statistic": self.a.statistic,
                         "ema_decay": self.a.ema_decay, "mode": self.a.mode, "ratio": self.a.ratio,
                         "attn_ratio": self.a.attn_ratio, "ffn_ratio": self.a.ffn_ratio,
                         "partitions": self.a.partitions, "progressive": self.a.progressive,
                         "geometry": {kind: list(g) for kind, g in self.engine.geometry.units.items()}}}

    def rank_state(self) -> dict:
        b = self.engine.boundary
        return {
            **self.engine.recorder.state(),
            "monarch_blocks": self.a.monarch_blocks,
            "excluded": {f"{li}:{kind}": v for (li, kind), v in b.excluded.items()},
            "layers": [{"index": e.index, "selection": e.selection,
                        "spanning": [kind for kind in ("attn", "ffn") if getattr(getattr(e, f"{kind}_op"), "span", None)
                                     is not None],
                        "ops": {name: getattr(e, name).state_dict() for name in ("attn_op", "ffn_op", "deltas")
                                if getattr(e, name) is not None}} for e in self.engine.layers],
            "op_optimizer": b.op_optimizer.state_dict() if b.op_optimizer is not None else None,
        }

    @staticmethod
    def same_layout(trainer, common: dict) -> bool:
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

        if common is not None and ("apex" not in common or not self.same_layout(trainer, common)):
            return {}  # nothing saved, or a finished run resumed under another layout (nothing needed)
        ctx = trainer.ctx
        return {STATE_KEY: ShardedObject(STATE_KEY, self.rank_state(), (ctx.pp_size, ctx.tp_size, ctx.dp_size),
                                         (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=ctx.cp_rank)}

    # ------------------------------------------------------------------ checks before loading
    def check(self, trainer, common: dict) -> None:
        """Refuses APEX state that this run's settings cannot continue (another mode, ratio, ... before
        the final fuse; another layout or statistic mid-stage), before the optimizer state is loaded:
        another apex.mode, say, trains other parameters, which the loader would report as a mismatch
        of parameter groups."""
        saved = common.get("apex")
        if saved is None:
            return
        self.same_layout(trainer, common)  # raises mid-stage under another layout
        if saved["finished"] and trainer.ctx.rank == 0 and common.get("step", 0) < self.cfg.train.train_steps:
            logger.warning("APEX: this checkpoint (step %d) holds a finished APEX run, its operators fused into "
                           "the weights; training on from it is plain training and apex.* has no effect here. "
                           "To expand again, start a new run from it with checkpoint.finetune_from",
                           common.get("step", 0))
        if not saved["finished"]:
            self._check_run_continues(saved, common.get("step", 0))
        if mid_stage(saved):
            self._check_scores_continue(saved)
        self.checked = True

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
        geometry = {kind: list(g) for kind, g in self.engine.geometry.units.items()}
        if saved.get("geometry", geometry) != geometry:
            raise ConfigError(f"{where} with (units, k, partitions) per kind {saved['geometry']}, but this version "
                              f"computes {geometry} from the same settings; {after}")
        old_b, new_b, stage = list(saved["boundaries"]), list(self.engine.geometry.boundaries), saved["stage"]
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

    # ------------------------------------------------------------------ loading
    def load(self, trainer, common: dict) -> None:
        b = self.engine.boundary
        saved = common.get("apex")
        if saved is None:
            boundaries = self.engine.geometry.boundaries
            if common.get("step", 0) > (boundaries[0] if boundaries else 0):
                logger.warning("resuming from a checkpoint without APEX state: APEX starts at the next boundary")
                b.stage = sum(1 for x in boundaries if x < common["step"])
                b.set_stage_layers()
            return
        if not self.checked:
            self.check(trainer, common)
        self.checked = False
        b.stage, b.finished = saved["stage"], saved["finished"]
        b.set_stage_layers()
        self.pending = common.get(STATE_KEY)

    def restore(self, trainer) -> None:
        """The loaded per-rank state, once the optimizer states exist (at the start of training)."""
        state, self.pending = self.pending, None
        if state is None:
            return
        b = self.engine.boundary
        self.engine.recorder.load_state(state)
        b.excluded = {(int(k.split(":")[0]), k.split(":")[1]): v for k, v in state["excluded"].items()}
        for entry, saved in zip(self.engine.layers, state["layers"]):
            entry.selection = saved["selection"]
            if b.finished:
                continue
            b.build_operators(trainer.ctx, entry)
            for name, sd in saved["ops"].items():
                bad = state_shape_mismatches(getattr(entry, name), sd)
                if bad:
                    raise ConfigError(f"apex.monarch_blocks={self.a.monarch_blocks}: the operators of this mid-stage "
                                      f"checkpoint (saved with apex.monarch_blocks={state.get('monarch_blocks', 0)}) "
                                      f"have other shapes (layer {entry.index} {name}: {'; '.join(bad)}); resume "
                                      "with the APEX settings it was saved with (apex.monarch_blocks, apex.ratio, "
                                      "apex.partitions)")
                getattr(entry, name).load_state_dict(sd)
        if not b.finished:
            b.build_op_optimizer()
            if state["op_optimizer"] is not None and b.op_optimizer is not None:
                b.op_optimizer.load_state_dict(state["op_optimizer"])
