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


def test_apex_partitions_divide_the_selected_units(tiny_config, tiny_data):
    """B = gcd(apex.partitions, units, k): 32 heads at ratio 0.125 select k = 4 in 4 partitions (one P and
    one N head each) instead of rounding k down to 0 in 8; a TP degree that does not divide B is refused
    before start, with a ratio that fits; a ratio that selects nothing at all is refused."""
    from megatron_apex.cli import dry_run

    shape = {"model.num_attention_heads": 32, "model.num_query_groups": 32, "model.ffn_hidden_size": 384,
             "apex.ratio": 0.125, "apex.partitions": 8}
    cfg = _cfg(tiny_config, tiny_data, **shape)
    assert cfg.apex_geometry == {"attn": (32, 4, 4), "ffn": (384, 48, 8)}
    assert "attention units k=4 of 32 in 4 partitions, FFN channels k=48 of 384 in 8 partitions" in dry_run(cfg, 1)
    _cfg(tiny_config, tiny_data, 4, **shape, **{"parallel.tensor_model_parallel_size": 4})
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_config, tiny_data, 8, **shape, **{"parallel.tensor_model_parallel_size": 8})
    msg = str(err.value)
    assert "k=4 attention units" in msg and "B=4" in msg and "tensor_model_parallel_size=8" in msg, msg
    assert "apex.attn_ratio=0.25 (k=8)" in msg and "apex.attn_ratio=0" in msg, msg
    tp8 = {"parallel.tensor_model_parallel_size": 8}
    _cfg(tiny_config, tiny_data, 8, **{**shape, "apex.attn_ratio": 0.25}, **tp8)  # the FFN keeps 0.125
    cfg = _cfg(tiny_config, tiny_data, 8, **{**shape, "apex.attn_ratio": 0}, **tp8)  # the FFN alone
    assert cfg.apex_geometry == {"attn": (32, 0, 8), "ffn": (384, 48, 8)}
    with pytest.raises(ConfigError, match="apex.ffn_ratio=0.6"):
        _cfg(tiny_config, tiny_data, **{"apex.ffn_ratio": 0.6})
    # GQA with 2 query groups: no group at ratio 0.125 (said in the dry run), the FFN still expands.
    cfg = _cfg(tiny_config, tiny_data, **{"model.num_query_groups": 2, "apex.ratio": 0.125})
    assert cfg.apex_geometry["attn"][1] == 0 and "attention units none of 2 (not expanded)" in dry_run(cfg, 1)
    with pytest.raises(ConfigError, match="apex.ratio=0.001: selects no unit"):
        _cfg(tiny_config, tiny_data, **{"model.num_query_groups": 2, "apex.ratio": 0.001})
