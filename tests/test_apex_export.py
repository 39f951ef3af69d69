"""A checkpoint saved in the middle of an APEX stage under TP=2 (or DP=2) exports as the fused plain model:
loading it the exporter's way (operators joined across TP ranks, or one replica of an operator spanning
them, and fused, TP=1) gives the loss the
two-rank run computed with its operators active on the same batch."""

import pytest
from apex_export_workers import apex_callbacks, step_batch_loss
from distributed_utils import run_distributed
from helpers import tiny_overrides, train_worker

pytestmark = pytest.mark.slow


# tp2-span: with apex.partitions=1 the one attention block (2 P and 2 N of the 4 query groups) and the one
# FFN block (48 P and 48 N of 128 channels) are wider than a rank's share (2 groups, 64 channels), so every
# rank holds a replica of the operators (expansion/spanning.py): the exporter takes one replica instead of
# joining shards.
SPAN = {"parallel.tensor_model_parallel_size": 2, "apex.partitions": 1, "apex.ffn_ratio": 0.375}


@pytest.mark.parametrize("layout", [{"parallel.tensor_model_parallel_size": 2}, {}, SPAN],
                         ids=["tp2", "dp2", "tp2-span"])
def test_mid_stage_checkpoint_exports_fused(tiny_data, tiny_config, tmp_path, layout):
    ckpt = tmp_path / "ckpt"
    overrides = tiny_overrides(tiny_data, **{
        "apex.enabled": True, "apex.boundaries": "[0, 3]", "apex.ratio": 0.25, "apex.partitions": 2,
        "apex.init_scoring_samples": 16, "apex.lr_scale": 30.0, "model.num_query_groups": 4,
        "apex.attn_ratio": 0.5,  # 2 of the 4 query groups in P (and 2 in N): 2 partitions, one per TP rank
        "train.train_steps": 6, "checkpoint.save": str(ckpt), "checkpoint.save_interval": 5, **layout})
    result = run_distributed(train_worker, 2, tiny_config, overrides, apex_callbacks)[0]
    # Step 5's loss was computed by the model of the checkpoint at step 5 with operators active.
    fused = run_distributed(step_batch_loss, 1, str(ckpt / "iter_0000005"), tiny_config, overrides, 5)[0]
    # fp32, different TP layout and the operators fused into the weights: equal to rounding.
    assert abs(fused - result["losses"][5]) < 1e-5 * abs(result["losses"][5])
    # ...and the operators mattered: the base weights alone give a clearly different loss.
    unfused = run_distributed(step_batch_loss, 1, str(ckpt / "iter_0000005"), tiny_config, overrides, 5, False)[0]
    assert abs(unfused - result["losses"][5]) > 100 * abs(fused - result["losses"][5]) + 1e-5


def test_mid_stage_qwen2_checkpoint_exports_fused_with_its_bias(tiny_data, tiny_config, tmp_path, qwen2_start):
    """The same under TP=2 for a Qwen2 (QKV bias, random biases from the import): the export fuses the V bias
    entries with their rows; an export that left the bias as stored would compute another loss."""
    ckpt = tmp_path / "ckpt"
    overrides = tiny_overrides(tiny_data, **{
        "apex.enabled": True, "apex.boundaries": "[0, 3]", "apex.ratio": 0.25, "apex.partitions": 2,
        "apex.init_scoring_samples": 16, "apex.lr_scale": 30.0, "model.num_attention_heads": 8,
        "model.num_query_groups": 8, "model.ffn_hidden_size": 128, "train.train_steps": 6,
        "checkpoint.save": str(ckpt), "checkpoint.save_interval": 5, "parallel.tensor_model_parallel_size": 2,
        **qwen2_start})
    result = run_distributed(train_worker, 2, tiny_config, overrides, apex_callbacks)[0]
    fused = run_distributed(step_batch_loss, 1, str(ckpt / "iter_0000005"), tiny_config, overrides, 5)[0]
    assert abs(fused - result["losses"][5]) < 1e-5 * abs(result["losses"][5])
    stale = run_distributed(step_batch_loss, 1, str(ckpt / "iter_0000005"), tiny_config, overrides, 5, "weights")[0]
    assert abs(stale - result["losses"][5]) > 10 * abs(fused - result["losses"][5]) + 1e-6, (stale, fused)
