"""The composition root: a checked config, the run's callbacks, the trainer, the exit code.

The one module that knows every package (config, distributed, training, expansion); the packages
below it never import each other upwards (tests/test_structure.py).
"""

from __future__ import annotations

import logging

import yaml

from typing import Optional

from megatron_apex.compat.cpu import apply_cpu_patches
from megatron_apex.config import Config, ConfigError, load_config
from megatron_apex.distributed import LaunchEnv, destroy_distributed, initialize_distributed
from megatron_apex.expansion import geometry

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2        # the configuration (or a checkpoint or tokenizer it names) does not work
EXIT_INTERRUPTED = 130  # aborted by a second Ctrl-C (128 + SIGINT), nothing saved


def checked_config(path=None, overrides: Optional[list] = None, world_size: Optional[int] = None) -> Config:
    """The config a run accepts: loaded and validated section by section and as a whole
    (``load_config``), then what APEX asks of the model, the layout and the run (``geometry.check``)."""
    cfg = load_config(path, overrides, world_size=world_size)
    geometry.check(cfg)
    return cfg


def build_callbacks(cfg: Config) -> list:
    """The features that take part in this run, as trainer callbacks."""
    from megatron_apex.training.exit import GracefulExit

    callbacks = [GracefulExit(cfg.train.exit_after_minutes, cfg.train.exit_on_signal, saves=bool(cfg.checkpoint.save))]
    if cfg.apex.enabled:
        from megatron_apex.expansion.engine import ApexCallback

        callbacks.append(ApexCallback(cfg))
    else:  # a checkpoint saved before an APEX run's final fuse is not a model without its operators
        from megatron_apex.expansion.resume import UnfusedCheckpointGuard

        callbacks.append(UnfusedCheckpointGuard())
    return callbacks


def _log_resolved_config(cfg: Config) -> None:
    """The resolved config (every field, defaults included) goes to a file beside the run's checkpoints,
    ``{checkpoint.save}/logs/config-{time}-{pid}.yaml``, and the console gets one line with its path (every
    checkpoint stores it too); without checkpoint.save it is printed at logging.level=DEBUG."""
    import os
    import time

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if not cfg.checkpoint.save:
        logger.info("resolved config: logging.level=DEBUG prints it (megatron-apex config CONFIG [overrides] too)")
        logger.debug("resolved config:\n%s", text.rstrip())
        return
    path = os.path.join(cfg.checkpoint.save, "logs", f"config-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.yaml")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:  # not fatal: the checkpoints store it as well
        logger.warning("resolved config: could not write %s (%s)", path, exc)
        return
    logger.info("resolved config: %s", path)


def run_training(cfg: Config, launch: LaunchEnv) -> int:
    """Train; returns the exit code. Errors a user can fix (configuration, checkpoint, tokenizer) are
    one line each (the traceback at logging level DEBUG), not a traceback."""
    from megatron_apex.data.tokenizers import TokenizerError
    from megatron_apex.training.checkpoint import EXIT_WRITE_FAILED, CheckpointError, CheckpointWriteError
    from megatron_apex.training.exit import GracefulExit
    from megatron_apex.training.trainer import Trainer, TrainingError

    callbacks = build_callbacks(cfg)
    graceful = next(cb for cb in callbacks if isinstance(cb, GracefulExit))
    trainer = None
    try:
        apply_cpu_patches()  # without CUDA: megatron-core's CUDA assumptions redirected to the CPU (docs/cpu.md)
        ctx = initialize_distributed(cfg, launch)
        if ctx.rank == 0:
            for warning in cfg.warnings():
                logger.warning("%s", warning)
        trainer = Trainer(cfg, ctx, callbacks)  # bound before set-up, so a failing set-up still closes its data
        trainer.setup()
        if ctx.rank == 0:  # after set-up: the run holds checkpoint.save now (a refused run writes nothing there)
            _log_resolved_config(cfg)
        result = trainer.train()
        if result.exit_reason == "stopped" and result.checkpoint is None:
            code = graceful.exit_code_unsaved
            if ctx.rank == 0:
                logger.error("training stopped at step %d without saving (checkpoint.save is not set): a new start "
                             "cannot continue from here (exit code %d)", result.step, code)
            return code
        if ctx.rank == 0:
            where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
            logger.info("training %s at step %d%s", result.exit_reason, result.step, where)
        return result.exit_code
    except TrainingError as exc:
        logger.error("%s", exc)
        return 1
    except CheckpointWriteError as exc:
        logger.error("checkpoint error: %s", exc)
        return EXIT_WRITE_FAILED
    except (ConfigError, CheckpointError, TokenizerError) as exc:
        kind = "checkpoint error" if isinstance(exc, CheckpointError) else "configuration error"
        logger.error("%s: %s", kind, exc)
        logger.debug("where it was raised:", exc_info=True)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        logger.error("interrupted: aborted without saving")
        return EXIT_INTERRUPTED
    finally:
        if trainer is not None:  # on an error too: the data workers ignore the stop signals
            trainer.close_data()
        graceful.restore()
        destroy_distributed()
