"""Checkpoints: exact resume after a crash, SIGKILL and SIGTERM of the real command line, resharding
TP=2 -> TP=1, refusal of incompatible and weights-only checkpoints, crash during a save, pruning; the
distributed optimizer's state in both formats (exact resume, DP and TP changes, refusals).

Single-process runs train inside the pytest process (world size 1, one thread); the kill tests run
``python -m megatron_apex.train`` as a subprocess, as a cluster job would. On the CPU in fp32 with
one thread the arithmetic is deterministic, so a resumed run must reproduce the uninterrupted
run's losses *exactly*: any difference means some state (weights, Adam moments, LR step, data
position) was not restored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distributed_utils import free_port, run_distributed
from training_workers import (event_files, optimizer_shards, tensorboard_losses, train_and_evaluate,
                            train_many_with_optimizer_state, trainer_in_process)
from helpers import tiny_overrides
from megatron_apex.training import checkpoint as ckpt
from megatron_apex.training.trainer import Callback

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def single_process():
    """The in-process runs share one world-size-1 process group, torn down after the module."""
    yield
    from megatron_apex.distributed import destroy_distributed

    destroy_distributed()


def _overrides(tiny_data, save=None, **extra):
    extra = {"train.train_steps": STEPS, **extra}
    if save is not None:
        extra["checkpoint.save"] = save
    return tiny_overrides(tiny_data, **extra)


def _train(tiny_config, overrides, callbacks=None):
    trainer = trainer_in_process(tiny_config, overrides, callbacks)
    return trainer, trainer.train()


def _iters(root) -> list:
    return sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_config, tiny_data, tmp_path_factory):
    """The reference run: STEPS steps, a checkpoint every 2 steps, the newest 2 kept."""
    root = str(tmp_path_factory.mktemp("uninterrupted"))
    _, result = _train(tiny_config, _overrides(tiny_data, root, **{"checkpoint.save_interval": 2,
                                                                  "checkpoint.keep_last": 2}))
    assert sorted(result.losses) == list(range(STEPS)) and result.exit_reason == "finished"
    return {"losses": result.losses, "root": root}


class CrashAt(Callback):
    """Raise at the start of a step, as a node failure would interrupt the run."""

    def __init__(self, step):
        self.step = step

    def on_step_start(self, trainer, step):
        if step == self.step:
            raise RuntimeError(f"simulated crash at step {step}")


def test_keep_last_prunes_old_checkpoints(uninterrupted):
    root = uninterrupted["root"]
    assert _iters(root) == [4, 6]
    assert ckpt.read_latest(root) == 6


def test_resume_after_crash_is_exact(tiny_config, tiny_data, tmp_path, uninterrupted):
    ref = uninterrupted["losses"]
    overrides = _overrides(tiny_data, str(tmp_path), **{"checkpoint.save_interval": 2})
    trainer = trainer_in_process(tiny_config, overrides, [CrashAt(3)])
    with pytest.raises(RuntimeError, match="simulated crash at step 3"):
        trainer.train()
    assert trainer.result.losses == {k: ref[k] for k in range(3)}
    assert ckpt.read_latest(str(tmp_path)) == 2

    # The same command again: resumes at step 2 (weights, Adam state, LR step, data position).
    trainer, result = _train(tiny_config, overrides)
    assert sorted(result.losses) == [2, 3, 4, 5]
    assert result.losses == {k: ref[k] for k in range(2, STEPS)}  # exact, see the module docstring
    assert result.step == STEPS and ckpt.read_latest(str(tmp_path)) == STEPS


class TrackerAtStepStart(Callback):
    """What the tracker names, and whether a save is in flight, at the start of every step."""

    def __init__(self, root):
        self.root, self.seen = root, {}

    def on_step_start(self, trainer, step):
        self.seen[step] = (ckpt.read_latest(self.root), trainer.pending_save is not None)


def test_async_save_trains_on_while_writing_and_resumes_exactly(tiny_config, tiny_data, tmp_path, uninterrupted):
    """checkpoint.async_save: the step after a save starts while its files are being written and before the
    checkpoint is published (the tracker still names the one before); a crash then leaves the newest
    published checkpoint, from which the run resumes exactly."""
    root = str(tmp_path)
    overrides = _overrides(tiny_data, root, **{"checkpoint.save_interval": 2, "checkpoint.async_save": True})
    probe = TrackerAtStepStart(root)
    trainer = trainer_in_process(tiny_config, overrides, [probe, CrashAt(5)])
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        trainer.train()
    assert probe.seen[2] == (None, True)  # step 2 trained on while step 2's checkpoint was in flight
    assert probe.seen[4][1] and probe.seen[4][0] == 2
    assert trainer.result.losses == {k: uninterrupted["losses"][k] for k in range(5)}
    latest = ckpt.read_latest(root)
    assert latest in (2, 4)  # 4 once its writer was done by the end of step 4, else 2: never a partial one
    trainer, result = _train(tiny_config, overrides)
    assert result.losses == {k: uninterrupted["losses"][k] for k in range(latest, STEPS)}
    assert ckpt.read_latest(root) == STEPS and trainer.pending_save is None
    assert not any(name.startswith("saving.") for name in os.listdir(root))


def test_async_save_in_flight_is_published_when_training_fails(tiny_config, tiny_data, tmp_path):
    """A failure every rank decides together (a non-finite loss under nan_policy=stop) still publishes the
    save in flight, so the next start resumes from it rather than from the save before."""
    from megatron_apex.training.trainer import TrainingError

    class FailAt(Callback):
        def on_step_start(self, trainer, step):
            if step == 2:  # the step right after step 2's save was issued: not polled yet, so in flight
                assert trainer.pending_save is not None
                raise TrainingError("simulated: non-finite loss at step 2")

    root = str(tmp_path)
    overrides = _overrides(tiny_data, root, **{"checkpoint.save_interval": 2, "checkpoint.async_save": True})
    trainer = trainer_in_process(tiny_config, overrides, [FailAt()])
    with pytest.raises(TrainingError, match="simulated"):
        trainer.train()
    assert ckpt.read_latest(root) == 2 and trainer.pending_save is None
    assert not any(name.startswith("saving.") for name in os.listdir(root))


def test_crash_during_save_keeps_previous_checkpoint(tiny_config, tiny_data, tmp_path, uninterrupted,
                                                     monkeypatch):
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def failing_save(state_dict, directory, *args, **kwargs):
        if directory.endswith(os.path.basename(ckpt.iter_dir("", 4))):
            with open(os.path.join(directory, "__0_0.distcp"), "wb") as f:  # half a shard
                f.write(b"\0" * 100)
            raise OSError("simulated: disk full while saving")
        return real_save(state_dict, directory, *args, **kwargs)

    overrides = _overrides(tiny_data, str(tmp_path), **{"checkpoint.save_interval": 2})
    monkeypatch.setattr(dist_checkpointing, "save", failing_save)
    with pytest.raises(ckpt.CheckpointWriteError, match="step 4 .*simulated: disk full while saving.*step 2. is intact"):
        _train(tiny_config, overrides)
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    assert ckpt.read_latest(str(tmp_path)) == 2, "the tracker must still name the last complete save"
    assert _iters(str(tmp_path)) == [2]  # the half-written save is not under an iter_* name
    assert not os.path.isdir(os.path.join(str(tmp_path), "saving.iter_0000004"))  # its space back at once

    trainer, result = _train(tiny_config, overrides)
    assert result.losses == {k: uninterrupted["losses"][k] for k in range(2, STEPS)}
    # The save of step 4 was redone, complete now, and the leftover is gone.
    assert ckpt.read_common(ckpt.iter_dir(str(tmp_path), 4))["step"] == 4
    assert ckpt.read_latest(str(tmp_path)) == STEPS
    assert not any(name.startswith("saving.") for name in os.listdir(tmp_path))


def test_incompatible_checkpoint_is_refused(tiny_config, tiny_data, uninterrupted):
    overrides = _overrides(tiny_data, **{"checkpoint.load": uninterrupted["root"], "model.hidden_size": 96})
    with pytest.raises(ckpt.CheckpointError, match=r"hidden_size: checkpoint 64 vs config 96"):
        trainer_in_process(tiny_config, overrides)


def test_checkpoint_of_another_rope_theta_or_norm_epsilon_is_refused(tiny_config, tiny_data, uninterrupted):
    """RoPE theta and the RMSNorm epsilon change the function without changing a shape: a mismatch is
    refused like a shape's (checkpoints saved before they were in the signature: read from their config)."""
    from megatron_apex.config import load_config

    overrides = _overrides(tiny_data, **{"checkpoint.load": uninterrupted["root"], "model.rotary_base": 500000.0,
                                         "model.norm_epsilon": 1e-6, "model.rope_scaling_factor": 8})
    with pytest.raises(ckpt.CheckpointError, match=r"rotary_base: checkpoint 10000.0 vs config 500000.0.*"
                                                   r"norm_epsilon: checkpoint 1e-05 vs config 1e-06.*"
                                                   r"rope_scaling_factor: checkpoint None vs config 8.0"):
        trainer_in_process(tiny_config, overrides)
    path = ckpt.resolve_checkpoint_dir(uninterrupted["root"])
    common = ckpt.read_common(path)
    padded = common["model_signature"]["padded_vocab_size"]
    older = {**common, "model_signature": {k: v for k, v in common["model_signature"].items()
                                           if k not in ("rotary_base", "norm_epsilon", "rope_scaling_factor")}}
    ckpt.check_compatible(older, load_config(tiny_config, _overrides(tiny_data)), padded, path)
    with pytest.raises(ckpt.CheckpointError, match="rotary_base"):
        ckpt.check_compatible(older, load_config(tiny_config, overrides), padded, path)


