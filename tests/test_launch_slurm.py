"""The slurm launch scripts, run for real on this machine.

``srun`` and ``scontrol`` are replaced by stubs on PATH and the batch environment of a 2-node x 1-task
allocation is set by hand; the scripts then start local CPU processes that train the tiny model with
gloo. A SIGTERM to the job step (what ``#SBATCH --signal=TERM@N`` does) must produce a checkpoint
and exit code 75; the same command then resumes from that checkpoint (and, with
``EXIT_AFTER_MINUTES``, stops again cleanly, which ``REQUEUE=1`` turns into ``scontrol requeue``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY
from distributed_utils import free_port
from helpers import tiny_overrides, wait_or_kill

JOB_ID = "4242"
TRAIN_STEPS = 2000  # long enough that the SIGTERM always arrives mid-run

# srun: SLURM_NNODES "nodes" x --ntasks-per-node tasks, all local. Each task gets its own process
# group, and a signal to srun goes to every task's group, as slurmstepd signals a step's processes.
SRUN_STUB = r"""#!/usr/bin/env bash
echo $$ >"$STUB_DIR/srun.pid"
per_node=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ntasks-per-node=*) per_node="${1#*=}"; shift ;;
    -*) shift ;;
    *) break ;;
  esac
done
ntasks=$((SLURM_NNODES * per_node))
pids=()
signal_tasks() { for p in "${pids[@]}"; do kill -s "$1" -- "-$p" 2>/dev/null; done; }
trap 'signal_tasks TERM' TERM
trap 'signal_tasks USR1' USR1
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) SLURM_NTASKS=$ntasks \
    setsid "$@" &
  pids+=("$!")
done
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p"; done
  wait "$p"; r=$?
  if ((r > rc)); then rc=$r; fi
done
exit "$rc"
"""

SCONTROL_STUB = r"""#!/usr/bin/env bash
echo "$*" >>"$STUB_DIR/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then
  echo 127.0.0.1
  echo 127.0.0.1
fi
"""


@pytest.fixture()
def slurm_env(tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({
        "PATH": f"{stubs}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
        "STUB_DIR": str(stubs), "PYTHON": sys.executable, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "megatron-apex", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": ROOT,
        "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120",
    })
    return env, stubs


def _launch(script: str, args: list, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch_scripts", script), TINY, *args], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(pattern: str, log_path, proc, timeout: float) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(pattern, log_path.read_text())
        if m:
            return m
        if proc.poll() is not None:
            pytest.fail(f"launch exited ({proc.returncode}) before {pattern!r}; log:\n{log_path.read_text()[-6000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail(f"no {pattern!r} within {timeout} s; log:\n{log_path.read_text()[-6000:]}")


def _latest(save_dir) -> int:
    return int((save_dir / "latest_checkpointed_iteration.txt").read_text().strip())


@pytest.mark.slow
@pytest.mark.parametrize("script", ["slurm_srun.sbatch", "slurm_torchrun.sbatch"])
def test_sigterm_checkpoint_and_resume(script, slurm_env, tiny_data, tmp_path):
    env, stubs = slurm_env
    save = tmp_path / "ckpt"
    args = tiny_overrides(tiny_data, **{"train.train_steps": TRAIN_STEPS, "checkpoint.save": str(save),
                                        "data.data_cache_path": str(tmp_path / "index-cache")})

    # 1) Train until steps are logged, then signal the job step like slurm's --signal=TERM@N.
    log1 = tmp_path / "run1.log"
    with open(log1, "w") as log:
        proc = _launch(script, args, env, log)
        step = int(_wait_for(rf"step (\d+)/{TRAIN_STEPS}", log1, proc, timeout=240).group(1))
        os.kill(int((stubs / "srun.pid").read_text()), signal.SIGTERM)
        rc = wait_or_kill(proc, log1, timeout=180)
    out1 = log1.read_text()
    assert rc == 75, out1[-6000:]
    assert "received SIGTERM" in out1 and "git revision:" in out1 and "versions: python" in out1
    saved = _latest(save)
    assert step <= saved < TRAIN_STEPS
    assert (tmp_path / "index-cache").is_dir()  # dataset indices went to data.data_cache_path
    if script == "slurm_torchrun.sbatch":
        # torchrun, not slurm, delivered the signal: the stub only reached the torchrun agents' groups.
        assert "Received Signals.SIGTERM death signal" in out1 or "Received 15 death signal" in out1, out1[-6000:]

    # 2) The same command resumes; EXIT_AFTER_MINUTES stops it after one step, REQUEUE=1 requeues.
    log2 = tmp_path / "run2.log"
    env2 = {**env, "EXIT_AFTER_MINUTES": "0.0001", "REQUEUE": "1", "MASTER_PORT": str(free_port())}
    with open(log2, "w") as log:
        rc = wait_or_kill(_launch(script, args, env2, log), log2, timeout=240)
    out2 = log2.read_text()
    assert rc == 75, out2[-6000:]
    assert f"resumed from {save} at step {saved}" in out2
    assert "train.exit_after_minutes reached" in out2
    assert _latest(save) == saved + 1
    assert f"requeue {JOB_ID}" in (stubs / "scontrol.log").read_text()


@pytest.mark.parametrize("script", ["slurm_srun.sbatch", "slurm_torchrun.sbatch"])
def test_paths_are_relative_to_the_submit_directory(script, slurm_env, tmp_path):
    """Relative paths are the submit directory's, as with the other launch scripts (the scripts used to
    cd to APEX_DIR); APEX_DIR only names the checkout the tasks import. A submit directory that is not a
    checkout, without APEX_DIR, is a one-line configuration error (it used to fail at `source`)."""
    from test_launch_scripts import WHERE_STUB

    env, _ = slurm_env
    stub = tmp_path / "python"
    stub.write_text(WHERE_STUB)
    stub.chmod(0o755)
    here = tmp_path / "submit-dir"
    here.mkdir()
    shutil.copy(TINY, here / "my.yaml")
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    env.update({"PYTHON": str(stub), "REAL_PYTHON": sys.executable, "REPORT": str(tmp_path / "report"),
                "SLURM_SUBMIT_DIR": str(here), "SLURM_NNODES": "1", "SLURM_NTASKS": "1"})
    path = os.path.join(ROOT, "launch_scripts", script)
    proc = subprocess.run(["bash", path, "my.yaml"], cwd=here, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not a megatron-apex checkout" in proc.stderr, proc.stdout + proc.stderr
    proc = subprocess.run(["bash", path, "my.yaml", "checkpoint.save=ckpt"], cwd=here, env={**env, "APEX_DIR": ROOT},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cwd, found, module = (tmp_path / "report").read_text().splitlines()
    assert os.path.realpath(cwd) == os.path.realpath(here)
    assert found == "yes"
    assert os.path.realpath(module) == os.path.realpath(os.path.join(ROOT, "megatron_apex"))
