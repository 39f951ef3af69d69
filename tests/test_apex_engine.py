"""APEX inside the training loop (single process, fp32, CPU, gloo): function preservation at
operator insertion and fuse, a plain model after the final fuse, selected mode, progressive mode."""

from __future__ import annotations

import re

import pytest

from apex_workers import (apex_poisoned_worker, apex_train_worker, apex_train_worker_fc1_hook,
                          function_preservation_worker, plain_state_worker, selected_mode_worker)
from distributed_utils import run_distributed
from helpers import tiny_overrides

APEX = {"apex.enabled": True, "apex.init_scoring_samples": 16, "apex.ratio": 0.25, "apex.partitions": 2}
# MHA with 8 query groups, so attention units are expanded too (k = 2 of 8 at ratio 0.25).
SHAPE = {"model.num_attention_heads": 8, "model.num_query_groups": 8, "model.ffn_hidden_size": 128}


def _over(data, **extra):
    return tiny_overrides(data, **{**SHAPE, **APEX, **extra})


def test_function_preservation_insert_exact_fuse_tight(tiny_data, tiny_config):
    # lr_scale 50: the operator really moves (M != 0) within a 3-step stage.
    over = _over(tiny_data, **{"apex.boundaries": "[0, 3]", "apex.lr_scale": 50.0, "train.train_steps": 6})
    (r,) = run_distributed(function_preservation_worker, 1, tiny_config, over)
    # Stage 1 trained a nonzero operator.
    assert r["op_norm"] > 1e-3, r["op_norm"]
    # Fuse: W <- W_eff, operators removed; the loss on the fixed batch is unchanged up to rounding.
    rel = abs(r["fused"] - r["with_op"]) / abs(r["with_op"])
    assert rel < 1e-6, (r["with_op"], r["fused"], rel)
    # Fresh operators (after selection and the balancing permutation) change the loss by exactly 0.
    assert r["n_fresh_ops"] > 0
    assert r["inserted"] == r["removed"], (r["inserted"], r["removed"])
    # The permutation of the boundary preserves the function too (rounding only).
    assert abs(r["inserted"] - r["fused"]) / abs(r["fused"]) < 1e-6
    # Stage 2 trains its operator; the final fuse leaves a plain model computing the same loss.
    assert r["op_norm2"] > 1e-3
    assert r["ops_left"] == 0
    assert abs(r["final_fused"] - r["with_op2"]) / abs(r["with_op2"]) < 1e-6
    # Plain LLaMA parameters only after the final fuse (no operator keys in the module tree).
    assert not [k for k in r["state_keys"] if "monarch" in k or "alpha" in k or "beta" in k or "delta" in k]


def test_function_preservation_with_qkv_bias(tiny_data, tiny_config, qwen2_start):
    """With Qwen2's QKV bias the bias entries of a query group move with its rows and are expanded and fused
    with them: inserting fresh operators changes nothing, the boundary's moves and fuse keep the function."""
    over = _over(tiny_data, **{"apex.boundaries": "[0, 3]", "apex.lr_scale": 50.0, "train.train_steps": 6,
                               **qwen2_start})
    (r,) = run_distributed(function_preservation_worker, 1, tiny_config, over)
    assert r["op_norm"] > 1e-3 and r["n_fresh_ops"] > 0
    assert abs(r["fused"] - r["with_op"]) / abs(r["with_op"]) < 1e-6
    assert r["inserted"] == r["removed"], (r["inserted"], r["removed"])
    assert abs(r["inserted"] - r["fused"]) / abs(r["fused"]) < 1e-6
    assert r["bias_fused"] == 4 and r["bias_moved"] > 0  # not vacuous: the fuse and the moves touched the biases
    assert r["op_norm2"] > 1e-3 and r["ops_left"] == 0
    assert abs(r["final_fused"] - r["with_op2"]) / abs(r["with_op2"]) < 1e-6
    assert sum(k.endswith("linear_qkv.bias") for k in r["state_keys"]) == 4


