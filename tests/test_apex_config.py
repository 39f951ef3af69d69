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
    with pytest.raises(ConfigError, match="selects no unit.*2 attention units \\(apex.ratio=0.001"):
        _cfg(tiny_config, tiny_data, **{"model.num_query_groups": 2, "apex.ratio": 0.001})
    # The message names the keys that decide each kind, with the ratio that would select one unit.
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_config, tiny_data, **{"model.num_query_groups": 2, "apex.attn_ratio": 0, "apex.ffn_ratio": 0.001})
    assert "(apex.attn_ratio=0.0; >= 0.5 selects one)" in str(err.value)
    assert "(apex.ffn_ratio=0.001; >= 0.007812 selects one)" in str(err.value)
    assert "apex.ratio" not in str(err.value)


def test_progressive_stages_keep_one_unit_per_partition(tiny_config, tiny_data):
    """Progressive halving never rounds a stage's k to 0: it stops at B (one unit per partition)."""
    from megatron_apex.cli import dry_run

    # LLaMA-2-7B's heads: 32 at 0.125 -> k = 4 in B = 4 partitions; 128 channels at 0.125 -> k = 16, B = 8.
    over = {"model.num_attention_heads": 32, "model.num_query_groups": 32, "model.hidden_size": 256,
            "apex.ratio": 0.125, "apex.partitions": 8, "apex.progressive": True, "apex.stages": 4}
    cfg = _cfg(tiny_config, tiny_data, **over)
    assert cfg.apex_geometry["attn"] == (32, 4, 4) and cfg.apex_geometry["ffn"] == (128, 16, 8)
    assert cfg.apex_stage_ks == {"attn": [4, 4, 4, 4], "ffn": [16, 8, 8, 8]}
    assert "APEX progressive: k per stage: attention units [4, 4, 4, 4]; FFN channels [16, 8, 8, 8]" in dry_run(cfg, 1)
    assert _cfg(tiny_config, tiny_data, **{**over, "apex.progressive": False}).apex_stage_ks["ffn"] == [16] * 4
    # Every stage picks P and N among units never used as N: 32 heads allow 7 stages of k = 4, not 8.
    assert _cfg(tiny_config, tiny_data, **{**over, "apex.stages": 7, "train.train_steps": 8}).apex_stage_ks
    with pytest.raises(ConfigError, match=r"apex.progressive=True: stage 8 of 8 would select 8 of the 32 attention"):
        _cfg(tiny_config, tiny_data, **{**over, "apex.stages": 8, "train.train_steps": 8})
