"""One training run from a validated config: start-up, callbacks, trainer, exit code."""

from __future__ import annotations

import logging

import yaml

from megatron_apex.config import Config, ConfigError
from megatron_apex.distributed import LaunchEnv, destroy_distributed, initialize_distributed

logger = logging.getLogger(__name__)


def build_callbacks(cfg: Config) -> list:
    """The features that take part in this run, as trainer callbacks."""
    from megatron_apex.training.exit import GracefulExit

    callbacks = [GracefulExit(cfg.train.exit_after_minutes, cfg.train.exit_on_signal)]
    if cfg.apex.enabled:
        from megatron_apex.expansion.engine import ApexCallback

        callbacks.append(ApexCallback(cfg))
    return callbacks


def run_training(cfg: Config, launch: LaunchEnv) -> int:
    from megatron_apex.training.trainer import Trainer, TrainingError

    ctx = initialize_distributed(cfg, launch)
    try:
        if ctx.rank == 0:
            logger.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        trainer = Trainer(cfg, ctx, build_callbacks(cfg)).setup()
        result = trainer.train()
        if ctx.rank == 0:
            where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
            logger.info("training %s at step %d%s", result.exit_reason, result.step, where)
        return result.exit_code
    except ConfigError as exc:  # found at start-up (tokenizer, datasets): the user's to fix, no traceback
        logger.error("configuration error: %s", exc)
        return 2
    except TrainingError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        destroy_distributed()