def test_weights_only_checkpoint_finetunes_but_does_not_resume(tiny_config, tiny_data, tmp_path):
    import torch

    source, _ = _train(tiny_config, _overrides(tiny_data, **{"train.train_steps": 2}))
    weights = str(tmp_path / "weights")
    ckpt.save_checkpoint(weights, 2, source.model, None, source.cfg, source.ctx, source.padded_vocab, 0)
    trained = {n: p.detach().clone() for n, p in source.model.named_parameters()}

    with pytest.raises(ckpt.CheckpointError, match="weights only.*checkpoint.finetune_from"):
        trainer_in_process(tiny_config, _overrides(tiny_data, **{"checkpoint.load": weights}))

    fresh = trainer_in_process(tiny_config, _overrides(tiny_data))
    tuned = trainer_in_process(tiny_config, _overrides(tiny_data, str(tmp_path / "run"),
                                                       **{"checkpoint.finetune_from": weights}))
    assert tuned.step == 0
    differs_from_init = False
    for name, p in tuned.model.named_parameters():
        assert torch.equal(p, trained[name]), name
        differs_from_init |= not torch.equal(p, dict(fresh.model.named_parameters())[name])
    assert differs_from_init
    result = tuned.train()
    assert sorted(result.losses) == list(range(STEPS))  # a fresh schedule from step 0


