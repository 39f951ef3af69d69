"""APEX on a CUDA GPU (single process, NCCL): function preservation in fp32 and bf16, and a bf16
training run through two stage boundaries to a plain final checkpoint.

Skipped on machines without CUDA (CI has none); run with ``pytest -m gpu tests/test_gpu.py`` on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from apex_workers import apex_train_worker, function_preservation_worker, plain_state_worker
from distributed_utils import run_distributed
from helpers import tiny_overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

APEX = {"apex.enabled": True, "apex.init_scoring_samples": 16, "apex.ratio": 0.25, "apex.partitions": 2}
SHAPE = {"model.num_attention_heads": 8, "model.num_query_groups": 8, "model.ffn_hidden_size": 128}


def _over(data, **extra):
    return tiny_overrides(data, **{**SHAPE, **APEX, **extra})


# First in the file: the GPU sessions that ran this file ran out of time before reaching it at the end.
def test_resume_mid_stage_on_gpu(tiny_data, tiny_config, tmp_path):
    """Stop inside a stage whose operator runs from CUDA graphs, resume, and follow the uninterrupted run."""
    base = {"train.train_steps": 9, "train.precision": "fp32", "apex.boundaries": "[0, 6]", "apex.lr_scale": 20.0}
    (a,) = run_distributed(apex_train_worker, 1, tiny_config,
                           _over(tiny_data, **{**base, "checkpoint.save": str(tmp_path / "full")}))
    cut = _over(tiny_data, **{**base, "checkpoint.save": str(tmp_path / "cut")})
    (b1,) = run_distributed(apex_train_worker, 1, tiny_config, cut, 3)
    (b2,) = run_distributed(apex_train_worker, 1, tiny_config, cut)
    assert b1["exit"] == "stopped" and b2["first_step"] == 4 and b2["exit"] == "finished"
    assert b1["graph_replays"] > 0 and b2["graph_replays"] > 0
    losses = {**b1["losses"], **b2["losses"]}
    diffs = {s: abs(losses[s] - a["losses"][s]) / abs(a["losses"][s]) for s in a["losses"]}
    print("relative loss differences after resume:", diffs)
    assert max(diffs.values()) < 1e-5
    assert b2["start_state"]["op_params"] == b1["stop_state"]["op_params"]


@pytest.mark.parametrize("precision, fuse_tol", [("fp32", 1e-6), ("bf16", 2e-2)])
def test_function_preservation_on_gpu(tiny_data, tiny_config, precision, fuse_tol):
    over = _over(tiny_data, **{"apex.boundaries": "[0, 3]", "apex.lr_scale": 50.0, "train.train_steps": 6,
                               "train.precision": precision})
    (r,) = run_distributed(function_preservation_worker, 1, tiny_config, over)
    print(precision, {k: r[k] for k in ("with_op", "fused", "inserted", "removed", "with_op2", "final_fused")})
    assert r["op_norm"] > 1e-3 and r["op_norm2"] > 1e-3
    # Inserting zero-initialised operators changes nothing, in either precision.
    assert r["inserted"] == r["removed"], (r["inserted"], r["removed"])
    # Fusing rounds W_eff to the parameter dtype: tight in fp32, bf16 rounding in bf16.
    assert abs(r["fused"] - r["with_op"]) / abs(r["with_op"]) < fuse_tol
    assert abs(r["final_fused"] - r["with_op2"]) / abs(r["with_op2"]) < fuse_tol
    assert r["ops_left"] == 0


def test_bf16_training_through_two_boundaries(tiny_data, tiny_config, tmp_path):
    from megatron.core import dist_checkpointing

    steps = {"train.train_steps": 12, "train.precision": "bf16"}
    plain = tiny_overrides(tiny_data, **{**SHAPE, **steps, "checkpoint.save": str(tmp_path / "plain")})
    apex = _over(tiny_data, **{**steps, "apex.boundaries": "[0, 4, 8]", "apex.lr_scale": 20.0,
                               "checkpoint.save": str(tmp_path / "apex")})
    (p,) = run_distributed(plain_state_worker, 1, tiny_config, plain)
    (a,) = run_distributed(apex_train_worker, 1, tiny_config, apex)
    print("plain", p["losses"], "\napex ", a["losses"])
    losses = [a["losses"][s] for s in sorted(a["losses"])]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert a["losses"][0] == p["losses"][0]  # zero-initialised operators: the same first step
    assert losses[-1] < losses[0] - 0.5  # it learns
    assert a["finished"] and len(a["record"]) == 3  # selections at the three boundaries
    # Each stage captures its graphs after one eager step (steps 1, 5, 9). Stages of equal shape leave
    # the same memory allocated: nothing a stage allocates for its graphs outlives it (a capture stream
    # per stage kept a cuBLAS workspace per stage).
    mem = a["memory"]
    print("allocated after steps 3, 7, 11 (MiB):", [mem[s] / 2**20 for s in (3, 7, 11)])
    assert abs(mem[7] - mem[3]) < 4 << 20 and abs(mem[11] - mem[7]) < 4 << 20
    shapes = [{k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(r["checkpoint"]).items()}
              for r in (p, a)]
    assert shapes[0] == shapes[1]  # the final APEX checkpoint is a plain model's


def test_cuda_graphs_equal_eager(tiny_data, tiny_config):
    """The operator replayed from CUDA graphs computes what eager execution computes."""
    base = {"train.train_steps": 8, "train.precision": "fp32", "apex.boundaries": "[0, 4]", "apex.lr_scale": 20.0}
    runs = {g: run_distributed(apex_train_worker, 1, tiny_config,
                               _over(tiny_data, **{**base, "apex.cuda_graphs": g}))[0] for g in (True, False)}
    graphed, eager = runs[True], runs[False]
    # Stage 1: step 0 eager, steps 1-3 replayed; stage 2: step 4 eager, 5-7 replayed.
    assert graphed["graph_replays"] == 6 and eager["graph_replays"] == 0
    print({s: (graphed["losses"][s], eager["losses"][s]) for s in sorted(eager["losses"])})
    for s, loss in eager["losses"].items():
        assert abs(graphed["losses"][s] - loss) <= 1e-6 * abs(loss), (s, graphed["losses"][s], loss)
    assert [r["layers"] for r in graphed["record"]] == [r["layers"] for r in eager["record"]]
