"""Start-up: launcher detection (torchrun, slurm, single process), the real mpirun path, and a
rendezvous failure that tells the user what to check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from distributed_utils import free_port
from megatron_apex.distributed import LaunchEnv, _first_slurm_host, detect_launch_env
from megatron_apex.training import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch):
    """A PATH without scontrol, so the hostlist is expanded by our own parser."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "1234",
           # torchrun inside an srun allocation: torchrun's variables describe this process
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert detect_launch_env(env) == LaunchEnv(3, 8, 1, "10.0.0.7", 1234, "torchrun")


def test_slurm_variables_without_scontrol(no_scontrol):
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "node[03-05],other"}
    assert detect_launch_env(env) == LaunchEnv(5, 8, 1, "node03", 29500, "slurm")
    # An explicit master and port win over the node list.
    env.update(MASTER_ADDR="login1", MASTER_PORT="6000")
    assert detect_launch_env(env) == LaunchEnv(5, 8, 1, "login1", 6000, "slurm")


@pytest.mark.parametrize("nodelist, first", [
    ("node[03-05],other", "node03"),
    ("node[07,09-12]", "node07"),
    ("gpu-a100-[001-004]", "gpu-a100-001"),
    ("alpha,beta", "alpha"),
    ("solo", "solo"),
    ("node[3-4].cluster", "node3.cluster"),
    ("rack[2-3]-n[01-04],x", "rack2-n01"),
])
def test_slurm_hostlist_fallback(no_scontrol, nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_slurm_hostlist_uses_scontrol_when_present(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "scontrol"
    script.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames n[1-2]' ] && printf 'real-n1\\nreal-n2\\n'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    assert _first_slurm_host("n[1-2]") == "real-n1"


def test_single_process(monkeypatch):
    env = detect_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (0, 1, 0, "127.0.0.1", "single")
    assert 0 < env.master_port < 65536
    assert detect_launch_env({"MASTER_PORT": "7777"}).master_port == 7777


def test_rendezvous_failure_names_the_address():
    """A rank that cannot reach the master store fails with the address and what to check."""
    import torch.distributed as dist

    from megatron_apex.config import load_config
    from megatron_apex.distributed import initialize_distributed

    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    # a 60 ms timeout: the client gives up at once (a real timeout would take its full minutes).
    cfg = load_config(None, ["data.mock=true", "model.vocab_size=256", "data.tokenizer_type=none",
                             "parallel.distributed_timeout_minutes=0.001"])
    port = free_port()  # bound and released: nothing listens there
    with pytest.raises(RuntimeError) as info:
        initialize_distributed(cfg, LaunchEnv(1, 2, 1, "127.0.0.1", port, "torchrun"))
    message = str(info.value)
    assert f"rank 1/2 (torchrun) could not join the rendezvous at tcp://127.0.0.1:{port}" in message
    assert "MASTER_ADDR" in message and "MASTER_PORT" in message
    assert not dist.is_initialized()


@pytest.mark.slow
def test_mpirun_starts_two_ranks(tmp_path, tiny_config):
    """``mpirun -n 2 python -m megatron_apex.train``: ranks, master and port come from MPI alone."""
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not os.path.exists(mpirun):
        mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun next to the Python interpreter or on PATH (install mpich or Open MPI)")
    pytest.importorskip("mpi4py", reason="mpi4py is needed for the MPI start path")
    save = str(tmp_path / "ckpt")
    overrides = [
        "data.mock=true", "data.tokenizer_type=none", "model.vocab_size=256", "model.num_layers=2",
        "model.hidden_size=64", "model.ffn_hidden_size=128", "data.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.train_steps=2", "train.log_interval=1", "train.eval_interval=0",
        "train.eval_steps=0", "checkpoint.save_interval=0", f"checkpoint.save={save}",
    ]
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if k not in launch_vars and not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    is_mpich = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout.find("HYDRA") >= 0
    cmd = [mpirun, "-n", "2", *(["-launcher", "fork"] if is_mpich else []),
           sys.executable, "-m", "megatron_apex.train", tiny_config, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in (0, 1):
        assert f"rank{rank}] INFO megatron_apex.training.trainer: training from step 0 to 2" in out, out[-4000:]
    assert "distributed start (mpi, gloo): world=2 TP=1 PP=1 CP=1 DP=2" in out
    assert ckpt.read_latest(save) == 2
    assert ckpt.read_common(ckpt.iter_dir(save, 2))["layout"] == {"tp": 1, "pp": 1, "dp": 2, "cp": 1}


def test_process_groups_refuse_a_cpu_machine_without_the_cpu_patches():
    """megatron-core's CUDA assumptions are redirected by the entry points, visibly; a library caller that
    skips that is told what to call, rather than meeting a CUDA error deep in megatron-core."""
    import subprocess
    import sys

    code = ("from megatron_apex.config import Config\n"
            "from megatron_apex.distributed import LaunchEnv, initialize_distributed\n"
            "cfg = Config()\n"
            "cfg.data.mock, cfg.data.tokenizer_type, cfg.model.vocab_size = True, 'none', 256\n"
            "initialize_distributed(cfg, LaunchEnv(0, 1, 0, '127.0.0.1', 29999, 'single'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode != 0
    assert "apply_cpu_patches() first" in out.stderr, out.stderr[-2000:]
