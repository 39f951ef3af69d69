"""Fault injection on checkpoints and index caches, through the command line a user runs: damaged
checkpoints are found before anything loads them and the run falls back to the newest intact one (or
refuses, exit 2); a lost tracker never restarts a run from step 0; files that try to run code
(a checkpoint's .metadata, a byte item in a shard, a dataset index cache) are refused in one line, and
their code never runs."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


class _Payload:
    """What a crafted file carries: unpickling it creates ``marker`` (run as a shell command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _train(tiny_data, ckpt, steps, *extra, cache=None):
    from helpers import tiny_overrides

    over = tiny_overrides(tiny_data, **{"train.train_steps": steps, "checkpoint.save": str(ckpt),
                                        "checkpoint.save_interval": 2,
                                        **({"data.data_cache_path": str(cache)} if cache else {})})
    proc = subprocess.run([sys.executable, "-m", "megatron_apex.cli", "train", os.path.join(ROOT, "examples",
                           "tiny_cpu.yaml"), *over, *extra], capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def _background_run(tiny_data, ckpt, save_interval, out=subprocess.DEVNULL, **extra):
    """A long run (100,000 steps) in its own session, saving every ``save_interval`` steps."""
    from helpers import tiny_overrides

    over = tiny_overrides(tiny_data, **{"train.train_steps": 100000, "checkpoint.save": str(ckpt),
                                        "checkpoint.save_interval": save_interval, **extra})
    return subprocess.Popen([sys.executable, "-m", "megatron_apex.cli", "train",
                             os.path.join(ROOT, "examples", "tiny_cpu.yaml"), *over], cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT if out is not subprocess.DEVNULL else subprocess.DEVNULL,
                            start_new_session=True)


def _errors(log):
    return [line for line in log.splitlines() if " ERROR " in line or line.startswith("Traceback")]


def test_damaged_checkpoints_fall_back_and_a_lost_tracker_resumes(tiny_data, tmp_path):
    from megatron_apex.training.checkpoint import read_latest

    ckpt = tmp_path / "ckpt"
    rc, log = _train(tiny_data, ckpt, 6)
    assert rc == 0, log
    # A flipped byte inside the newest shard: found by its CRC-32, the run resumes from step 4.
    shard = ckpt / "iter_0000006" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    rc, log = _train(tiny_data, ckpt, 8)
    assert rc == 0, log
    assert "iter_0000006 is damaged" in log and "its contents changed since the save" in log, log
    assert "resumed from" in log and "at step 4" in log and read_latest(str(ckpt)) == 8
    # A truncated newest shard (a partial copy): the same, from step 6.
    with open(ckpt / "iter_0000008" / "__0_1.distcp", "r+b") as f:
        f.truncate(100)
    # The tracker deleted as well: the newest intact checkpoint is used, not step 0.
    os.remove(ckpt / "latest_checkpointed_iteration.txt")
    rc, log = _train(tiny_data, ckpt, 10)
    assert rc == 0, log
    assert "latest_checkpointed_iteration.txt is missing" in log and "truncated" in log, log
    assert "at step 6" in log and read_latest(str(ckpt)) == 10
    # Nothing intact: one line, exit 2, nothing overwritten.
    for step in (6, 8, 10):
        (ckpt / f"iter_{step:07d}" / "common.pt").write_bytes(b"garbage")
    for step in (2, 4):
        (ckpt / f"iter_{step:07d}" / "common.pt").unlink()
    before = sorted(os.listdir(ckpt))
    rc, log = _train(tiny_data, ckpt, 12)
    assert rc == 2 and "no intact checkpoint" in log, log
    assert sorted(os.listdir(ckpt)) == before and "Traceback" not in log


def test_a_crafted_metadata_file_never_runs(tiny_data, tmp_path):
    """A .metadata that unpickles to code: refused (exit 2, one line naming it) by the run, and by the
    tools that read checkpoints; the code never runs."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    rc, log = _train(tiny_data, ckpt, 2)
    assert rc == 0, log
    last = ckpt / "iter_0000002"
    (last / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (last / "checksums.json").unlink()  # as in a checkpoint of an older version: no record to compare with
    rc, log = _train(tiny_data, ckpt, 4)
    assert rc == 2 and "it asks for posix.system" in log and ".metadata" in log, log
    assert not marker.exists() and "Traceback" not in log
    for cmd in (["tools/effective_rank.py", "--checkpoint", str(ckpt)],
                ["tools/convert_checkpoint.py", "export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")],
                ["tools/evaluate.py", "--model", str(ckpt), "--data", tiny_data]):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 2 and "posix.system" in proc.stderr, (cmd, proc.stdout, proc.stderr)
        assert not marker.exists(), cmd


def test_a_crafted_byte_item_never_runs(tiny_data, tmp_path):
    """A shard's byte item (the RNG state) replaced by a torch.save of code, the checkpoint's metadata and
    checksums rewritten to match (as an attacker would): refused in one line, exit 2, the code not run."""
    import torch

    from megatron_apex.training.integrity import read_metadata, record_manifest

    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    rc, log = _train(tiny_data, ckpt, 2)
    assert rc == 0, log
    last = ckpt / "iter_0000002"
    meta = read_metadata(str(last))
    (index,) = [i for i in meta.storage_data if i.fqn.startswith("rng_state")]
    info = meta.storage_data[index]
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    shard = last / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    meta.storage_data[index] = type(info)(info.relative_path, offset, len(buf.getvalue()))
    (last / ".metadata").write_bytes(pickle.dumps(meta))
    os.remove(last / "checksums.json")
    record_manifest(str(last), 0, 1)
    rc, log = _train(tiny_data, ckpt, 4)
    assert rc == 2 and "refusing to read it: not plain checkpoint data" in log and "rng_state" in log, log
    assert not marker.exists() and "Traceback" not in log


def test_a_poisoned_index_cache_never_runs(tiny_data, tmp_path):
    """A GPTDataset index cache (.npy) replaced by a pickled object array: refused naming the file (the
    message says to delete it), exit 2, the code not run."""
    cache, marker = tmp_path / "cache", tmp_path / "PWNED"
    rc, log = _train(tiny_data, tmp_path / "ckpt", 2, cache=cache)
    assert rc == 0, log
    (index,) = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files if f.endswith("document_index.npy")
                and "-train-" in f]
    np.save(index, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    rc, log = _train(tiny_data, tmp_path / "ckpt2", 2, cache=cache)
    assert rc == 2 and index in log and "refusing to read this index cache" in log and "delete it" in log, log
    assert not marker.exists() and "Traceback" not in log


def test_run_lock_liveness(tmp_path, monkeypatch):
    """The lock of a live run refuses a second one naming its holder; a lock whose process is gone (same host)
    or whose heartbeat stopped (another host) is taken over with a warning; release removes only one's own."""
    import time as time_mod

    from megatron_apex.training import lock as L

    # A live process on this host (this test's parent) holds it: refused, naming the holder.
    live = {"host": L.socket.gethostname(), "pid": os.getppid(), "process_start": L._process_start(os.getppid()),
            "started": time_mod.time(), "token": "z"}
    (tmp_path / L.LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(L.LockHeldError) as err:
        L.RunLock(str(tmp_path)).acquire()
    msg = str(err.value)
    assert f"pid {os.getppid()}" in msg and "started 20" in msg and "its own checkpoint.save" in msg, msg
    os.remove(tmp_path / L.LOCK_NAME)
    # This process's own earlier run that ended without releasing (an exception) is taken over; release
    # removes the lock.
    first = L.RunLock(str(tmp_path)).acquire()
    second = L.RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / L.LOCK_NAME).read_text())["token"] == second.token
    first.release()
    assert (tmp_path / L.LOCK_NAME).exists()  # not first's any more
    second.release()
    assert not (tmp_path / L.LOCK_NAME).exists()
    # A dead process on this host (pid 2**22 + 1 exists on no Linux default pid range).
    dead = {"host": L.socket.gethostname(), "pid": 2 ** 22 + 1, "process_start": "1", "started": 0, "token": "x"}
    (tmp_path / L.LOCK_NAME).write_text(json.dumps(dead))
    taken = L.RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / L.LOCK_NAME).read_text())["token"] == taken.token
    taken.release()
    # Another host: alive while its heartbeat is fresh, taken over once it is older than STALE_S.
    other = {"host": "node-elsewhere", "pid": 1, "process_start": "1", "started": 0, "token": "y"}
    (tmp_path / L.LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(L.LockHeldError, match="host node-elsewhere, pid 1"):
        L.RunLock(str(tmp_path)).acquire()
    old = time_mod.time() - L.STALE_S - 5
    os.utime(tmp_path / L.LOCK_NAME, (old, old))
    L.RunLock(str(tmp_path)).acquire().release()
    # release() leaves another run's lock alone.
    (tmp_path / L.LOCK_NAME).write_text(json.dumps(other))
    L.RunLock(str(tmp_path)).release()
    assert (tmp_path / L.LOCK_NAME).exists()


def test_two_runs_on_one_checkpoint_directory(tiny_data, tmp_path):
    """While a run trains, a second one on its checkpoint.save is refused (exit 2, naming the first's pid),
    and nothing of the first run's checkpoints changes; after the first is killed (-9), a new run takes the
    lock over with a warning and resumes."""
    import signal
    import time as time_mod

    ckpt = tmp_path / "ckpt"
    first = _background_run(tiny_data, ckpt, 5)
    try:
        deadline = time_mod.time() + 300
        while not (ckpt / "latest_checkpointed_iteration.txt").exists():
            assert first.poll() is None and time_mod.time() < deadline, "the first run did not save"
            time_mod.sleep(0.5)
        rc, log = _train(tiny_data, ckpt, 3)
        assert rc == 2 and "is in use by another run" in log and f"pid {first.pid}" in log, log
        assert "Traceback" not in log
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    rc, log = _train(tiny_data, ckpt, 3)
    assert rc == 0 and "taking over the lock of a run that is gone" in log, log
    assert not (ckpt / "run.lock").exists()


def test_sigterm_to_the_process_group_with_data_workers_saves_and_exits_75(tiny_data, tmp_path):
    """slurm's pre-emption SIGTERM reaches the whole process group, DataLoader workers included: the run
    still saves at the step boundary and exits 75 (resubmit), as without workers; and it resumes from there."""
    import signal
    import time as time_mod

    from megatron_apex.training.checkpoint import read_latest

    ckpt = tmp_path / "ckpt"
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = _background_run(tiny_data, ckpt, 5, out, **{"data.num_workers": 2})
        deadline = time_mod.time() + 300
        while not (ckpt / "latest_checkpointed_iteration.txt").exists():
            assert proc.poll() is None and time_mod.time() < deadline, log.read_text()[-3000:]
            time_mod.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=300)
    text = log.read_text()
    assert rc == 75, text[-3000:]
    assert "received SIGTERM" in text and "DataLoader worker" not in text and "Traceback" not in text, text[-3000:]
    step = read_latest(str(ckpt))
    assert step is not None and step > 5 and f"stopped at step {step}" in text, text[-2000:]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_FORKING_PARENT = """
import os, sys, time
sys.path.insert(0, {root!r})
from megatron_apex.compat.process import forked_children_die_with_parent
if {hook}:
    forked_children_die_with_parent()
pid = os.fork()
if pid == 0:  # as megatron-core's checkpoint writer: forked, then busy or waiting on its parent
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("hook", [True, False], ids=["trainer", "without-the-hook"])
def test_forked_children_die_with_the_trainer(hook):
    """What the trainer installs (compat.process.forked_children_die_with_parent): a child it forks (a
    checkpoint writer, a data worker) is killed by Linux when the trainer dies of SIGKILL, instead of
    living on orphaned; without it the child stays (the case the hook is for)."""
    import signal
    import time as time_mod

    parent = subprocess.Popen([sys.executable, "-c", _FORKING_PARENT.format(root=ROOT, hook=hook)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time_mod.time() + 10
        while _alive(child) and time_mod.time() < deadline:
            time_mod.sleep(0.1)
        assert _alive(child) != hook, "the forked child outlived its parent" if hook else "no orphan to show"
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_save_that_cannot_write_is_one_line_and_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    """A save whose files cannot be written (a file size limit stands in for a full disk: no root needed):
    one line, exit 74, the staging directory removed at once, the previous checkpoint intact and resumable."""
    import resource
    import signal as signal_mod

    from helpers import tiny_overrides

    from megatron_apex.training.checkpoint import read_latest

    ckpt = tmp_path / "ckpt"
    rc, log = _train(tiny_data, ckpt, 2)
    assert rc == 0, log
    size = max(f.stat().st_size for f in (ckpt / "iter_0000002").iterdir())

    def limit():
        signal_mod.signal(signal_mod.SIGXFSZ, signal_mod.SIG_IGN)  # write() then fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    over = tiny_overrides(tiny_data, **{"train.train_steps": 4, "checkpoint.save": str(ckpt),
                                        "checkpoint.save_interval": 2})
    proc = subprocess.run([sys.executable, "-m", "megatron_apex.cli", "train",
                           os.path.join(ROOT, "examples", "tiny_cpu.yaml"), *over], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, preexec_fn=limit)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 74, log[-3000:]
    errors = _errors(log)
    assert len(errors) == 1 and "could not write the checkpoint of step 4" in errors[0], log[-3000:]
    assert "the last checkpoint (step 2) is intact" in errors[0]
    assert sorted(p.name for p in ckpt.iterdir() if p.name != "logs") == ["iter_0000002",
                                                                         "latest_checkpointed_iteration.txt"]
    assert read_latest(str(ckpt)) == 2
    rc, log = _train(tiny_data, ckpt, 4)
    assert rc == 0 and "at step 2" in log, log


@pytest.mark.parametrize("what,rank", [("move", 0), ("manifest", 1)], ids=["rank0-move", "rank1-manifest"])
def test_a_publish_that_fails_on_one_rank_stops_every_rank(tiny_data, tiny_config, tmp_path, what, rank):
    """Publishing a save (manifests on every rank, then rank 0's move into place and tracker) that fails on
    one rank raises the same CheckpointWriteError on every rank, naming the rank, instead of leaving the
    others waiting at a barrier until the distributed timeout; nothing half-published is left."""
    from distributed_utils import run_distributed
    from helpers import tiny_overrides
    from training_workers import publish_failure_worker

    over = tiny_overrides(tiny_data, **{"checkpoint.save": str(tmp_path / "ckpt"),
                                        "parallel.distributed_timeout_minutes": 2})
    results = run_distributed(publish_failure_worker, 2, tiny_config, over, rank, what, timeout=300)
    errors = {r["error"] for r in results}
    assert len(errors) == 1, errors
    (error,) = errors
    assert error is not None and "could not publish the checkpoint of step 0" in error, error
    assert f"rank {rank}: OSError" in error and "no earlier checkpoint exists" in error, error
    for r in results:  # no checkpoint, no tracker, no staging directory left behind
        assert [n for n in r["listing"] if n not in ("logs", "run.lock")] == [], r["listing"]