def test_finetune_carries_the_import_on_and_refuses_a_mid_stage_apex_checkpoint(tiny_config, tiny_data, tmp_path):
    """The Hugging Face import's ids and generation config travel from finetune_from into the run's own
    checkpoints (and so into its export); weights saved in the middle of an APEX stage are refused."""
    from megatron_apex.config import ConfigError
    from megatron_apex.convert.exporter import token_ids
    from megatron_apex.expansion.resume import UnfusedCheckpointGuard

    source, _ = _train(tiny_config, _overrides(tiny_data, **{"train.train_steps": 1}))
    meta = {"source": "/models/x", "config": {"bos_token_id": 900, "eos_token_id": 901, "pad_token_id": 902},
            "generation_config": {"bos_token_id": 900, "eos_token_id": [901, 903], "temperature": 0.6}}
    weights = str(tmp_path / "weights")
    ckpt.save_checkpoint(weights, 0, source.model, None, source.cfg, source.ctx, source.padded_vocab, 0,
                         extra_common={"hf_import": meta})
    run = str(tmp_path / "run")
    tuned, _ = _train(tiny_config, _overrides(tiny_data, run, **{"checkpoint.finetune_from": weights,
                                                                  "train.train_steps": 2}))
    saved = ckpt.read_common(ckpt.resolve_checkpoint_dir(run))
    assert saved["hf_import"] == meta
    assert token_ids(saved["hf_import"], tuned.cfg)["bos_token_id"] == 900
    resumed = trainer_in_process(tiny_config, _overrides(tiny_data, run, **{"train.train_steps": 3}))
    assert resumed.hf_import == meta  # and so on through resumes

    apex = str(tmp_path / "apex")
    state = {"version": 1, "stage": 1, "finished": False, "boundaries": [0, 2, 4]}
    ckpt.save_checkpoint(apex, 0, source.model, None, source.cfg, source.ctx, source.padded_vocab, 0,
                         extra_common={"apex": state})
    with pytest.raises(ConfigError, match="in the middle of APEX stage 1 of 3"):
        trainer_in_process(tiny_config, _overrides(tiny_data, **{"checkpoint.finetune_from": apex}),
                           callbacks=[UnfusedCheckpointGuard()])  # what run.build_callbacks adds without APEX


