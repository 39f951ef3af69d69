"""APEX config validation (what tests/test_config.py may not cover): ratio, boundaries, partitions vs TP,
tuned ratios of selected mode, and the derived boundary schedule."""

from __future__ import annotations

import pytest

from megatron_apex.config import ConfigError
from megatron_apex.expansion import geometry
from megatron_apex.run import checked_config


def _cfg(tiny_config, tiny_data, world=1, **extra):
    from helpers import tiny_overrides

    return checked_config(tiny_config, tiny_overrides(tiny_data, **{"apex.enabled": True, **extra}), world)


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
    # One query group a rank cannot hold a P/N pair (k = 1 of 4 at TP=4): accepted, the operator spans the ranks.
    cfg = _cfg(tiny_config, tiny_data, 4, **{"model.num_query_groups": 4, "apex.attn_ratio": 0.25,
                                             "parallel.tensor_model_parallel_size": 4})
    assert geometry.of(cfg).spanning["attn"]
    cfg = _cfg(tiny_config, tiny_data, **{"apex.stages": 3, "train.train_steps": 9})
    assert geometry.of(cfg).boundaries == [0, 3, 6]
    cfg = _cfg(tiny_config, tiny_data, **{"apex.boundaries": "[0, 2, 5]"})
    assert geometry.of(cfg).boundaries == [0, 2, 5]
    _cfg(tiny_config, tiny_data, 2, **{"apex.partitions": 4, "parallel.tensor_model_parallel_size": 2,
                                       "model.num_query_groups": 4})
    _cfg(tiny_config, tiny_data, 2, **{"apex.partitions": 3, "parallel.tensor_model_parallel_size": 2,
                                       "model.num_query_groups": 4})  # B = 1: not a multiple of TP, and runs
    cfg = _cfg(tiny_config, tiny_data)
    assert (cfg.apex.statistic, cfg.apex.ema_decay, cfg.apex.monarch_blocks) == ("rank", 0.99, 0)
    cfg = _cfg(tiny_config, tiny_data, **{"apex.statistic": "ema", "apex.ema_decay": 0.5, "apex.monarch_blocks": 3})
    assert (cfg.apex.statistic, cfg.apex.ema_decay, cfg.apex.monarch_blocks) == ("ema", 0.5, 3)
    # Disabled APEX is not validated (its defaults may not fit a tiny run).
    from helpers import tiny_overrides

    checked_config(tiny_config, tiny_overrides(tiny_data, **{"apex.enabled": False, "apex.ratio": 0.9}), 1)
    checked_config(tiny_config, tiny_overrides(tiny_data, **{"apex.enabled": False, "apex.partitions": 0}), 1)


def test_apex_partitions_divide_the_selected_units(tiny_config, tiny_data):
    """B = gcd(apex.partitions, units, k): 32 heads at ratio 0.125 select k = 4 in 4 partitions (one P and
    one N head each) instead of rounding k down to 0 in 8. The TP degree does not change what is valid:
    TP=8 puts the 4 blocks on 4 of the 8 ranks; where a rank cannot hold one block's P/N pair (TP=32: one
    head per rank) the attention operator spans the ranks, which the dry run says. A budget below one
    unit per layer expands one P/N pair in round(ratio x units x layers) layers; a ratio that selects
    nothing at all is refused."""
    from megatron_apex.cli import dry_run

    shape = {"model.num_attention_heads": 32, "model.num_query_groups": 32, "model.ffn_hidden_size": 384,
             "apex.ratio": 0.125, "apex.partitions": 8}
    cfg = _cfg(tiny_config, tiny_data, **shape)
    assert geometry.of(cfg).units == {"attn": (32, 4, 4), "ffn": (384, 48, 8)}
    assert "attention units k=4 of 32 in 4 partitions, FFN channels k=48 of 384 in 8 partitions" in dry_run(cfg, 1)
    _cfg(tiny_config, tiny_data, 4, **shape, **{"parallel.tensor_model_parallel_size": 4})
    cfg8 = _cfg(tiny_config, tiny_data, 8, **shape, **{"parallel.tensor_model_parallel_size": 8})
    assert geometry.of(cfg8).units == geometry.of(cfg).units  # the same method at TP=8
    assert geometry.of(cfg8).spanning == {"attn": False, "ffn": False}
    assert "spans the ranks" not in dry_run(cfg8, 8)
    cfg32 = _cfg(tiny_config, tiny_data, 32, **shape, **{"parallel.tensor_model_parallel_size": 32})
    assert geometry.of(cfg32).units == geometry.of(cfg).units and geometry.of(cfg32).spanning == {
        "attn": True, "ffn": False}  # 12 channels a rank hold the FFN's 6-channel blocks
    text = dry_run(cfg32, 32)
    assert ("APEX: attention units: a block's 2 P and N units do not fit on one of the TP=32 ranks (1 each), so "
            "the operator spans the ranks") in text, text
    assert "FFN channels: a block" not in text
    cfg = _cfg(tiny_config, tiny_data, **{**shape, "apex.attn_ratio": 0})  # the FFN alone
    assert geometry.of(cfg).units == {"attn": (32, 0, 8), "ffn": (384, 48, 8)}
    assert "attention units none of 32 (not expanded)" in dry_run(cfg, 1)
    with pytest.raises(ConfigError, match="apex.ffn_ratio=0.6"):
        _cfg(tiny_config, tiny_data, **{"apex.ffn_ratio": 0.6})
    # GQA with 2 query groups in 4 layers at ratio 0.125: 0.25 groups per layer, so the budget
    # round(0.125 x 2 x 4) = 1 P/N pair is spent in one layer per stage (drawn from the seed and stage).
    cfg = _cfg(tiny_config, tiny_data, **{"model.num_query_groups": 2, "apex.ratio": 0.125})
    assert geometry.of(cfg).units["attn"] == (2, 1, 1) and geometry.of(cfg).layers == {"attn": 1, "ffn": 4}
    text = dry_run(cfg, 1)
    assert "attention units k=1 of 2 in 1 partitions in 1 of 4 layers per stage" in text, text
    assert "budget round(0.125 x 2 x 4 layers) = 1 P/N pairs per stage" in text, text
    with pytest.raises(ConfigError, match="selects no unit.*2 attention units \\(apex.ratio=0.0005"):
        _cfg(tiny_config, tiny_data, **{"model.num_query_groups": 2, "apex.ratio": 0.0005})
    # The message names the keys that decide each kind, with the ratios that would select one unit.
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_config, tiny_data, **{"model.num_query_groups": 2, "apex.attn_ratio": 0, "apex.ffn_ratio": 0.0009})
    assert "(apex.attn_ratio=0.0; >= 0.0625 selects one in one of the 4 layers, >= 0.5 one in every layer)" in \
        str(err.value), str(err.value)
    assert "(apex.ffn_ratio=0.0009; >= 0.0009766 selects one" in str(err.value), str(err.value)
    assert "apex.ratio" not in str(err.value)