def test_final_checkpoint_is_plain(tiny_data, tiny_config, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_apex.training.checkpoint import read_common

    steps = {"train.train_steps": 6}
    plain = tiny_overrides(tiny_data, **{**SHAPE, **steps, "checkpoint.save": str(tmp_path / "plain")})
    apex = _over(tiny_data, **{**steps, "apex.boundaries": "[0, 3]", "apex.lr_scale": 20.0,
                               "checkpoint.save": str(tmp_path / "apex")})
    (p,) = run_distributed(plain_state_worker, 1, tiny_config, plain)
    (a,) = run_distributed(apex_train_worker, 1, tiny_config, apex)
    # Inserting the first operators does not change the step-0 loss at all.
    assert a["losses"][0] == p["losses"][0]
    assert a["losses"] != p["losses"]  # ... but APEX does train differently afterwards
    assert a["finished"]
    meta_p = dist_checkpointing.load_tensors_metadata(p["checkpoint"])
    meta_a = dist_checkpointing.load_tensors_metadata(a["checkpoint"])
    shapes_p = {k: tuple(v.global_shape) for k, v in meta_p.items()}
    shapes_a = {k: tuple(v.global_shape) for k, v in meta_a.items()}
    assert shapes_a == shapes_p  # model and optimizer tensors: same keys, same global shapes
    model_keys = [k for k in shapes_a if not k.startswith("optimizer")]
    assert model_keys and all("apex" not in k and "monarch" not in k for k in model_keys)
    common = read_common(a["checkpoint"])
    assert common["apex"]["finished"] is True and common["apex"]["stage"] == 2
    assert "apex" not in read_common(p["checkpoint"])


def _expected_selected_counts(n_attn, n_ffn, ratio, attn_tuned, ffn_tuned, parts, h, d, r):
    """Trainable parameters of deltas and operators per layer, counted from the method's formulas."""
    from megatron_apex.expansion.operator import attn_operator_num_params, ffn_operator_num_params

    total = 0
    for kind, n, tuned in (("attn", n_attn, attn_tuned), ("ffn", n_ffn, ffn_tuned)):
        k = int(ratio * n + 1e-9) // parts[kind] * parts[kind]
        if k == 0:
            continue
        u = int(tuned * n + 1e-9)  # P + N + E
        if kind == "attn":
            total += u * (r + 2) * d * h + h * u * r * d  # Q,K,V rows and O columns of u query groups
            total += attn_operator_num_params(parts[kind], k // parts[kind], d, r)
        else:
            total += 2 * u * h + h * u  # gate and up rows, down columns
            total += ffn_operator_num_params(parts[kind], k // parts[kind])
    return total


def test_selected_mode_trains_only_intended_parameters(tiny_data, tiny_config):
    over = _over(tiny_data, **{"apex.mode": "selected", "apex.boundaries": "[0]", "train.train_steps": 4,
                               "apex.attn_tuned_ratio": 0.75, "apex.ffn_tuned_ratio": 0.625})
    (r,) = run_distributed(selected_mode_worker, 1, tiny_config, over)
    params = r["params"]
    trained = {n for n in params if "embedding" in n or "output_layer" in n}
    assert trained, list(params)
    for name, p in params.items():
        if name in trained:
            assert p["requires_grad"] and p["grad_nonzero"] and p["changed"], name
        else:  # base linear weights and layer norms: frozen, no gradient, unchanged
            assert not p["requires_grad"] and not p["grad_nonzero"] and not p["changed"], name
    assert r["deltas"] and all(x["grad"] for x in r["deltas"])
    assert r["ops"] and any(x["grad"] for x in r["ops"])  # Monarch: the zero factor gets grads first
    # Independent count of the trainable share.
    h, n_layers = 64, 4
    per_layer = _expected_selected_counts(r["n"]["attn"], r["n"]["ffn"], 0.25, 0.75, 0.625, r["parts"],
                                          h, 8, 1)
    assert sum(x["numel"] for x in r["deltas"] + r["ops"]) == n_layers * per_layer
    total = sum(p["numel"] for p in params.values())
    base_trainable = sum(params[n]["numel"] for n in trained)
    expected = (base_trainable + n_layers * per_layer) / total
    assert r["fraction"] == pytest.approx(expected, rel=1e-12)
    assert 0 < r["fraction"] < 1
    # E units exist and are disjoint from P/N positions.
    sel = r["record"][0]["layers"][0]["ffn"]
    assert len(sel["E"]) == int(0.625 * 128) - 2 * len(sel["P"]) > 0
    assert not set(sel["E"]) & (set(sel["p_pos"]) | set(sel["n_pos"]))


def test_selected_mode_with_qkv_bias(tiny_data, tiny_config, qwen2_start):
    """Selected mode on a Qwen2: the QKV bias is frozen with its weights, and the tuned groups' bias entries get
    a delta of their own (one per Q, K and V row of a tuned group), which trains."""
    over = _over(tiny_data, **{"apex.mode": "selected", "apex.boundaries": "[0]", "train.train_steps": 4,
                               "apex.attn_tuned_ratio": 0.75, "apex.ffn_tuned_ratio": 0.625, **qwen2_start})
    (r,) = run_distributed(selected_mode_worker, 1, tiny_config, over)
    biases = {n: p for n, p in r["params"].items() if n.endswith("linear_qkv.bias")}
    assert len(biases) == 4 and not any(p["requires_grad"] or p["changed"] for p in biases.values())
    assert r["deltas"] and all(x["grad"] for x in r["deltas"])
    per_layer = _expected_selected_counts(r["n"]["attn"], r["n"]["ffn"], 0.25, 0.75, 0.625, r["parts"], 64, 8, 1)
    tuned_groups = int(0.75 * 8)
    assert sum(x["numel"] for x in r["deltas"] + r["ops"]) == 4 * (per_layer + tuned_groups * 3 * 8)


def test_selected_mode_under_tensor_parallelism(tiny_data, tiny_config, caplog):
    """Selected mode at TP=2 passes its first boundary (whose log line counts the trainable parameters
    with a collective every rank joins) and counts what TP=1 counts: sharded parameters summed over
    the ranks, replicated ones (the norms) once."""
    over = _over(tiny_data, **{"apex.mode": "selected", "apex.boundaries": "[0]", "train.train_steps": 4,
                               "apex.attn_tuned_ratio": 0.75,
                               "apex.ffn_tuned_ratio": 0.625})
    (one,) = run_distributed(selected_mode_worker, 1, tiny_config, over, timeout=240)
    two = run_distributed(selected_mode_worker, 2, tiny_config, over + ["parallel.tensor_model_parallel_size=2"],
                          timeout=240)
    assert 0 < one["fraction"] < 1
    assert [r["fraction"] for r in two] == [pytest.approx(one["fraction"], rel=1e-12)] * 2
    assert two[0]["record"] == two[1]["record"]


def test_selected_mode_share_with_tied_embeddings_under_pipeline_parallelism(tiny_data, tiny_config):
    """With tied embeddings the last pipeline stage holds a copy of the embedding as its output layer;
    the trainable share counts the matrix once, as at PP=1 (it used to count it twice)."""
    over = _over(tiny_data, **{"apex.mode": "selected", "apex.boundaries": "[0]", "train.train_steps": 4,
                               "apex.attn_tuned_ratio": 0.75, "apex.ffn_tuned_ratio": 0.75,
                               "model.tie_embeddings": True})
    (one,) = run_distributed(selected_mode_worker, 1, tiny_config, over, timeout=240)
    two = run_distributed(selected_mode_worker, 2, tiny_config, over + ["parallel.pipeline_model_parallel_size=2"],
                          timeout=240)
    assert 0 < one["fraction"] < 1
    assert [r["fraction"] for r in two] == [pytest.approx(one["fraction"], rel=1e-12)] * 2


def test_progressive_halves_k_and_excludes_former_n(tiny_data, tiny_config):
    over = _over(tiny_data, **{"apex.progressive": True, "apex.boundaries": "[0, 2, 4]", "train.train_steps": 6,
                               "apex.lr_scale": 10.0})
    (r,) = run_distributed(apex_train_worker, 1, tiny_config, over)
    rec, perms = r["record"], r["perms"]
    assert [b["step"] for b in rec] == [0, 2, 4]
    moved = False
    for li in rec[0]["layers"]:
        for kind, n in (("ffn", 128), ("attn", 8)):
            k0 = int(0.25 * n)
            former_n = set()  # positions (in the current unit order) of units already used as N
            for s, b in enumerate(rec):
                sel = b["layers"][li][kind]
                k = max(2, (k0 >> s) // 2 * 2)  # halved each stage, rounded to the 2 partitions, at least 2
                assert len(sel["P"]) == len(sel["N"]) == k, (li, kind, s)
                assert not set(sel["P"]) & former_n and not set(sel["N"]) & former_n, (li, kind, s)
                perm = perms[s][li][kind]
                inv = list(range(n))
                if perm is not None:
                    moved = True
                    for new, old in enumerate(perm):
                        inv[old] = new
                assert {inv[u] for u in sel["N"]} == set(sel["n_pos"])  # N's new positions
                former_n = {inv[u] for u in former_n | set(sel["N"])}
    assert moved  # otherwise the index mapping across stages was not exercised


@pytest.mark.slow
@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2-bias"])
def test_inplace_path_equals_per_call_path(tiny_config, tiny_data, bias, request):
    """The once-per-step in-place operator (mode all) computes what building W_eff in every linear
    call computes: same losses through two boundaries (fp32; only summation order differs); with a QKV
    bias too (its entries expanded as a column of the V rows on both paths)."""
    from apex_export_workers import apex_callbacks
    from apex_workers import functional_path_callbacks
    from distributed_utils import run_distributed
    from helpers import tiny_overrides, train_worker

    shape = ({"model.num_query_groups": 4} if not bias else
             {"model.num_attention_heads": 8, "model.num_query_groups": 8, "model.ffn_hidden_size": 128,
              **request.getfixturevalue("qwen2_start")})
    overrides = tiny_overrides(tiny_data, **{
        "apex.enabled": True, "apex.boundaries": "[0, 2, 4]", "apex.ratio": 0.25, "apex.partitions": 2,
        "apex.init_scoring_samples": 16, "apex.lr_scale": 30.0, **shape,
        "train.train_steps": 6, "train.eval_interval": 3, "train.eval_steps": 1})
    fast = run_distributed(train_worker, 1, tiny_config, overrides, apex_callbacks)[0]
    ref = run_distributed(train_worker, 1, tiny_config, overrides, functional_path_callbacks)[0]
    assert max(abs(fast["losses"][k] - ref["losses"][k]) for k in ref["losses"]) < 1e-5
    assert fast["valid"] and max(abs(fast["valid"][k] - ref["valid"][k]) for k in ref["valid"]) < 1e-5


@pytest.mark.slow
def test_activation_recompute_counts_each_micro_batch_once(tiny_data, tiny_config):
    """Full activation recomputation re-runs every layer's forward inside the backward, which fires the
    scoring hooks a second time; those must not vote: votes, selections and losses are those of the
    same run without recomputation."""
    base = {"apex.boundaries": "[0, 2, 4]", "train.train_steps": 5}
    (ref,) = run_distributed(apex_train_worker, 1, tiny_config, _over(tiny_data, **base))
    (rec,) = run_distributed(apex_train_worker, 1, tiny_config,
                             _over(tiny_data, **base, **{"train.recompute_activations": True}))
    assert [b["step"] for b in rec["record"]] == [0, 2, 4]
    assert any(v != 0 for b in ref["record"][1:] for rows in b["votes"].values() for row in rows for v in row)
    assert [b["votes"] for b in rec["record"]] == [b["votes"] for b in ref["record"]]
    assert [b["layers"] for b in rec["record"]] == [b["layers"] for b in ref["record"]]
    assert max(abs(rec["losses"][k] - ref["losses"][k]) for k in ref["losses"]) < 1e-5


@pytest.mark.slow
def test_score_interval_takes_statistics_every_nth_step_of_a_stage(tiny_data, tiny_config):
    """apex.score_interval=n: only steps n apart from a stage's start vote. With n = 4 a stage of four steps
    votes in its first step alone: the votes equal those of a one-step stage at the same step (scoring does
    not change training, so both runs are the same up to there); with n = 2 the stages [0, 3) and [3, 7)
    vote in steps 0, 2 and 3, 5."""
    (one,) = run_distributed(apex_train_worker, 1, tiny_config,
                             _over(tiny_data, **{"apex.boundaries": "[0, 1, 4]", "train.train_steps": 5}))
    (every4,) = run_distributed(apex_train_worker, 1, tiny_config,
                                _over(tiny_data, **{"apex.boundaries": "[0, 4]", "train.train_steps": 5,
                                                    "apex.score_interval": 4}))
    assert [b["step"] for b in one["record"]] == [0, 1, 4] and [b["step"] for b in every4["record"]] == [0, 4]
    assert one["record"][1]["vote_steps"] == every4["record"][1]["vote_steps"] == 1
    assert any(v != 0 for rows in every4["record"][1]["votes"].values() for row in rows for v in row)
    assert every4["record"][1]["votes"] == one["record"][1]["votes"]
    (every2,) = run_distributed(apex_train_worker, 1, tiny_config,
                                _over(tiny_data, **{"apex.boundaries": "[0, 3, 7]", "train.train_steps": 8,
                                                    "apex.score_interval": 2}))
    assert [(b["step"], b["vote_steps"]) for b in every2["record"][1:]] == [(3, 2), (7, 2)]
    assert every2["finished"]


@pytest.mark.slow
def test_ffn_statistic_from_megatron_silu_equals_recomputed(tiny_data, tiny_config):
    """The FFN statistic recorded from the SiLU megatron-core computes equals the fallback that
    recomputes SiLU from linear_fc1's output: identical votes and selections."""
    base = {"apex.boundaries": "[0, 2]", "train.train_steps": 3}
    (own,) = run_distributed(apex_train_worker, 1, tiny_config, _over(tiny_data, **base))
    (hook,) = run_distributed(apex_train_worker_fc1_hook, 1, tiny_config, _over(tiny_data, **base))
    assert own["silu_recorded"] == [True] * 4 and hook["silu_recorded"] == [False] * 4
    assert any(v != 0 for row in own["record"][1]["votes"]["ffn"] for v in row)
    assert [b["votes"] for b in own["record"]] == [b["votes"] for b in hook["record"]]
    assert [b["layers"] for b in own["record"]] == [b["layers"] for b in hook["record"]]


def test_initial_scoring_may_read_more_samples_than_the_run_trains_on(tiny_config, tmp_path):
    """apex.init_scoring_samples beyond one epoch of a small training set (instruction tuning): the training
    set is built to hold the scoring pass as well (it used to end after the run's own 16 samples' epoch,
    and the pass failed with an IndexError in megatron-core's dataset)."""
    from helpers import make_indexed_dataset

    small = make_indexed_dataset(str(tmp_path / "small_text_document"), n_docs=12)  # about 20 samples
    over = _over(small, **{"apex.boundaries": "[0, 1]", "train.train_steps": 2, "apex.init_scoring_samples": 60})
    (r,) = run_distributed(apex_train_worker, 1, tiny_config, over)
    assert r["finished"] and [b["step"] for b in r["record"]] == [0, 1]
    assert all(loss == loss for loss in r["losses"].values())


def test_skipped_step_casts_no_votes(tiny_data, tiny_config):
    """With train.nan_policy=skip a step with NaN activations is dropped, and so are its votes: the
    boundary selects on the other steps' (finite) statistics instead of failing on NaN."""
    over = _over(tiny_data, **{"apex.boundaries": "[0, 4]", "train.train_steps": 6, "train.nan_policy": "skip",
                               "apex.init_scoring_samples": 0})
    (r,) = run_distributed(apex_poisoned_worker, 1, tiny_config, over, 2)
    assert r["exit"] == "finished"
    assert r["losses"][2] != r["losses"][2]  # NaN: the poisoned step really was non-finite
    rec = r["record"][1]  # the boundary at step 4: of stage 1's steps 0-3, only 0, 1 and 3 vote
    assert rec["step"] == 4 and rec["vote_steps"] == 3
    assert any(v != 0 for row in rec["votes"]["attn"] for v in row)


def test_votes_are_ranked_before_the_gradient_reduction(tiny_data, tiny_config):
    """The step's votes are ranked in the trainer's hook before the gradient reduction
    (Callback.before_grad_reduction, which the trainer calls from megatron-core's finalize_model_grads);
    the engine wraps nothing of megatron-core's, so training started again on the same trainer (a second
    on_train_start) cannot rank an empty step over them."""
    import types

    from megatron_apex.config import load_config
    from megatron_apex.expansion.engine import ApexCallback

    cb = ApexCallback(load_config(tiny_config, _over(tiny_data)))

    def finalize(*args):
        pass

    trainer = types.SimpleNamespace(optimizer=object(), ctx=types.SimpleNamespace(dp_group=None),
                                    tconfig=types.SimpleNamespace(finalize_model_grads_func=finalize))
    ranked = iter([{"ffn": "votes"}, None])
    cb.recorder.rank_step = lambda ctx: next(ranked)
    cb.on_train_start(trainer)
    cb.on_train_start(trainer)
    assert trainer.tconfig.finalize_model_grads_func is finalize
    cb.recorder.recording = True
    cb.before_grad_reduction(trainer)
    assert cb.recorder.ranked == {"ffn": "votes"}


# ---------------------------------------------------------------------- apex.statistic
def _scoring_callback(tiny_config, tiny_data, statistic, **extra):
    """An ApexCallback on a stand-in model of one layer (8 attention units, k = 2 of them in 2 partitions),
    whose statistics the test records by hand, as the hooks would; returns (callback, ctx)."""
    import types

    import torch

    from megatron_apex.config import load_config
    from megatron_apex.expansion.engine import ApexCallback

    cb = ApexCallback(load_config(tiny_config, _over(tiny_data, **{"apex.statistic": statistic, **extra})))
    ns, lin = types.SimpleNamespace, lambda: torch.nn.Linear(1, 1)
    layer = ns(layer_number=1, self_attention=ns(linear_qkv=lin(), linear_proj=lin()),
               mlp=ns(linear_fc1=lin(), linear_fc2=lin(), config=ns(use_te_activation_func=True)))
    ctx = ns(rank=0, tp_size=1, cp_size=1, device=torch.device("cpu"))
    cb.on_model_built(ns(ctx=ctx), ns(decoder=ns(layers=[layer])))
    assert cb.boundary.n["attn"] == 8 and cb.boundary.k("attn") == (2, 1)
    return cb, ctx


def _feed_step(cb, ctx, attn_norms):
    """One step: the attention units' L2 norms per micro-batch (the hooks record squared norms; the FFN
    channels all tie), then what the step's end does with them."""
    import torch

    for norms in attn_norms:
        cb.recorder._stats[0]["attn"].append(torch.tensor(norms, dtype=torch.float32).square())
        cb.recorder._stats[0]["ffn"].append(torch.ones(cb.boundary.n["ffn"]))
    cb.recorder.commit(cb.recorder.rank_step(ctx))


def _select_attn(cb):
    """(P, N) the boundary would select for the layer's attention units from the accumulated scores."""
    entry = cb.layers[0]
    cb.boundary.stage = max(cb.boundary.stage, 1)  # as at a boundary: the stage's layers are drawn before selecting
    cb.boundary.set_stage_layers()
    cb.boundary.select(entry, 0, "attn", cb.recorder.votes["attn"][0], cb.recorder.raw["attn"][0])
    return entry.selection["attn"]["P"].tolist(), entry.selection["attn"]["N"].tolist()


def test_rank_statistic_breaks_vote_ties_by_summed_norm(tiny_config, tiny_data):
    """Units 0 and 1 both get one -1 vote; unit 0's norms sum to less (5.9 < 6.2) although its squared
    norms sum to more (34.81 > 19.24): the tie-break is the accumulated (not squared) norm."""
    import torch

    cb, ctx = _scoring_callback(tiny_config, tiny_data, "rank")
    _feed_step(cb, ctx, [[0, 3, 1, 4, 5, 6, 10, 11], [5.9, 3.2, 1, 4, 5, 6, 10, 11]])
    assert cb.recorder.votes["attn"][0].tolist() == [-1, -1, -2, 0, 0, 0, 2, 2]
    expected = torch.tensor([5.9, 6.2, 2, 8, 10, 12, 20, 22], dtype=torch.float64)
    torch.testing.assert_close(cb.recorder.raw["attn"][0], expected, rtol=1e-6, atol=1e-6)
    assert _select_attn(cb) == ([6, 7], [0, 2])


# Three micro-batches of one step where votes and summed norms disagree: unit 0 and unit 1 are each the
# largest once by far (sums 50.3 and 50.5) but the smallest in the other micro-batches.
VOTES_VS_NORMS = [[50, 0.1, 2, 3, 4, 5, 6, 7], [0.1, 50, 2, 3, 4, 5, 6, 7], [0.2, 0.4, 2, 3, 4, 5, 6, 7]]


def test_norm_statistic_selects_by_summed_norm(tiny_config, tiny_data):
    import torch

    rank, ctx = _scoring_callback(tiny_config, tiny_data, "rank")
    _feed_step(rank, ctx, VOTES_VS_NORMS)
    assert rank.recorder.votes["attn"][0].tolist() == [-1, -1, -2, 0, 0, 0, 1, 3]
    assert _select_attn(rank) == ([6, 7], [0, 2])
    norm, ctx = _scoring_callback(tiny_config, tiny_data, "norm")
    _feed_step(norm, ctx, VOTES_VS_NORMS)
    assert not norm.recorder.votes["attn"].any() and not norm.recorder.votes["ffn"].any()  # no voting at all
    sums = torch.tensor(VOTES_VS_NORMS, dtype=torch.float64).sum(0)  # [50.3, 50.5, 6, 9, 12, 15, 18, 21]
    torch.testing.assert_close(norm.recorder.raw["attn"][0], sums, rtol=1e-6, atol=1e-6)
    assert _select_attn(norm) == ([0, 1], [2, 3])


# Two steps (step sums of the norms, each over two equal micro-batches): unit 0 is strong in the first
# step, unit 1 in the second; units 5 and 6 are weak overall but grow, unit 7 fades.
EMA_STEPS = [[10, 0, 3, 3, 3, 0, 0.5, 4], [0, 8, 6, 3, 3, 2.4, 2, 0.2]]


def test_ema_statistic_weights_later_steps(tiny_config, tiny_data):
    import torch

    norm, ctx = _scoring_callback(tiny_config, tiny_data, "norm")
    ema, ctx = _scoring_callback(tiny_config, tiny_data, "ema", **{"apex.ema_decay": 0.5})
    for step in EMA_STEPS:
        for cb in (norm, ema):
            _feed_step(cb, ctx, [[x / 2 for x in step]] * 2)
    s1, s2 = (torch.tensor(s, dtype=torch.float64) for s in EMA_STEPS)
    torch.testing.assert_close(norm.recorder.raw["attn"][0], s1 + s2, rtol=1e-6, atol=1e-6)
    # raw = d * raw + (1 - d) * step sum from 0: 0.25 s1 + 0.5 s2 = [2.5, 4, 3.75, 2.25, 2.25, 1.2, 1.125, 1.1]
    torch.testing.assert_close(ema.recorder.raw["attn"][0], 0.25 * s1 + 0.5 * s2, rtol=1e-6, atol=1e-6)
    assert not ema.recorder.votes["attn"].any() and ema.recorder.vote_steps == 2
    assert _select_attn(norm) == ([0, 2], [5, 6])  # sums: 10, 9 best; 2.4, 2.5 worst
    assert _select_attn(ema) == ([1, 2], [6, 7])   # recent steps count more


def test_statistic_change_refused_when_resuming_mid_stage(tiny_config, tiny_data):
    """The accumulated scores of a mid-stage checkpoint mean something else under another statistic;
    checkpoints saved before the option existed were ranked by votes."""
    import types

    from megatron_apex.config import ConfigError

    trainer = types.SimpleNamespace(ctx=types.SimpleNamespace(rank=0, tp_size=1, pp_size=1, dp_size=1, cp_size=1))
    layout = {"tp": 1, "pp": 1, "dp": 1, "cp": 1}
    old = {"step": 2, "layout": layout, "apex": {"version": 1, "stage": 1, "finished": False, "boundaries": [0, 2, 4]}}
    norm, _ = _scoring_callback(tiny_config, tiny_data, "norm")
    with pytest.raises(ConfigError) as err:
        norm.load_state(trainer, old)
    assert "apex.statistic='norm'" in str(err.value) and "apex.statistic='rank'" in str(err.value)
    rank, _ = _scoring_callback(tiny_config, tiny_data, "rank")
    rank.load_state(trainer, old)  # no name saved: 'rank'
    assert rank.boundary.stage == 1
    saved_ema = {**old, "apex": {**old["apex"], "statistic": "ema"}}
    with pytest.raises(ConfigError, match="apex.statistic='ema'"):
        rank.load_state(trainer, saved_ema)
    # In the last stage (no boundary left to select at) the scores are not used: any statistic resumes.
    norm.load_state(trainer, {**old, "step": 5, "apex": {**old["apex"], "stage": 3}})


def test_ema_decay_change_warned_when_resuming_mid_stage(tiny_config, tiny_data, caplog):
    """Another apex.ema_decay continues the saved moving averages with other weights: allowed (like a
    changed learning rate), but said, since the run then differs from an uninterrupted one."""
    import logging
    import types

    trainer = types.SimpleNamespace(ctx=types.SimpleNamespace(rank=0, tp_size=1, pp_size=1, dp_size=1, cp_size=1))
    ema, _ = _scoring_callback(tiny_config, tiny_data, "ema")  # apex.ema_decay 0.99 (the default)
    saved = {"version": 1, "stage": 1, "finished": False, "boundaries": [0, 2, 4], "statistic": "ema"}
    common = {"step": 2, "layout": {"tp": 1, "pp": 1, "dp": 1, "cp": 1}, "apex": saved}
    with caplog.at_level(logging.WARNING, logger="megatron_apex.expansion.resume"):
        ema.load_state(trainer, {**common, "apex": {**saved, "ema_decay": ema.a.ema_decay}})
        assert "ema_decay" not in caplog.text
        ema.load_state(trainer, {**common, "apex": {**saved, "ema_decay": 0.5}})
    assert "apex.ema_decay=0.99" in caplog.text and "taken with 0.5" in caplog.text
    assert ema.boundary.stage == 1
    # The saved value is in the common state a checkpoint writes.
    assert ema.common_state(trainer)["apex"]["ema_decay"] == ema.a.ema_decay


def test_resume_before_final_fuse_refuses_changed_selection_settings(tiny_config, tiny_data, caplog):
    """A checkpoint saved before the final fuse holds selections and operators built from apex.mode,
    ratio, partitions and progressive, and a stage counter of the schedule: another value of any of them
    is refused by name; boundaries still to come may move (with a warning); a fused run resumes freely."""
    import logging
    import types

    from megatron_apex.config import ConfigError

    trainer = types.SimpleNamespace(ctx=types.SimpleNamespace(rank=0, tp_size=1, pp_size=1, dp_size=1, cp_size=1))
    cb, _ = _scoring_callback(tiny_config, tiny_data, "rank")  # boundaries [0, 2, 4]
    common = {"step": 3, "layout": {"tp": 1, "pp": 1, "dp": 1, "cp": 1}, **cb.common_state(trainer)}
    common["apex"].update(stage=2)
    cb.load_state(trainer, common)  # the same settings resume
    assert cb.boundary.stage == 2
    for key, saved_value in (("mode", "selected"), ("ratio", 0.125), ("partitions", 4), ("progressive", True)):
        changed = {**common, "apex": {**common["apex"], key: saved_value}}
        with pytest.raises(ConfigError, match=f"apex.{key}=.*saved .*with apex.{key}={saved_value!r}"):
            cb.load_state(trainer, changed)
        with caplog.at_level(logging.WARNING, logger="megatron_apex.expansion.resume"):
            cb.load_state(trainer, {**changed, "apex": {**changed["apex"], "finished": True}})  # fused: no matter
        assert "holds a finished APEX run" in caplog.text and "apex.* has no effect" in caplog.text
        caplog.clear()
    assert common["apex"]["geometry"]["attn"] == [8, 2, 2]  # 8 query groups, k = 2, 2 partitions
    geometry = {**common["apex"]["geometry"], "attn": [8, 2, 1]}  # saved by a version with another rule
    with pytest.raises(ConfigError, match="per kind"):
        cb.load_state(trainer, {**common, "apex": {**common["apex"], "geometry": geometry}})
    # An applied boundary moved, or the next one before the resume step: refused with the saved list.
    for saved_boundaries in ([0, 1, 4], [1, 2, 4]):
        with pytest.raises(ConfigError, match=r"pass apex.boundaries=" + re.escape(str(saved_boundaries))):
            cb.load_state(trainer, {**common, "apex": {**common["apex"], "boundaries": saved_boundaries}})
    with pytest.raises(ConfigError, match="cannot come before step 5"):  # boundary 4 would be in the past
        cb.load_state(trainer, {**common, "step": 5})
    with caplog.at_level(logging.WARNING, logger="megatron_apex.expansion.resume"):
        cb.load_state(trainer, {**common, "apex": {**common["apex"], "boundaries": [0, 2, 5]}})
    assert "boundaries still to come change from [5] to [4]" in caplog.text


@pytest.mark.slow
def test_resume_refuses_changed_statistic_or_monarch_blocks(tiny_data, tiny_config, tmp_path):
    """A mid-stage checkpoint resumed with another apex.statistic, with an apex.monarch_blocks that gives
    the operators other shapes, with other apex.partitions or apex.mode, or without APEX, stops with a
    message naming the option (no size-mismatch or parameter-group trace)."""
    from apex_workers import apex_train_worker as worker

    over = _over(tiny_data, **{"apex.boundaries": "[0, 4]", "train.train_steps": 6,
                               "checkpoint.save": str(tmp_path / "cut")})
    (cut,) = run_distributed(worker, 1, tiny_config, over, 1)
    assert cut["exit"] == "stopped" and cut["step"] == 2  # inside stage 1, operators in the checkpoint
    with pytest.raises(RuntimeError) as err:
        run_distributed(worker, 1, tiny_config, over + ["apex.statistic=norm"])
    msg = str(err.value)
    assert "apex.statistic='norm'" in msg and "apex.statistic='rank'" in msg, msg[-3000:]
    # FFN: m = k_per = 16 units, nb 4 by default, 2 with apex.monarch_blocks=2.
    with pytest.raises(RuntimeError) as err:
        run_distributed(worker, 1, tiny_config, over + ["apex.monarch_blocks=2"])
    msg = str(err.value)
    assert "apex.monarch_blocks=2" in msg and "saved with apex.monarch_blocks=0" in msg, msg[-3000:]
    assert "size mismatch" not in msg
    with pytest.raises(RuntimeError) as err:  # other partitions: other operators (refused before loading them)
        run_distributed(worker, 1, tiny_config, over + ["apex.partitions=1"])
    msg = str(err.value)
    assert "apex.partitions=1" in msg and "apex.partitions=2" in msg and "positions must have shape" not in msg, \
        msg[-3000:]
    with pytest.raises(RuntimeError) as err:  # another mode trains other parameters (other optimizer groups)
        run_distributed(worker, 1, tiny_config, over + ["apex.mode=selected", "apex.attn_tuned_ratio=0.6",
                                                     "apex.ffn_tuned_ratio=0.6"])
    msg = str(err.value)
    assert "apex.mode='selected'" in msg and "apex.mode='all'" in msg and "Cannot merge" not in msg, msg[-3000:]
    with pytest.raises(RuntimeError) as err:  # without APEX the unfused base weights would be another model
        run_distributed(worker, 1, tiny_config, over + ["apex.enabled=false"])
    assert "apex.enabled=false" in str(err.value) and "before the final fuse" in str(err.value), str(err.value)[-3000:]
    (resumed,) = run_distributed(worker, 1, tiny_config, over)  # unchanged settings resume
    assert resumed["first_step"] == 2 and resumed["exit"] == "finished"


def test_start_up_warnings_for_choices_that_select_blindly_or_tune_nothing(tiny_config, tiny_data, caplog):
    """A first stage at step 0 without an initial scoring pass picks P and N by index; a kind that selected
    mode does not select is not tuned either, whatever its tuned ratio: both are said at start-up."""
    import logging

    from megatron_apex.config import load_config
    from megatron_apex.expansion.engine import ApexCallback

    def warnings(**extra):
        caplog.clear()
        cb = ApexCallback(load_config(tiny_config, _over(tiny_data, **extra)))
        with caplog.at_level(logging.WARNING, logger="megatron_apex.expansion.engine"):
            cb._log_geometry()
        return caplog.text

    assert "chosen without scores" in warnings(**{"apex.boundaries": "[0, 2]", "apex.init_scoring_samples": 0})
    assert "chosen without scores" not in warnings(**{"apex.boundaries": "[0, 2]"})
    assert "chosen without scores" not in warnings(**{"apex.boundaries": "[1, 2]", "apex.init_scoring_samples": 0})
    text = warnings(**{"apex.mode": "selected", "apex.attn_ratio": 0, "apex.ffn_tuned_ratio": 0.6})
    assert "apex.attn_tuned_ratio=0.5625 has no effect: no attention units are tuned" in text
