"""APEX under tensor (with and without sequence parallelism), context, pipeline and data parallelism (CPU, gloo, fp32): the layout does not change the
mathematics (same selections at every boundary, same loss curve), and resuming mid-stage continues
exactly where an uninterrupted run would be."""

from __future__ import annotations

import pytest

from apex_workers import apex_train_worker, merge_records
from distributed_utils import run_distributed
from helpers import tiny_overrides

pytestmark = pytest.mark.slow

LOSS_TOL = 1e-5  # absolute, on losses ~5.5 (fp32; observed differences are ~1e-6 or less)
APEX = {"apex.enabled": True, "apex.init_scoring_samples": 16, "apex.ratio": 0.25, "apex.partitions": 2,
        "apex.boundaries": "[0, 2, 4]", "apex.lr_scale": 10.0, "train.train_steps": 6,
        "model.ffn_hidden_size": 128}
# Both shapes expand attention units too: 8 query groups -> k = 2 at ratio 0.25.
SHAPES = {
    "gqa": {"model.num_attention_heads": 16, "model.num_query_groups": 8},  # 2 query heads per group
    "mha": {"model.num_attention_heads": 8, "model.num_query_groups": 8},
    # One attention unit per layer (k = 1 of 4 groups, B = 1): at TP=2 the block lies on rank 0, and
    # rank 1 does no attention operator work.
    "one": {"model.num_attention_heads": 8, "model.num_query_groups": 4, "apex.attn_ratio": 0.25},
    # The paper's operator (apex.partitions=1: one M over all of P) and a budget below one attention unit
    # per layer (0.0625 x 8 groups = 0.5): one P/N pair in 2 of the 4 layers, drawn per stage.
    "paper": {"model.num_attention_heads": 8, "model.num_query_groups": 8, "apex.partitions": 1,
              "apex.attn_ratio": 0.0625},
    # Blocks wider than a rank at TP=2 (one query group and 64 FFN channels a rank): the P/N pair of
    # attention (k = 1 of 2) and the one FFN block (48 P and 48 N of 128 channels, apex.partitions=1) span
    # the two ranks, so both operators are replicated and exchange rows (expansion/spanning.py).
    "span": {"model.num_attention_heads": 4, "model.num_query_groups": 2, "apex.partitions": 1,
             "apex.attn_ratio": 0.5, "apex.ffn_ratio": 0.375},
    # Attention spans (per call) while the FFN's two blocks lie one on each rank (in place).
    "span-attn": {"model.num_attention_heads": 4, "model.num_query_groups": 2, "apex.attn_ratio": 0.5},
}
SMALL_BUDGET = {"paper": 2}  # shapes whose attention expands in fewer than all 4 layers: how many
LAYOUTS = {
    "gqa": [("tp2", 2, {"parallel.tensor_model_parallel_size": 2}),
            ("tp2sp", 2, {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True}),
            ("cp2", 2, {"parallel.context_parallel_size": 2}),
            ("pp2", 2, {"parallel.pipeline_model_parallel_size": 2}),
            ("dp2", 2, {}),
            ("tp2dp2", 4, {"parallel.tensor_model_parallel_size": 2})],
    "mha": [("tp2", 2, {"parallel.tensor_model_parallel_size": 2}),
            ("pp2", 2, {"parallel.pipeline_model_parallel_size": 2}),
            ("dp2-distopt", 2, {"parallel.use_distributed_optimizer": True}),
            ("tp2dp2", 4, {"parallel.tensor_model_parallel_size": 2})],
    "one": [("tp2", 2, {"parallel.tensor_model_parallel_size": 2})],
    "paper": [("tp2", 2, {"parallel.tensor_model_parallel_size": 2}),
              ("pp2", 2, {"parallel.pipeline_model_parallel_size": 2})],
    "span": [("tp2", 2, {"parallel.tensor_model_parallel_size": 2}),
             ("tp2dp2", 4, {"parallel.tensor_model_parallel_size": 2})],
    "span-attn": [("tp2sp", 2, {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True})],
}


def _pn(merged):
    """Per boundary and global layer: the P and N sets of both unit kinds."""
    return [{li: {kind: None if sel is None else (sel["P"], sel["N"]) for kind, sel in layer.items()}
             for li, layer in b["layers"].items()} for b in merged]


@pytest.fixture(scope="module")
def references(tiny_data, tiny_config):
    refs = {}
    for shape, extra in SHAPES.items():
        (r,) = run_distributed(apex_train_worker, 1, tiny_config, tiny_overrides(tiny_data, **{**APEX, **extra}))
        refs[shape] = r
    return refs


