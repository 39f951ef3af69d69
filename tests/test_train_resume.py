"""Resuming and stopping: which checkpoint a run resumes from, the data position after a change of the
global batch size, checkpoint.keep_last, saves that a crash cannot half-write, stops during the last
step or without a checkpoint directory, signals, and the one-line errors and exit codes of a run.

Everything trains inside the pytest process (world size 1, one thread): a 2-layer model, a few steps
per run, about a second each.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys

import pytest
import torch

from conftest import ROOT
from distributed_utils import free_port
from training_workers import trainer_in_process
from helpers import tiny_overrides
from megatron_apex.training import checkpoint as ckpt
from megatron_apex.training import trainer as trainer_module
from megatron_apex.training.trainer import Callback, Throughput

TRAINER_LOG = "megatron_apex"


@pytest.fixture(scope="module", autouse=True)
def single_process():
    """The in-process runs share one world-size-1 process group, torn down after the module."""
    yield
    from megatron_apex.distributed import destroy_distributed

    destroy_distributed()


def _overrides(tiny_data, **extra) -> list:
    return tiny_overrides(tiny_data, **{"model.num_layers": 2, "train.train_steps": 2, **extra})


def _trainer(tiny_config, tiny_data, callbacks=None, **extra):
    return trainer_in_process(tiny_config, _overrides(tiny_data, **extra), callbacks)


def _iters(root) -> list:
    return sorted(s for s in (ckpt.iter_step(name) for name in os.listdir(root)) if s is not None)


def _weights(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


class StopAt(Callback):
    """Request a stop during the given (0-based) step, as a signal or a time limit would."""

    def __init__(self, step):
        self.step = step

    def stop_requested(self, trainer):
        return "test stop" if trainer.step == self.step else None


class Ends(Callback):
    """Counts on_train_end calls and keeps a flag in the checkpoints that on_train_end sets (as the
    APEX engine's final fuse does)."""

    def __init__(self):
        self.ended, self.fused = 0, False

    def on_train_end(self, trainer):
        self.ended += 1
        self.fused = True

    def common_state(self, trainer):
        return {"fused": self.fused}

    def load_state(self, trainer, common):
        self.fused = common.get("fused", False)


@pytest.fixture(scope="module")
def two_steps(tiny_config, tiny_data, tmp_path_factory):
    """A finished 2-step run: iter_0000002 and the tracker naming it (global batch 8, 16 samples read)."""
    root = str(tmp_path_factory.mktemp("two_steps") / "ckpt")
    result = _trainer(tiny_config, tiny_data, **{"checkpoint.save": root}).train()
    assert result.checkpoint == ckpt.iter_dir(root, 2) and ckpt.read_latest(root) == 2
    return root


def _copy(root, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(root, dst)
    return dst


# ---------------------------------------------------------------------- where a run resumes from
def test_resubmission_resumes_from_checkpoint_save_once_it_has_one(tiny_config, tiny_data, two_steps, tmp_path,
                                                                    caplog):
    save = str(tmp_path / "continued")
    extra = {"checkpoint.load": two_steps, "checkpoint.save": save, "train.train_steps": 5}
    first = _trainer(tiny_config, tiny_data, [StopAt(2)], **extra)
    assert first.step == 2  # checkpoint.save is empty: from checkpoint.load
    result = first.train()
    assert (result.exit_reason, result.exit_code, ckpt.read_latest(save)) == ("stopped", 75, 3)
    with caplog.at_level(logging.INFO, TRAINER_LOG):
        second = _trainer(tiny_config, tiny_data, **extra)  # the same command again
    assert second.step == 3
    assert (f"resumed from {save} at step 3 (checkpoint.save holds this run's newest checkpoint; "
            f"checkpoint.load={two_steps} is only used before it has one)") in caplog.text


def test_checkpoint_load_accepts_an_iter_directory(tiny_config, tiny_data, two_steps, caplog):
    with caplog.at_level(logging.INFO, TRAINER_LOG):
        trainer = _trainer(tiny_config, tiny_data, **{"checkpoint.load": ckpt.iter_dir(two_steps, 2)})
    assert trainer.step == 2 and "at step 2 (checkpoint.load)" in caplog.text


@pytest.mark.parametrize("where, problem", [
    ("missing", "no such checkpoint directory"),
    ("empty", f"neither a checkpoint directory nor a root with {ckpt.TRACKER}"),
    ("incomplete", "an incomplete checkpoint (no metadata.json: an interrupted save)"),
])
def test_explicit_checkpoint_load_must_hold_a_checkpoint(tiny_config, tiny_data, two_steps, tmp_path, where,
                                                         problem):
    path = str(tmp_path / "missing")
    if where == "empty":
        os.makedirs(path)
    elif where == "incomplete":
        path = ckpt.iter_dir(_copy(two_steps, tmp_path), 2)
        os.remove(os.path.join(path, "metadata.json"))
    with pytest.raises(ckpt.CheckpointError) as info:
        _trainer(tiny_config, tiny_data, **{"checkpoint.load": path, "checkpoint.save": str(tmp_path / "new")})
    assert str(info.value) == f"checkpoint.load={path!r}: {problem}"


def test_checkpoint_load_equal_to_save_may_be_empty(tiny_config, tiny_data, tmp_path):
    root = str(tmp_path / "ckpt")  # the usual auto-resume set-up, on its first start
    assert _trainer(tiny_config, tiny_data, **{"checkpoint.load": root, "checkpoint.save": root}).step == 0


def test_resume_continues_at_the_saved_data_position(tiny_config, tiny_data, two_steps, tmp_path, monkeypatch,
                                                     caplog):
    """The global batch size doubles: the run goes on at sample 16, the first one the checkpoint's run did
    not read (not at step 2 x 16 = 32), and says so."""
    root = _copy(two_steps, tmp_path)
    starts, build_loader = [], trainer_module.build_loader

    def recording(dataset, cfg, consumed, total, *args):
        starts.append((consumed, total))
        return build_loader(dataset, cfg, consumed, total, *args)

    monkeypatch.setattr(trainer_module, "build_loader", recording)
    with caplog.at_level(logging.INFO, TRAINER_LOG):
        trainer = _trainer(tiny_config, tiny_data, **{"checkpoint.save": root, "train.global_batch_size": 16,
                                                      "train.train_steps": 3})
    assert trainer.consumed_samples == 16 and starts == [(16, 32)]
    assert ("train.global_batch_size changed from 8 (checkpoint) to 16: training continues at sample 16"
            in caplog.text)
    # the dataset is built for another number of samples: across epochs the order may differ (README)
    assert "the training set is built for 32 samples, the checkpoint's run built it for 16" in caplog.text
    trainer.train()
    saved = ckpt.read_common(ckpt.iter_dir(root, 3))
    assert (saved["consumed_samples"], saved["train_samples"]) == (32, 32)


# ---------------------------------------------------------------------- saves and keep_last
def test_keep_last_never_deletes_the_step_just_saved(tiny_config, tiny_data, two_steps, tmp_path, caplog):
    """Beside the tracker's iter_2: older steps, complete (0) and interrupted (1), and newer ones, complete
    (9: a save that ended before the tracker moved) and interrupted (8). keep_last=1 after saving step 3
    deletes the older complete ones only; the others are neither counted nor deleted."""
    root = _copy(two_steps, tmp_path)
    for step in (0, 1, 8, 9):
        shutil.copytree(ckpt.iter_dir(root, 2), ckpt.iter_dir(root, step))
    for step in (1, 8):
        os.remove(os.path.join(ckpt.iter_dir(root, step), "metadata.json"))
    with caplog.at_level(logging.WARNING, TRAINER_LOG):
        result = _trainer(tiny_config, tiny_data, **{"checkpoint.save": root, "checkpoint.keep_last": 1,
                                                     "train.train_steps": 3}).train()
    assert result.checkpoint == ckpt.iter_dir(root, 3) and ckpt.read_latest(root) == 3
    assert _iters(root) == [1, 3, 8, 9]
    assert "iter_0000008, iter_0000009 newer than the step just saved (3)" in caplog.text
    assert "iter_0000001 incomplete (no metadata.json: an interrupted save)" in caplog.text
    assert _trainer(tiny_config, tiny_data, **{"checkpoint.save": root, "train.train_steps": 3}).step == 3


def test_restarting_a_finished_run_does_not_save_again(tiny_config, tiny_data, two_steps, tmp_path, monkeypatch):
    root = _copy(two_steps, tmp_path)

    def no_save(*args, **kwargs):
        raise AssertionError("saved again although nothing changed since the load")

    monkeypatch.setattr(ckpt, "save_checkpoint", no_save)
    result = _trainer(tiny_config, tiny_data, **{"checkpoint.save": root}).train()
    assert (result.exit_reason, result.exit_code, result.step) == ("finished", 0, 2)
    assert result.checkpoint == ckpt.iter_dir(root, 2)


def test_state_changed_at_the_end_is_saved_over_the_same_step(tiny_config, tiny_data, two_steps, tmp_path):
    """A run resumed at its last step whose callbacks change the model at the end (the APEX final fuse
    of a checkpoint written before it) saves that step again, replacing it as a whole."""
    root = _copy(two_steps, tmp_path)
    ends = Ends()
    result = _trainer(tiny_config, tiny_data, [ends], **{"checkpoint.save": root}).train()
    assert ends.ended == 1 and result.checkpoint == ckpt.iter_dir(root, 2)
    assert ckpt.read_common(ckpt.iter_dir(root, 2))["fused"] is True
    assert sorted(os.listdir(root)) == ["iter_0000002", ckpt.TRACKER]


def test_a_crash_while_saving_leaves_the_tracker_checkpoint_intact(tiny_config, tiny_data, two_steps, tmp_path,
                                                                   monkeypatch):
    """The worst case: saving the very step the tracker names fails half-way. The save writes elsewhere,
    so the tracker's checkpoint still loads, bit for bit; the failed save's directory is removed at once."""
    from megatron.core import dist_checkpointing

    root = _copy(two_steps, tmp_path)
    trainer = _trainer(tiny_config, tiny_data, **{"checkpoint.save": root})
    weights = _weights(trainer)

    def failing_save(state_dict, directory, *args, **kwargs):
        with open(os.path.join(directory, "__0_0.distcp"), "wb") as f:  # half a shard
            f.write(b"\0" * 100)
        raise OSError("simulated: node lost while saving")

    monkeypatch.setattr(dist_checkpointing, "save", failing_save)
    with pytest.raises(ckpt.CheckpointWriteError, match="simulated: node lost while saving"):
        trainer.save()  # step 2, the tracker's own step
    monkeypatch.undo()
    assert ckpt.read_latest(root) == 2 and ckpt.is_complete(ckpt.iter_dir(root, 2))
    assert not os.path.isdir(os.path.join(root, "saving.iter_0000002"))  # removed at once
    again = _trainer(tiny_config, tiny_data, **{"checkpoint.save": root, "train.train_steps": 3})
    assert again.step == 2
    assert all(torch.equal(p, weights[n]) for n, p in again.model.named_parameters())
    again.train()
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000003", ckpt.TRACKER]


def test_a_tracker_naming_an_incomplete_directory_is_refused_with_the_fix(two_steps, tmp_path):
    root = _copy(two_steps, tmp_path)
    os.remove(os.path.join(ckpt.iter_dir(root, 2), "metadata.json"))
    with pytest.raises(ckpt.CheckpointError, match=r"names step 2 but .*iter_0000002 is incomplete .*write the "
                                                   r"step of an earlier complete checkpoint into"):
        ckpt.read_latest(root)


# ---------------------------------------------------------------------- stopping
def test_a_stop_during_the_last_step_finishes_the_run(tiny_config, tiny_data, tmp_path):
    root = str(tmp_path / "ckpt")
    ends = Ends()
    result = _trainer(tiny_config, tiny_data, [StopAt(1), ends],
                      **{"checkpoint.save": root, "train.eval_steps": 1}).train()
    assert (result.exit_reason, result.exit_code, result.step) == ("finished", 0, 2)
    assert ends.ended == 1 and sorted(result.valid) == [2]  # final callbacks and validation ran
    assert ckpt.read_common(ckpt.iter_dir(root, 2))["fused"] is True


def test_a_stop_without_checkpoint_directory_is_not_exit_75(tiny_config, tiny_data):
    result = _trainer(tiny_config, tiny_data, [StopAt(0)], **{"train.train_steps": 4}).train()
    assert (result.exit_reason, result.step, result.checkpoint) == ("stopped", 1, None)
    assert result.exit_code != 75


class SendSignal(Callback):
    def __init__(self, step, *signals):
        self.step, self.signals = step, signals

    def on_step_start(self, trainer, step):
        if step == self.step:
            for sig in self.signals:
                os.kill(os.getpid(), sig)


def _run(tiny_config, tiny_data, monkeypatch, caplog, *signals, **extra) -> int:
    """run_training (the command line's path) in this process, with signals sent during step 0."""
    from megatron_apex.config import load_config
    from megatron_apex.distributed import LaunchEnv
    from megatron_apex import run

    build = run.build_callbacks
    monkeypatch.setattr(run, "build_callbacks", lambda cfg: [*build(cfg), SendSignal(0, *signals)])
    torch.set_num_threads(1)
    cfg = load_config(tiny_config, _overrides(tiny_data, **{"train.train_steps": 4, **extra}), world_size=1)
    with caplog.at_level(logging.INFO, TRAINER_LOG):
        return run.run_training(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))


def _no_traceback(caplog) -> bool:
    return not any(r.exc_info for r in caplog.records if r.levelno >= logging.INFO)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_exits_75(tiny_config, tiny_data, tmp_path, monkeypatch, caplog, sig):
    root, handler = str(tmp_path / "ckpt"), signal.getsignal(sig)
    assert _run(tiny_config, tiny_data, monkeypatch, caplog, sig, **{"checkpoint.save": root}) == 75
    assert f"received {sig.name}: will save a checkpoint and exit after this step" in caplog.text
    assert ckpt.read_latest(root) == 1 and _no_traceback(caplog)
    assert signal.getsignal(sig) == handler  # the run put the previous handler back


def test_signal_without_checkpoint_directory_says_so_and_is_not_75(tiny_config, tiny_data, monkeypatch, caplog):
    assert _run(tiny_config, tiny_data, monkeypatch, caplog, signal.SIGTERM) == 128 + signal.SIGTERM
    assert "received SIGTERM: will exit without saving (checkpoint.save is not set) after this step" in caplog.text
    assert "training stopped at step 1 without saving (checkpoint.save is not set)" in caplog.text


def test_second_ctrl_c_aborts_at_once(tiny_config, tiny_data, tmp_path, monkeypatch, caplog):
    root = str(tmp_path / "ckpt")
    code = _run(tiny_config, tiny_data, monkeypatch, caplog, signal.SIGINT, signal.SIGINT,
                **{"checkpoint.save": root})
    assert code == 130 and "interrupted: aborted without saving" in caplog.text
    assert ckpt.read_latest(root) is None and _no_traceback(caplog)


@pytest.mark.parametrize("extra, line", [
    ({"model.hidden_size": 96}, "checkpoint error: checkpoint {path} was saved for a different model; "
                                "hidden_size: checkpoint 64 vs config 96; head_dim: checkpoint 16 vs config 24"),
    ({"model.vocab_size": "null", "data.tokenizer_type": "sentencepiece", "data.tokenizer_model": "/nonexistent/t.model"},
     "configuration error: data.tokenizer_model='/nonexistent/t.model': no such file"),
], ids=["checkpoint", "tokenizer"])
def test_errors_after_start_up_are_one_line_and_exit_2(tiny_config, tiny_data, two_steps, tmp_path, monkeypatch,
                                                        caplog, extra, line):
    root = _copy(two_steps, tmp_path)
    code = _run(tiny_config, tiny_data, monkeypatch, caplog, **{"checkpoint.save": root, **extra})
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and errors == [line.format(path=ckpt.iter_dir(root, 2))] and _no_traceback(caplog)


def test_the_checkpoint_writer_helper_survives_the_jobs_stop_signals(two_steps):
    """slurm and torchrun signal the whole process group: megatron-core's writer results manager (a
    child process, started by the first save) must outlive SIGTERM/SIGUSR1 for the stop's save to work."""
    import time

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue  # started by the saves of the two_steps fixture
    manager = queue._manager._process
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        os.kill(manager.pid, sig)
    time.sleep(0.5)
    assert manager.is_alive()
    queue.put("still there")
    assert queue.get() == "still there"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_checkpoint_writer_helper_dies_with_a_killed_trainer(tmp_path):
    """The helper blocks the stop signals, so nothing but its parent's death can end it when the trainer
    is killed outright (SIGKILL, the OOM killer): it must not stay behind, orphaned."""
    import subprocess
    import time

    script = (
        "import os, sys, time\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
        "from megatron_apex.compat.dist_checkpoint import start_writer_results_queue\n"
        "start_writer_results_queue()\n"
        "print(filesystem_async._results_queue._manager._process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    helper = None
    try:
        helper = int(proc.stdout.readline())
        assert _alive(helper)
        proc.kill()
        proc.wait(timeout=30)
        end = time.monotonic() + 20
        while _alive(helper) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _alive(helper), "the writer helper outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        if helper is not None and _alive(helper):
            os.kill(helper, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------- throughput
def test_throughput_leaves_out_paused_time(monkeypatch):
    clock = [100.0]
    from megatron_apex.training import metrics

    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    tp = Throughput(tokens_per_step=1000, flops_per_token=1.0, world_size=1, peak_tflops=None)
    clock[0] += 0.5
    tp.step()
    with tp.paused():  # a checkpoint or a validation
        clock[0] += 20.0
    clock[0] += 0.5
    tp.step()
    report = tp.report()
    assert report["step_time_s"] == pytest.approx(0.5) and report["tokens_per_s"] == pytest.approx(2000)


def test_forked_children_leave_the_stop_signals_to_the_trainer():
    """DataLoader workers (data.num_workers > 0) are forked with the trainer's handler, and a Ctrl-C reaches
    the whole process group: each worker used to print "received SIGINT: will save ..." too, and a second
    Ctrl-C raised KeyboardInterrupt in each. A forked child does nothing; the trainer stops it."""
    import multiprocessing

    from megatron_apex.training.exit import GracefulExit

    def child(queue):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a second one would raise KeyboardInterrupt in the trainer
        queue.put(graceful.received)

    graceful = GracefulExit(None, handle_signals=True)
    try:
        queue = multiprocessing.get_context("fork").Queue()
        proc = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
        proc.start()
        assert queue.get(timeout=30) is None
        proc.join(timeout=30)
        assert proc.exitcode == 0
        assert graceful.received is None  # and the trainer itself still reacts
        os.kill(os.getpid(), signal.SIGINT)
        assert graceful.received == signal.SIGINT
    finally:
        graceful.restore()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_ctrl_c_while_the_writer_helper_starts_leaves_no_traceback(tmp_path):
    """The second Ctrl-C often arrives while the first one's save starts the writer results manager; it
    used to interrupt the handshake, and the manager died with "Process SyncManager-1: ... BrokenPipeError".
    The abort (KeyboardInterrupt) must still happen, after the start."""
    import subprocess
    import time

    slow = tmp_path / "slow-python"  # the manager's interpreter starts 2 s late: the Ctrl-C lands mid-start
    slow.write_text(f'#!/usr/bin/env bash\nsleep 2\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    script = (
        "import multiprocessing, os, signal, sys, time\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
        "from megatron_apex.compat.dist_checkpoint import start_writer_results_queue\n"
        f"multiprocessing.set_executable({str(slow)!r})\n"
        "print('starting', flush=True)\n"
        "try:\n"
        "    start_writer_results_queue()\n"
        "except KeyboardInterrupt:\n"
        "    print('aborted', flush=True)\n"
        "    time.sleep(4)  # the trainer winds down; the helper is still there\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "starting"
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "aborted" in out
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_save_warns_early_when_free_space_is_short(tiny_config, tiny_data, two_steps, tmp_path, monkeypatch, caplog):
    """Before writing, a save compares the free space with the last checkpoint's size and warns (it still
    tries: the estimate may be pessimistic)."""
    import collections
    import shutil

    root = _copy(two_steps, tmp_path)
    trainer = _trainer(tiny_config, tiny_data, **{"checkpoint.save": root, "train.train_steps": 3})
    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(*real(path)[:2], 1000))
    with caplog.at_level(logging.WARNING, "megatron_apex.training.checkpoint"):
        trainer.train()
    assert "GiB free, and a checkpoint takes about" in caplog.text and "will probably fail" in caplog.text
    assert ckpt.read_latest(root) == 3
