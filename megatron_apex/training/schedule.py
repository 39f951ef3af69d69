"""The learning-rate schedule: a pure function of the step (no state, so a resume needs only the step).

Shapes (``optimizer.lr_decay_style``), after a linear warmup over ``lr_warmup_steps``:

* ``cosine`` / ``linear``: decay from ``lr`` to ``min_lr`` until ``lr_decay_steps`` (default: the run's
  last step);
* ``constant``: ``lr`` throughout;
* ``wsd`` (warmup-stable-decay, the usual schedule of continued pre-training): ``lr`` until the final
  decay, then a decay to ``min_lr`` over its last ``lr_wsd_decay_steps`` steps (or the
  ``lr_wsd_decay_fraction`` of the steps after warmup), shaped ``linear``, ``cosine`` or ``1-sqrt``.
  ``lr_wsd_decay_steps=0`` keeps the stable phase to the end: a later run resumes from its checkpoint
  with more steps and a decay, and continues exactly as a run planned with that decay from the start.

A re-warmup (``lr_rewarmup_start``, ``lr_rewarmup_steps``) scales the schedule linearly from 0 back to
its own value over the given steps, e.g. from the step a run resumes at on new data. Imports nothing
heavy: the dry run prints the schedule's key points without torch.
"""

from __future__ import annotations

import math

from megatron_apex.config import Config


def decay_end(cfg: Config) -> int:
    """The step at which the decay reaches ``min_lr``."""
    return cfg.optimizer.lr_decay_steps or cfg.train.train_steps


def wsd_decay_steps(cfg: Config) -> int:
    """Steps of the final decay of a ``wsd`` schedule."""
    o = cfg.optimizer
    if o.lr_wsd_decay_steps is not None:
        return o.lr_wsd_decay_steps
    return int(round(o.lr_wsd_decay_fraction * max(decay_end(cfg) - o.lr_warmup_steps, 0)))


def _shape(name: str, progress: float) -> float:
    """The share of (lr - min_lr) left at ``progress`` in [0, 1] of a decay."""
    if name == "linear":
        return 1.0 - progress
    if name == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    o = cfg.optimizer
    warmup = o.lr_warmup_steps
    if warmup > 0 and step < warmup:
        lr = o.lr * (step + 1) / warmup
    elif o.lr_decay_style == "constant":
        lr = o.lr
    elif o.lr_decay_style == "wsd":
        span = wsd_decay_steps(cfg)
        start = decay_end(cfg) - span
        if span == 0 or step < start:
            lr = o.lr
        else:
            lr = o.min_lr + _shape(o.lr_wsd_decay_shape, min(1.0, (step - start) / span)) * (o.lr - o.min_lr)
    else:
        span = decay_end(cfg) - warmup
        if span <= 0:
            lr = o.min_lr
        else:
            progress = min(1.0, max(0.0, (step - warmup) / span))
            lr = o.min_lr + _shape(o.lr_decay_style, progress) * (o.lr - o.min_lr)
    start = o.lr_rewarmup_start
    if start is not None and start <= step < start + o.lr_rewarmup_steps:
        lr *= (step - start + 1) / o.lr_rewarmup_steps
    return lr


def describe(cfg: Config) -> str:
    """The schedule's key points in one line (the dry run prints it)."""
    o, end = cfg.optimizer, decay_end(cfg)
    parts = [f"warmup 0 -> {o.lr:g} over steps [0, {o.lr_warmup_steps})"] if o.lr_warmup_steps else []
    if o.lr_decay_style == "constant":
        parts.append(f"{o.lr:g} to the end")
    elif o.lr_decay_style == "wsd":
        span = wsd_decay_steps(cfg)
        if span == 0:
            parts.append(f"stable at {o.lr:g} to the end (no decay: lr_wsd_decay_steps=0; a later run can resume "
                         "into a decay)")
        else:
            parts.append(f"stable at {o.lr:g} until step {end - span}, then {o.lr_wsd_decay_shape} decay to "
                         f"{o.min_lr:g} over steps [{end - span}, {end})")
    else:
        parts.append(f"{o.lr_decay_style} decay {o.lr:g} -> {o.min_lr:g} over steps [{o.lr_warmup_steps}, {end})")
    if o.lr_rewarmup_start is not None:
        parts.append(f"re-warmup x (0 -> 1) over steps [{o.lr_rewarmup_start}, "
                     f"{o.lr_rewarmup_start + o.lr_rewarmup_steps})")
    last = cfg.train.train_steps - 1
    return f"{o.lr_decay_style}: " + "; ".join(parts) + f"; step {last} (the last): {lr_at(cfg, last):.4g}"