def test_precision_change_refused_with_optimizer_state(tiny_config, tiny_data, tmp_path):
    root = str(tmp_path / "fp32")
    _train(tiny_config, _overrides(tiny_data, root, **{"train.train_steps": 1, "train.precision": "fp32"}))
    with pytest.raises(ckpt.CheckpointError, match="saved by a float32 run and this run is bfloat16.*"
                                                   "train.precision=fp32.*load_optimizer=false"):
        trainer_in_process(tiny_config, _overrides(tiny_data, root, **{"train.precision": "bf16"}))
    weights_only = trainer_in_process(tiny_config, _overrides(
        tiny_data, root, **{"train.precision": "bf16", "checkpoint.load_optimizer": False}))
    assert weights_only.step == 1


@pytest.mark.parametrize("how, distopt", [("finetune_from", False), ("load_without_optimizer", False),
                                          ("load_without_optimizer", True)],
                         ids=["finetune_from", "load_without_optimizer", "load_without_optimizer-distopt"])
def test_bf16_run_keeps_the_loaded_weights_past_its_first_step(tiny_config, tiny_data, tmp_path, how, distopt):
    """A bf16 optimizer steps fp32 main copies of the weights: loading weights without optimizer state
    must refresh them, or the first step writes the initial weights back over the loaded ones (the
    distributed optimizer: its shards of them)."""
    import torch

    root = str(tmp_path / "source")
    opt = {"parallel.use_distributed_optimizer": distopt}
    source, _ = _train(tiny_config, _overrides(tiny_data, root, **{"train.train_steps": 2,
                                                                   "train.precision": "bf16", **opt}))
    loaded = {n: p.detach().float().clone() for n, p in source.model.named_parameters()}
    still = {"train.precision": "bf16", "train.train_steps": 3 if how != "finetune_from" else 1, **opt,
             "optimizer.lr": 1e-9, "optimizer.min_lr": 0.0, "optimizer.lr_warmup_steps": 0,
             "optimizer.weight_decay": 0.0}
    if how == "finetune_from":
        still["checkpoint.finetune_from"] = root
    else:
        still.update({"checkpoint.load": root, "checkpoint.load_optimizer": False})
    tuned, result = _train(tiny_config, _overrides(tiny_data, str(tmp_path / "run"), **still))
    assert len(result.losses) == 1
    fresh = dict(trainer_in_process(tiny_config, _overrides(tiny_data, **{"train.precision": "bf16"}))
                 .model.named_parameters())
    for name, p in tuned.model.named_parameters():
        err = (p.detach().float() - loaded[name]).abs().max().item()
        assert err <= 1e-2 * loaded[name].abs().max().item(), (name, err)
        assert not torch.equal(p, fresh[name]) or name.endswith("layer_norm_weight"), name


@pytest.mark.parametrize("layout", [{"parallel.tensor_model_parallel_size": 2},
                                    {"parallel.context_parallel_size": 2}], ids=["tp2", "cp2"])
def test_two_rank_checkpoint_loads_in_one_process(tiny_config, tiny_data, tmp_path, layout):
    """Saved by TP=2 (sharded weights) or CP=2 (replicated weights, split sequences), loaded at TP=CP=1;
    the two-rank run's validation loss is also the one-process loss of the same weights."""
    root = str(tmp_path / "ckpt")
    eval_steps = {"train.eval_steps": 2, "train.train_steps": 3}
    results = run_distributed(train_and_evaluate, 2, tiny_config, _overrides(tiny_data, root, **layout, **eval_steps))
    tp2_eval = results[0]["eval"]
    assert results[1]["eval"] == tp2_eval
    saved = ckpt.read_common(ckpt.iter_dir(root, 3))["layout"]
    assert (saved["tp"], saved["cp"]) == ((2, 1) if "parallel.tensor_model_parallel_size" in layout else (1, 2))

    loaded = trainer_in_process(tiny_config, _overrides(tiny_data, **{"checkpoint.load": root, **eval_steps}))
    assert loaded.step == 3
    # Same weights, summed in a different order over shards or chunks: fp32 rounding only.
    assert abs(loaded.evaluate() - tp2_eval) <= 1e-5
    fresh = trainer_in_process(tiny_config, _overrides(tiny_data, **eval_steps))
    assert abs(fresh.evaluate() - tp2_eval) > 1e-2  # the comparison is not vacuous