def test_small_budget_layers_are_deterministic_and_spend_the_budget(tiny_config, tiny_data):
    """TinyLlama's 4 query groups x 22 layers at ratio 0.125: 11 layers per stage expand one P/N pair;
    the draw depends on train.seed and the stage only (the same at every TP/PP layout), differs
    between stages, and is shown by the dry run."""
    from megatron_apex.cli import dry_run
    from megatron_apex.expansion.geometry import budget_layers, expanded_layers

    assert budget_layers(0.125, 4, 22) == 11 and budget_layers(0.125, 32, 22) == 22
    assert budget_layers(0.1, 4, 2) == 1 and budget_layers(0.05, 4, 2) == 0
    over = {"model.num_layers": 22, "model.num_query_groups": 4, "apex.ratio": 0.125, "apex.stages": 3}
    layouts = [_cfg(tiny_config, tiny_data, w, **over, **extra) for w, extra in (
        (1, {}), (2, {"parallel.tensor_model_parallel_size": 2}), (2, {"parallel.pipeline_model_parallel_size": 2}))]
    stages = [geometry.of(layouts[0]).stage_layers(s)["attn"] for s in range(3)]
    assert all(len(layers) == 11 and layers == sorted(set(layers)) for layers in stages)
    assert len({tuple(layers) for layers in stages}) == 3  # a fresh draw per stage
    for cfg in layouts[1:]:
        assert [geometry.of(cfg).stage_layers(s)["attn"] for s in range(3)] == stages
    assert all(geometry.of(cfg).stage_layers(s)["ffn"] == list(range(22)) for cfg in layouts for s in range(3))
    assert expanded_layers(0, 0, "attn", 22, 11) == expanded_layers(0, 0, "attn", 22, 11)
    assert expanded_layers(1, 0, "attn", 22, 11) != expanded_layers(0, 0, "attn", 22, 11)
    assert f"stage 1: {stages[0]}; stage 2: {stages[1]}; stage 3: {stages[2]}" in dry_run(layouts[1], 2)
    assert "APEX: attention units: budget round(0.125 x 4 x 22 layers) = 11 P/N pairs per stage" in dry_run(layouts[0], 1)


def test_progressive_stages_keep_one_unit_per_partition(tiny_config, tiny_data):
    """Progressive halving never rounds a stage's k to 0: it stops at B (one unit per partition)."""
    from megatron_apex.cli import dry_run

    # LLaMA-2-7B's heads: 32 at 0.125 -> k = 4 in B = 4 partitions; 128 channels at 0.125 -> k = 16, B = 8.
    over = {"model.num_attention_heads": 32, "model.num_query_groups": 32, "model.hidden_size": 256,
            "apex.ratio": 0.125, "apex.partitions": 8, "apex.progressive": True, "apex.stages": 4}
    cfg = _cfg(tiny_config, tiny_data, **over)
    assert geometry.of(cfg).units["attn"] == (32, 4, 4) and geometry.of(cfg).units["ffn"] == (128, 16, 8)
    assert geometry.of(cfg).stage_ks == {"attn": [4, 4, 4, 4], "ffn": [16, 8, 8, 8]}
    assert "APEX progressive: k per stage: attention units [4, 4, 4, 4]; FFN channels [16, 8, 8, 8]" in dry_run(cfg, 1)
    assert geometry.of(_cfg(tiny_config, tiny_data, **{**over, "apex.progressive": False})).stage_ks["ffn"] == [16] * 4
    # Every stage picks P and N among units never used as N: 32 heads allow 7 stages of k = 4, not 8.
    assert geometry.of(_cfg(tiny_config, tiny_data, **{**over, "apex.stages": 7, "train.train_steps": 8})).stage_ks
    with pytest.raises(ConfigError, match=r"apex.progressive=True: stage 8 of 8 would select 8 of the 32 attention"):
        _cfg(tiny_config, tiny_data, **{**over, "apex.stages": 8, "train.train_steps": 8})
