"""APEX config validation (what tests/test_config.py may not cover): ratio, boundaries, partitions vs TP,
tuned ratios of selected mode, and the derived boundary schedule."""

from __future__ import annotations

import pytest

from megatron_apex.config import ConfigError, load_config


def _cfg(tiny_config, tiny_data, world=1, **extra):
    from helpers import tiny_overrides

    return load_config(tiny_config, tiny_overrides(tiny_data, **{"apex.enabled": True, **extra}), world)


@pytest.mark.parametrize("extra,field", [
    ({"apex.ratio": 0.0}, "apex.ratio"),
    ({"apex.ratio": 0.6}, "apex.ratio"),
    ({"apex.boundaries": "[3, 1]"}, "apex.boundaries"),
    ({"apex.boundaries": "[0, 0]"}, "apex.boundaries"),
    ({"apex.boundaries": "[0, 6]"}, "apex.boundaries"),      # train_steps = 6
    ({"apex.boundaries": "[-1, 2]"}, "apex.boundaries"),
    ({"apex.stages": 0}, "apex.stages"),
    ({"apex.stages": 7}, "apex.stages"),
    ({"apex.partitions": 0}, "apex.partitions"),
    ({"apex.partitions": 3, "parallel.tensor_model_parallel_size": 2}, "apex.partitions"),
    ({"apex.lr_scale": 0.0}, "apex.lr_scale"),
    ({"apex.init_scoring_samples": -1}, "apex.init_scoring_samples"),
    ({"apex.ema_decay": 1.0}, "apex.ema_decay"),
    ({"apex.ema_decay": -0.5}, "apex.ema_decay"),
    ({"apex.score_interval": 0}, "apex.score_interval"),
    ({"apex.monarch_blocks": -1}, "apex.monarch_blocks"),
    ({"apex.statistic": "mean"}, "apex.statistic"),
    ({"apex.mode": "selected", "apex.ratio": 0.25, "apex.ffn_tuned_ratio": 0.4}, "apex.ffn_tuned_ratio"),
    ({"apex.mode": "selected", "apex.attn_tuned_ratio": 1.5}, "apex.attn_tuned_ratio"),
])
def test_apex_config_rejected(tiny_config, tiny_data, extra, field):
    world = extra.get("parallel.tensor_model_parallel_size", 1)
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_config, tiny_data, world, **extra)
    assert field in str(err.value)


def test_apex_config_accepted_and_schedule(tiny_config, tiny_data):
    cfg = _cfg(tiny_config, tiny_data, **{"apex.stages": 3, "train.train_steps": 9})
    assert cfg.apex_boundaries == [0, 3, 6]
    cfg = _cfg(tiny_config, tiny_data, **{"apex.boundaries": "[0, 2, 5]"})
    assert cfg.apex_boundaries == [0, 2, 5]
    _cfg(tiny_config, tiny_data, 2, **{"apex.partitions": 4, "parallel.tensor_model_parallel_size": 2})
    cfg = _cfg(tiny_config, tiny_data)
    assert (cfg.apex.statistic, cfg.apex.ema_decay, cfg.apex.monarch_blocks) == ("rank", 0.99, 0)
    cfg = _cfg(tiny_config, tiny_data, **{"apex.statistic": "ema", "apex.ema_decay": 0.5, "apex.monarch_blocks": 3})
    assert (cfg.apex.statistic, cfg.apex.ema_decay, cfg.apex.monarch_blocks) == ("ema", 0.5, 3)
    # Disabled APEX is not validated (its defaults may not fit a tiny run).
    from helpers import tiny_overrides

    load_config(tiny_config, tiny_overrides(tiny_data, **{"apex.enabled": False, "apex.ratio": 0.9}), 1)