# ---------------------------------------------------------------------- distributed optimizer
DISTOPT_STEPS = 4
FORMATS = ("dp_reshardable", "fully_reshardable")
TOL = 1e-5  # fp32 losses of two layouts (reduction order only), as in test_training_parallel.py


def _distopt(tiny_data, save=None, fmt="dp_reshardable", **extra):
    return tiny_overrides(tiny_data, **{"model.num_layers": 2, "train.train_steps": DISTOPT_STEPS,
                                        "parallel.use_distributed_optimizer": True,
                                        "checkpoint.optimizer_format": fmt,
                                        **({"checkpoint.save": save} if save else {}), **extra})


@pytest.fixture(scope="module")
def distopt(tiny_config, tiny_data, tmp_path_factory):
    """Distributed-optimizer runs; the two-process ones (DP=2 unless TP=2) share one pair of processes.

    In this process (DP=1, fp32): the reference run and a run cut at step 2. Then in two processes:
    per format, a bf16 run, the same cut at step 2 and resumed ("bf16", "cut-FORMAT", "resumed-FORMAT");
    fp32: the DP=1 cut resumed at DP=2 ("dp1->dp2"), a DP=2 run cut at step 2 ("dp2-cut"), a TP=2 run
    cut at step 2 in the fully_reshardable format ("tp2-cut") resumed at DP=2 ("tp2->dp2"), and the DP=2
    checkpoint loaded at TP=2 ("dp2->tp2").
    """
    tmp = tmp_path_factory.mktemp("distopt")
    roots = {name: str(tmp / name) for name in ("dp1", "dp2", "tp2", *FORMATS)}
    trainer = trainer_in_process(tiny_config, _distopt(tiny_data))
    parameters = sum(p.numel() for p in trainer.model.parameters())
    reference = trainer.train().losses
    trainer_in_process(tiny_config, _distopt(tiny_data, roots["dp1"], **{"train.train_steps": 2})).train()

    bf16, tp2 = {"train.precision": "bf16"}, {"parallel.tensor_model_parallel_size": 2}
    runs = {"bf16": _distopt(tiny_data, **bf16)}
    for fmt in FORMATS:
        runs[f"cut-{fmt}"] = _distopt(tiny_data, roots[fmt], fmt, **bf16, **{"train.train_steps": 2})
        runs[f"resumed-{fmt}"] = _distopt(tiny_data, roots[fmt], fmt, **bf16)
    runs["dp1->dp2"] = _distopt(tiny_data, roots["dp1"])
    runs["dp2-cut"] = _distopt(tiny_data, roots["dp2"], **{"train.train_steps": 2})
    runs["tp2-cut"] = _distopt(tiny_data, roots["tp2"], "fully_reshardable", **tp2, **{"train.train_steps": 2})
    runs["tp2->dp2"] = _distopt(tiny_data, roots["tp2"])
    runs["dp2->tp2"] = _distopt(tiny_data, **tp2, **{"checkpoint.load": roots["dp2"]})
    per_rank = run_distributed(train_many_with_optimizer_state, 2, tiny_config, list(runs.values()))
    return {"reference": reference, "parameters": parameters, "roots": roots,
            "runs": {name: [rank[i] for rank in per_rank] for i, name in enumerate(runs)}}


