"""Activation recomputation: whole layers (all, or the first N of a stage), core attention only; the
same losses and APEX selections as without it, and a memory estimate that follows (and counts APEX)."""

from __future__ import annotations

import pytest

from distributed_utils import run_distributed
from megatron_apex.cli import estimate_memory
from megatron_apex.config import ConfigError, load_config

MOCK = ["data.mock=true", "model.vocab_size=1024", "data.tokenizer_type=none", "model.num_layers=8",
        "model.hidden_size=256", "model.num_attention_heads=8", "model.ffn_hidden_size=704", "data.seq_length=512",
        "model.max_position_embeddings=512", "train.micro_batch_size=2", "train.global_batch_size=4"]


def _mem(*overrides):
    return estimate_memory(load_config(None, [*MOCK, *overrides]), 1, 1024)


def test_memory_estimate_follows_the_recomputation():
    none, full = _mem(), _mem("train.recompute_activations=true")
    blocks = [_mem("train.recompute_activations=true", f"train.recompute_num_layers={n}")["activations_gib"]
              for n in range(1, 9)]
    assert all(a > b for a, b in zip(blocks, blocks[1:]))  # every layer recomputed keeps less
    assert blocks[-1] == pytest.approx(full["activations_gib"]) and full["activations_gib"] < none["activations_gib"]
    # The unfused backend keeps the attention scores (5 a s^2 b bytes a layer in bf16, which the plan assumes
    # for a GPU run);
    # recomputing core attention drops exactly those; SDPA keeps none, so there it changes nothing.
    unfused = _mem("model.attention_backend=unfused")
    selective = _mem("model.attention_backend=unfused", "train.recompute_core_attention=true")
    scores = 5 * 8 * 512 ** 2 * 2 * 8 / 1024 ** 3
    assert unfused["activations_gib"] - none["activations_gib"] == pytest.approx(scores)
    assert selective["activations_gib"] == pytest.approx(none["activations_gib"])
    assert _mem("train.recompute_core_attention=true") == none


def test_memory_estimate_counts_apex():
    """The operators and their AdamW state (16 bytes a parameter), and on the in-place path the kept P and
    N rows (also with overlapped gradient reduction), not in selected mode (per call): 8 query groups at 0.25
    (k = 2 in 2 blocks of 1), 704 channels at 0.25 (k = 176 in 8 blocks of 22), bf16 weights (the plan of a
    GPU run), every one of the 8 layers."""
    from megatron_apex.expansion.operator import attn_operator_num_params, ffn_operator_num_params

    apex = ["apex.enabled=true", "apex.ratio=0.25"]
    plain, inplace, overlap = _mem(), _mem(*apex), _mem(*apex, "parallel.overlap_grad_reduce=true")
    per_call = _mem(*apex, "apex.mode=selected", "apex.ffn_tuned_ratio=0.5", "apex.attn_tuned_ratio=0.5")
    ops = attn_operator_num_params(2, 1, 32, 1) + ffn_operator_num_params(8, 22)
    rows = 2 * 2 * (3 * 32 + 32) * 256 + 2 * 176 * 3 * 256  # attention: qkv rows and proj columns; FFN: fc1, fc2
    assert per_call["apex_gib"] * 1024 ** 3 == pytest.approx(8 * 16 * ops)
    assert inplace["apex_gib"] * 1024 ** 3 == pytest.approx(8 * (16 * ops + 2 * rows))
    assert overlap["apex_gib"] == inplace["apex_gib"]
    assert inplace["total_gib"] - plain["total_gib"] == pytest.approx(inplace["apex_gib"])
    assert plain["apex_gib"] == 0


@pytest.mark.parametrize("overrides,field", [
    (["train.recompute_num_layers=2"], "train.recompute_num_layers=2: applies to full recomputation"),
    (["train.recompute_activations=true", "train.recompute_num_layers=9"], "exceeds the 8 layers"),
    (["train.recompute_activations=true", "train.recompute_core_attention=true"], "exclude each other"),
])
def test_recomputation_settings_are_checked(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, [*MOCK, *overrides])


@pytest.mark.slow
def test_recomputation_leaves_losses_and_apex_selections_unchanged(tiny_config, tiny_data):
    """fp32 on one CPU thread: recomputing every layer, the first layer only, or core attention gives the
    same losses and the same APEX selections (a recomputed forward casts no votes) as keeping everything."""
    from apex_workers import apex_train_worker
    from helpers import tiny_overrides

    base = {"apex.enabled": True, "apex.ratio": 0.25, "apex.boundaries": "[0, 3]", "train.train_steps": 5,
            "apex.init_scoring_samples": 8}
    runs = {}
    for name, extra in {"none": {}, "full": {"train.recompute_activations": True},
                        "first": {"train.recompute_activations": True, "train.recompute_num_layers": 1},
                        "core_attn": {"train.recompute_core_attention": True}}.items():
        (runs[name],) = run_distributed(apex_train_worker, 1, tiny_config, tiny_overrides(tiny_data, **base, **extra))
    reference = runs.pop("none")
    assert len(reference["record"]) == 2
    for name, run in runs.items():
        assert run["losses"] == reference["losses"], name
        assert run["record"] == reference["record"], name