@pytest.mark.parametrize("shape,name,world,extra", [(s, n, w, e) for s in LAYOUTS for (n, w, e) in LAYOUTS[s]],
                         ids=[f"{s}-{n}" for s in LAYOUTS for (n, _, _) in LAYOUTS[s]])
def test_layout_invariance(references, tiny_data, tiny_config, shape, name, world, extra):
    ref = references[shape]
    over = tiny_overrides(tiny_data, **{**APEX, **SHAPES[shape], **extra})
    results = run_distributed(apex_train_worker, world, tiny_config, over)
    # Same units selected at all three boundaries, in every global layer.
    merged, ref_merged = merge_records(results), merge_records([ref])
    assert [b["step"] for b in merged] == [0, 2, 4]
    assert sorted(merged[0]["layers"]) == [0, 1, 2, 3]
    assert _pn(merged) == _pn(ref_merged)
    for b in merged:
        assert all(layer["ffn"] is not None for layer in b["layers"].values())
        attn = [li for li, layer in b["layers"].items() if layer["attn"] is not None]
        assert len(attn) == SMALL_BUDGET.get(shape, 4), (b["step"], attn)
    # The same loss curve (every rank reports the same, all-reduced loss).
    for res in results:
        assert sorted(res["losses"]) == sorted(ref["losses"])
        for step, loss in ref["losses"].items():
            assert abs(res["losses"][step] - loss) < LOSS_TOL, (name, step, res["losses"][step], loss)
        assert res["finished"]
        if "pipeline" not in str(extra):  # each pipeline stage logs the norm of its own layers' operators
            # The logged operator norm (of whole operators: TP shares summed) is the layout's too.
            assert len(ref["op_norms"]) == 3 and ref["op_norms"][0] == 0 and min(ref["op_norms"][1:]) > 1e-4
            assert res["op_norms"] == pytest.approx(ref["op_norms"], rel=1e-4), (name, res["op_norms"])
    # Where blocks are wider than a rank the operators span the ranks (every rank replicates them): both
    # kinds in "span"; in "span-attn" the attention's, while the FFN stays on the in-place path.
    spanning = {"span": ["attn", "ffn"], "span-attn": ["attn"]}.get(shape, []) if "tensor" in str(extra) else []
    for res in results:
        assert [b["spanning"] for b in res["record"]] == [spanning] * 3, (name, res["record"])
        if shape == "span-attn":
            assert all(b["in_place_groups"] == 4 for b in res["record"])  # the FFN of each of the 4 layers
    if "tensor_model_parallel_size" in str(extra):
        # Units really moved across the two TP ranks (partitions = 2 = TP: each move crosses ranks).
        moved = [perm for r in results for b in r["perms"] for layer in b.values() for perm in layer.values()
                 if perm is not None]
        assert moved, "no boundary permuted units: cross-rank expansion was not exercised"


@pytest.fixture(scope="module")
def qwen2_reference(tiny_data, tiny_config, qwen2_start):
    over = tiny_overrides(tiny_data, **{**APEX, **SHAPES["mha"], **qwen2_start})
    (ref,) = run_distributed(apex_train_worker, 1, tiny_config, over)
    return over, ref


@pytest.mark.parametrize("world,extra", [(2, {"parallel.tensor_model_parallel_size": 2}),
                                         (2, {"parallel.pipeline_model_parallel_size": 2})], ids=["tp2", "pp2"])
def test_qkv_bias_layout_invariance(qwen2_reference, tiny_config, world, extra):
    """A Qwen2 (QKV bias, imported with random biases) under TP=2 and PP=2: the same selections at every
    boundary and the same loss curve as one process; at TP=2 query groups, with their bias entries, really
    cross ranks."""
    over, ref = qwen2_reference
    results = run_distributed(apex_train_worker, world, tiny_config, over + [f"{k}={v}" for k, v in extra.items()])
    assert _pn(merge_records(results)) == _pn(merge_records([ref]))
    assert all(layer["attn"] is not None for b in merge_records(results) for layer in b["layers"].values())
    for res in results:
        assert res["finished"] and sorted(res["losses"]) == sorted(ref["losses"])
        for step, loss in ref["losses"].items():
            assert abs(res["losses"][step] - loss) < LOSS_TOL, (step, res["losses"][step], loss)
    if "tensor_model_parallel_size" in extra:
        assert any(perm is not None for r in results for b in r["perms"] for layer in b.values()
                   for perm in layer.values())