def _close(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and max(abs(a[k] - b[k]) for k in a) <= TOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_distributed_optimizer_resume_is_exact(distopt, fmt):
    """DP=2, bf16: the resumed run reproduces the uninterrupted run's losses exactly, and each rank's
    shard of the optimizer state (fp32 main params, Adam moments, step) is the one saved."""
    runs = distopt["runs"]
    assert ckpt.read_common(ckpt.iter_dir(distopt["roots"][fmt], 2))["optimizer_format"] == fmt
    for full, cut, resumed in zip(runs["bf16"], runs[f"cut-{fmt}"], runs[f"resumed-{fmt}"]):
        assert cut["losses"] == {k: full["losses"][k] for k in range(2)}
        assert resumed["losses"] == {k: full["losses"][k] for k in range(2, DISTOPT_STEPS)}
        saved, loaded = cut["trained"], resumed["loaded"]
        assert sorted(saved) == sorted(loaded) and any(k.endswith(".exp_avg_sq") for k in saved)
        for key, value in saved.items():
            assert np.array_equal(loaded[key], value), (cut["rank"], key)
            if key.endswith(".step"):
                assert value.item() == 2, key
            elif key.endswith(".exp_avg"):
                assert np.abs(value).max() > 0, key  # not a fresh (zero) state
    # Each rank held (and saved) its own half of the state.
    shards = [sum(t.size for k, t in rank["trained"].items() if k.endswith(".param")) for rank in runs["bf16"]]
    assert sum(shards) == distopt["parameters"] and max(shards) < distopt["parameters"]


def test_distributed_optimizer_state_reshards_across_dp(tiny_config, tiny_data, distopt):
    """dp_reshardable state saved at DP=1 resumes at DP=2 and saved at DP=2 resumes at DP=1."""
    ref = distopt["reference"]
    for rank in distopt["runs"]["dp1->dp2"]:
        assert _close(rank["losses"], {k: ref[k] for k in range(2, DISTOPT_STEPS)}), rank["losses"]
        assert all(v.item() == 2 for k, v in rank["loaded"].items() if k.endswith(".step"))
    for rank in distopt["runs"]["dp2-cut"]:
        assert _close(rank["losses"], {k: ref[k] for k in range(2)})
    trainer = trainer_in_process(tiny_config, _distopt(tiny_data, **{"checkpoint.load": distopt["roots"]["dp2"]}))
    assert trainer.step == 2
    assert _close(trainer.train().losses, {k: ref[k] for k in range(2, DISTOPT_STEPS)})


def test_fully_reshardable_optimizer_state_loads_under_another_tp(distopt):
    ref = distopt["reference"]
    assert ckpt.read_common(ckpt.iter_dir(distopt["roots"]["tp2"], 2))["layout"]["tp"] == 2
    for cut, resumed in zip(distopt["runs"]["tp2-cut"], distopt["runs"]["tp2->dp2"]):
        assert _close(cut["losses"], {k: ref[k] for k in range(2)})
        assert _close(resumed["losses"], {k: ref[k] for k in range(2, DISTOPT_STEPS)}), resumed["losses"]


def test_optimizer_state_of_another_layout_or_optimizer_is_refused(tiny_config, tiny_data, distopt, uninterrupted):
    """dp_reshardable state under another TP, and either optimizer's state in the other, are refused
    with what to do; checkpoint.load_optimizer=false loads the weights in each case."""
    for rank in distopt["runs"]["dp2->tp2"]:
        assert "dp_reshardable format, saved under TP=1 (now 2)" in rank["refused"], rank["refused"]
        assert "checkpoint.load_optimizer=false" in rank["refused"]
    dp2 = distopt["roots"]["dp2"]
    plain = {"parallel.use_distributed_optimizer": False}
    with pytest.raises(ckpt.CheckpointError, match=r"holds the distributed optimizer's state.*"
                                                   r"parallel.use_distributed_optimizer=true.*load_optimizer=false"):
        trainer_in_process(tiny_config, _distopt(tiny_data, **plain, **{"checkpoint.load": dp2}))
    with pytest.raises(ckpt.CheckpointError, match=r"holds the plain optimizer's state.*"
                                                   r"parallel.use_distributed_optimizer=false.*load_optimizer=false"):
        trainer_in_process(tiny_config, _overrides(tiny_data, **{"checkpoint.load": uninterrupted["root"],
                                                                  "parallel.use_distributed_optimizer": True}))
    weights = trainer_in_process(tiny_config, _distopt(tiny_data, **plain, **{"checkpoint.load": dp2,
                                                                            "checkpoint.load_optimizer": False}))
    assert weights.step == 2
    weights = trainer_in_process(tiny_config, _overrides(tiny_data, **{
        "checkpoint.load": uninterrupted["root"], "parallel.use_distributed_optimizer": True,
        "checkpoint.load_optimizer": False}))
    assert weights.step == STEPS and not any(k.endswith(".exp_avg") for k in optimizer_shards(weights.optimizer))


# ---------------------------------------------------------------------- the real command line
CLI_STEPS = 40
CLI_EXTRA = {"train.train_steps": CLI_STEPS, "checkpoint.save_interval": 5, "train.log_interval": 1}


@pytest.fixture(scope="module")
def cli_reference(tiny_config, tiny_data):
    """The uninterrupted CLI_STEPS-step run, in-process (same arithmetic: fp32, one thread)."""
    _, result = _train(tiny_config, tiny_overrides(tiny_data, **CLI_EXTRA))
    return result.losses


def _launch(tiny_config, tiny_data, root, log, new_session=False, extra=()):
    overrides = tiny_overrides(tiny_data, **CLI_EXTRA, **dict(extra), **{
        "checkpoint.save": os.path.join(root, "ckpt"), "logging.tensorboard_dir": os.path.join(root, "tb")})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "megatron_apex.train", tiny_config, *overrides,
           "train.exit_on_signal=true"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session)


