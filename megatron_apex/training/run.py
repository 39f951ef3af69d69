"""One training run from a validated config: start-up, callbacks, trainer, exit code."""

from __future__ import annotations

import logging

import yaml

from megatron_apex.config import Config, ConfigError
from megatron_apex.distributed import LaunchEnv, destroy_distributed, initialize_distributed

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2        # the configuration (or a checkpoint or tokenizer it names) does not work
EXIT_INTERRUPTED = 130  # aborted by a second Ctrl-C (128 + SIGINT), nothing saved


def build_callbacks(cfg: Config) -> list:
    """The features that take part in this run, as trainer callbacks."""
    from megatron_apex.training.exit import GracefulExit

    callbacks = [GracefulExit(cfg.train.exit_after_minutes, cfg.train.exit_on_signal, saves=bool(cfg.checkpoint.save))]
    if cfg.apex.enabled:
        from megatron_apex.expansion.engine import ApexCallback

        callbacks.append(ApexCallback(cfg))
    return callbacks


def run_training(cfg: Config, launch: LaunchEnv) -> int:
    """Train; returns the exit code. Errors a user can fix (configuration, checkpoint, tokenizer) are
    one line each (the traceback at logging level DEBUG), not a traceback."""
    from megatron_apex.data.tokenizers import TokenizerError
    from megatron_apex.training.checkpoint import EXIT_WRITE_FAILED, CheckpointError, CheckpointWriteError
    from megatron_apex.training.exit import GracefulExit
    from megatron_apex.training.trainer import Trainer, TrainingError

    callbacks = build_callbacks(cfg)
    graceful = next(cb for cb in callbacks if isinstance(cb, GracefulExit))
    try:
        ctx = initialize_distributed(cfg, launch)
        if ctx.rank == 0:
            logger.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
            for warning in cfg.warnings():
                logger.warning("%s", warning)
        result = Trainer(cfg, ctx, callbacks).setup().train()
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
        graceful.restore()
        destroy_distributed()