@pytest.mark.parametrize("heads,kv,world,extra", [
    # attention alone: its k = 1 of 2 query groups, whose votes no rounding can flip (the FFN's 32 of 128
    # channels by per-micro-batch rank votes can, between TP=1 and TP=2 forwards of this model)
    (4, 2, 2, {"parallel.tensor_model_parallel_size": 2, **SHAPES["span-attn"], "apex.ffn_ratio": 0}),
    (8, 8, 2, {"parallel.use_distributed_optimizer": True, "parallel.overlap_grad_reduce": True,
               "parallel.ddp_bucket_size": 2000})], ids=["tp2-span-attn", "dp2-distopt-overlap"])
def test_qkv_bias_spanning_and_overlapped_reduction(tiny_data, tiny_config, qwen2_import, heads, kv, world, extra):
    """A Qwen2 whose attention operator spans the TP pair (2 query groups, Qwen2.5-1.5B's count: the bias
    entries are exchanged with the rows), and one on the in-place path under overlapped gradient reduction
    (the bias's gradient-ready signal held with the weights'): the selections and losses of one process."""
    layout = {k: v for k, v in extra.items() if k.startswith("parallel.")}
    over = tiny_overrides(tiny_data, **{**APEX, "model.ffn_hidden_size": 128, **qwen2_import(heads, kv),
                                        **{k: v for k, v in extra.items() if k not in layout}})
    (ref,) = run_distributed(apex_train_worker, 1, tiny_config, over)
    results = run_distributed(apex_train_worker, world, tiny_config, over + [f"{k}={v}" for k, v in layout.items()])
    assert _pn(merge_records(results)) == _pn(merge_records([ref]))
    for res in results:
        assert res["finished"] and sorted(res["losses"]) == sorted(ref["losses"])
        for step, loss in ref["losses"].items():
            assert abs(res["losses"][step] - loss) < LOSS_TOL, (step, res["losses"][step], loss)
        if "parallel.tensor_model_parallel_size" in layout:
            assert [b["spanning"] for b in res["record"]] == [["attn"]] * 3
        else:  # MHA: a batch of the V and O sides with the bias, and one of the FFN, released in each of 6 steps
            assert res["gate_releases"] == 2 * 6, res["gate_releases"]


def test_ema_statistic_and_monarch_blocks_dp2_match_tp1(tiny_data, tiny_config):
    """apex.statistic=ema selects by a moving average over steps, which DP=2 gets by summing the two
    ranks' averages at the boundary: the same units as TP=1, and the same losses (here with a
    non-default Monarch block count too)."""
    over = tiny_overrides(tiny_data, **{**APEX, **SHAPES["gqa"], "apex.statistic": "ema", "apex.ema_decay": 0.6,
                                        "apex.monarch_blocks": 2})
    (ref,) = run_distributed(apex_train_worker, 1, tiny_config, over)
    results = run_distributed(apex_train_worker, 2, tiny_config, over)
    assert [b["step"] for b in ref["record"]] == [0, 2, 4]
    assert all(v == 0 for b in ref["record"] for rows in b["votes"].values() for row in rows for v in row)
    merged = merge_records(results)
    assert _pn(merged) == _pn(merge_records([ref]))
    assert all(sel is not None for b in merged for layer in b["layers"].values() for sel in layer.values())
    for res in results:
        assert res["finished"] and sorted(res["losses"]) == sorted(ref["losses"])
        for step, loss in ref["losses"].items():
            assert abs(res["losses"][step] - loss) < LOSS_TOL, (step, res["losses"][step], loss)


# Overlapped reduction with buckets of about one weight each, so megatron-core reduces buckets during the
# backward pass (one bucket, the CPU default, would start only after the last gradient).
OVERLAP = {"parallel.overlap_grad_reduce": True, "parallel.ddp_bucket_size": 2000}