def _wait_for_checkpoint(proc, root, timeout=300.0) -> int:
    deadline = time.monotonic() + timeout
    tracker = os.path.join(root, "ckpt", ckpt.TRACKER)
    while time.monotonic() < deadline:
        if os.path.exists(tracker):
            return ckpt.read_latest(os.path.join(root, "ckpt"))
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before its first checkpoint")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint within the time limit")


def _restart_and_compare(tiny_config, tiny_data, root, reference, log, extra=()) -> dict:
    """Run the same command to completion; its TensorBoard losses must equal the reference's."""
    resume_step = ckpt.read_latest(os.path.join(root, "ckpt"))
    before = set(event_files(os.path.join(root, "tb")))
    proc = _launch(tiny_config, tiny_data, root, log, extra=extra)
    assert proc.wait(timeout=600) == 0, open(log.name).read()[-3000:]
    (new_file,) = set(event_files(os.path.join(root, "tb"))) - before
    losses = tensorboard_losses(new_file)
    assert sorted(losses) == list(range(resume_step, CLI_STEPS))
    # TensorBoard stores fp32 scalars: compare with the reference rounded the same way, exactly.
    assert losses == {k: float(np.float32(reference[k])) for k in losses}
    assert ckpt.read_latest(os.path.join(root, "ckpt")) == CLI_STEPS
    return losses


SAVES = {"blocking": (), "async": (("checkpoint.async_save", True),)}


@pytest.mark.parametrize("saves", sorted(SAVES))
def test_cli_sigkill_between_checkpoints_then_restart(tiny_config, tiny_data, tmp_path, cli_reference, saves):
    root, extra = str(tmp_path), SAVES[saves]
    with open(tmp_path / "run1.log", "w") as log:
        proc = _launch(tiny_config, tiny_data, root, log, extra=extra)
        first = _wait_for_checkpoint(proc, root)
        proc.send_signal(signal.SIGKILL)  # no handler can run: as a node loss or an OOM kill
        assert proc.wait(timeout=60) == -signal.SIGKILL
    latest = ckpt.read_latest(os.path.join(root, "ckpt"))
    assert first <= latest < CLI_STEPS, "the run must have been killed before its end"
    with open(tmp_path / "run2.log", "w") as log:
        _restart_and_compare(tiny_config, tiny_data, root, cli_reference, log, extra)


@pytest.mark.parametrize("saves", sorted(SAVES))
def test_cli_sigterm_saves_exits_75_and_resumes(tiny_config, tiny_data, tmp_path, cli_reference, saves):
    root, extra = str(tmp_path), SAVES[saves]
    with open(tmp_path / "run1.log", "w") as log:
        proc = _launch(tiny_config, tiny_data, root, log, new_session=True, extra=extra)
        first = _wait_for_checkpoint(proc, root)
        # To the whole process group, as slurm and torchrun send it: the checkpoint writer's helper
        # process (started by the first save) gets it too and must survive it.
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 75, open(log.name).read()[-3000:]
    text = open(tmp_path / "run1.log").read()
    assert "received SIGTERM" in text and "training stopped at step" in text
    stopped = ckpt.read_latest(os.path.join(root, "ckpt"))
    assert first < stopped < CLI_STEPS  # a checkpoint of the step where it stopped, not the last periodic one
    assert ckpt.read_common(ckpt.iter_dir(os.path.join(root, "ckpt"), stopped))["step"] == stopped
    (first_file,) = event_files(os.path.join(root, "tb"))
    before = tensorboard_losses(first_file)
    assert before == {k: float(np.float32(cli_reference[k])) for k in range(stopped)}
    with open(tmp_path / "run2.log", "w") as log:
        _restart_and_compare(tiny_config, tiny_data, root, cli_reference, log, extra)