@pytest.mark.parametrize("distopt", [False, True], ids=["dp2", "dp2-distopt"])
def test_overlapped_reduction_keeps_the_in_place_operator(tiny_data, tiny_config, distopt):
    """With parallel.overlap_grad_reduce the operator stays on the in-place path (its chain rule runs from
    the weights' gradient-ready signals, before their buckets are reduced): the same selections and
    losses as without overlap, at DP=2 and with the distributed optimizer (where a bucket reduced before
    the chain rule would leave each rank the wrong rows)."""
    extra = {**APEX, **SHAPES["gqa"], "parallel.use_distributed_optimizer": distopt}
    ref = run_distributed(apex_train_worker, 2, tiny_config, tiny_overrides(tiny_data, **extra))
    results = run_distributed(apex_train_worker, 2, tiny_config, tiny_overrides(tiny_data, **extra, **OVERLAP))
    assert _pn(merge_records(results)) == _pn(merge_records(ref))
    for res, base in zip(results, ref):
        assert res["finished"] and sorted(res["losses"]) == sorted(base["losses"])
        for step, loss in base["losses"].items():
            assert abs(res["losses"][step] - loss) < LOSS_TOL, (step, res["losses"][step], loss)
        # In place: every layer's operators in the runner (GQA: a V and an O side, and the FFN: 3 groups a
        # layer), released by the gate in each of the 6 steps, one batch of equal groups at a time (3 a step).
        assert [b["in_place_groups"] for b in res["record"]] == [12] * 3
        assert base["gate_releases"] is None and res["gate_releases"] == 3 * 6, res["gate_releases"]
    assert res["op_norms"] == pytest.approx(ref[0]["op_norms"], rel=1e-4)


# ---------------------------------------------------------------------- resume mid-stage
RESUME = {**APEX, **SHAPES["gqa"], "apex.boundaries": "[0, 4]", "train.train_steps": 7, "apex.lr_scale": 20.0}


@pytest.mark.parametrize("world,layout", [(1, {}), (2, {"parallel.context_parallel_size": 2}),
                                          (2, {"parallel.use_distributed_optimizer": True}),
                                          (2, {"parallel.tensor_model_parallel_size": 2, **SHAPES["span"]}),
                                          (2, {"parallel.use_distributed_optimizer": True, **OVERLAP})],
                         ids=["one-process", "cp2", "dp2-distopt", "tp2-span", "dp2-distopt-overlap"])
def test_resume_mid_stage_is_exact(tiny_data, tiny_config, tmp_path, world, layout):
    full = tiny_overrides(tiny_data, **{**RESUME, **layout, "checkpoint.save": str(tmp_path / "full")})
    cut = tiny_overrides(tiny_data, **{**RESUME, **layout, "checkpoint.save": str(tmp_path / "cut")})
    full_runs = run_distributed(apex_train_worker, world, tiny_config, full)
    # Same command twice: the first stops cleanly after step 1 (checkpoint at step 2, inside stage 1,
    # with two steps of votes for the boundary at step 4), the second resumes from that checkpoint.
    cut_runs = run_distributed(apex_train_worker, world, tiny_config, cut, 1)
    resumed = run_distributed(apex_train_worker, world, tiny_config, cut)
    assert len(full_runs) == len(cut_runs) == len(resumed) == world
    # Every rank: under CP each rank restores its own votes, operator shards and optimizer state.
    for rank, (a, b1, b2) in enumerate(zip(full_runs, cut_runs, resumed)):
        assert b1["exit"] == "stopped" and b1["step"] == 2, rank
        assert b2["first_step"] == 2 and b2["exit"] == "finished", rank
        for step in range(2):
            assert b1["losses"][step] == a["losses"][step], (rank, step)
        for step in range(2, 7):
            assert b2["losses"][step] == a["losses"][step], (rank, step, b2["losses"][step], a["losses"][step])
        # The next boundary (step 4, from votes partly gathered before the interruption) selects the same.
        assert _pn(merge_records([b2])) == _pn(merge_records([a]))[1:], rank
        # The operator and its optimizer were restored, not re-initialised.
        stop, start = b1["stop_state"], b2["start_state"]
        assert stop["op_norm"] > 1e-3 and start["op_norm"] == stop["op_norm"], rank
        assert start["op_params"] == stop["op_params"], rank
        assert start["opt_steps"] == stop["opt_steps"] == [2], rank


def test_resume_mid_stage_other_layout_refused(tiny_data, tiny_config, tmp_path):
    cut = tiny_overrides(tiny_data, **{**RESUME, "checkpoint.save": str(tmp_path / "cut")})
    (b1,) = run_distributed(apex_train_worker, 1, tiny_config, cut, 1)
    assert b1["exit"] == "stopped"
    tp2 = cut + ["parallel.tensor_model_parallel_size=2"]
    with pytest.raises(RuntimeError) as err:
        run_distributed(apex_train_worker, 2, tiny_config, tp2)
    msg = str(err.value)
    assert "middle of an APEX stage" in msg and "'tp': 1" in msg, msg[-3000:]
