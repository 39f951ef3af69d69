"""Step time around a checkpoint save: blocking against ``checkpoint.async_save``.

One process trains a model on mock data for ``--steps`` steps with a periodic save in the middle
(step ``--steps // 2``) and the final save after the loop; each mode runs in its own fresh process, the
two modes interleaved over ``--reps`` repetitions. A save's *stall* is the time from the start of the step
before it to the end of the training loop, minus as many median steps of the steps before the save: all
that the save added to training, the write (blocking) or building the state dict, forking the writer,
the writer's competition for the CPUs and the publication at a later step (async). The final save after
the loop is the same in both. Prints both stalls and their ratio (async / blocking); below 1 is the goal.

CPU (default): hidden 1024, 8 layers (~110M parameters, a 1.3 GB checkpoint with Adam moments), fp32.

    python benchmarks/bench_async_save.py [--reps 2] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["data.mock=true", "data.tokenizer_type=none", "model.vocab_size=8192", "model.num_layers=8",
         "model.hidden_size=1024", "model.ffn_hidden_size=2816", "model.num_attention_heads=16",
         "data.seq_length=128", "model.max_position_embeddings=128", "train.micro_batch_size=1",
         "train.global_batch_size=1", "train.log_interval=1000", "train.exit_on_signal=false"]


def child(args) -> None:
    """One run in this process: print the start time of every step and the step of the periodic save."""
    import torch

    sys.path.insert(0, ROOT)
    from megatron_apex.compat.cpu import apply_cpu_patches
    from megatron_apex.config import load_config
    from megatron_apex.distributed import LaunchEnv, destroy_distributed, initialize_distributed
    from megatron_apex.training.trainer import Callback, Trainer

    torch.set_num_threads(args.threads)
    save_at = args.steps // 2
    cfg = load_config(None, [*SHAPE, f"train.train_steps={args.steps}", f"checkpoint.save={args.dir}",
                             f"checkpoint.save_interval={save_at}", f"checkpoint.async_save={args.child == 'async'}"])
    starts = {}

    class Clock(Callback):
        def on_step_start(self, trainer, step):
            starts[step] = time.perf_counter()

        def on_train_end(self, trainer):
            starts[args.steps] = time.perf_counter()

    apply_cpu_patches()
    ctx = initialize_distributed(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", args.port, "single"))
    Trainer(cfg, ctx, [Clock()]).setup().train()
    destroy_distributed()
    print(json.dumps({"starts": starts, "save_at": save_at}))


def stall(run: dict) -> float:
    s = {int(k): v for k, v in run["starts"].items()}
    first, end = run["save_at"] - 1, max(s)  # the step before the save; the end of the loop
    before = [s[i + 1] - s[i] for i in range(1, first)]  # step 0 warms up
    return s[end] - s[first] - (end - first) * statistics.median(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["blocking", "async"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    import socket

    stalls = {"blocking": [], "async": []}
    for rep in range(args.reps):
        for mode in (("blocking", "async") if rep % 2 == 0 else ("async", "blocking")):
            with tempfile.TemporaryDirectory() as d, socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
                sock.close()
                out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", d, "--port", str(port),
                                      "--steps", str(args.steps), "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True, cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            run = json.loads(out.stdout.strip().splitlines()[-1])
            stalls[mode].append(stall(run))
            print(f"rep {rep + 1} {mode:8s}: save stall {stalls[mode][-1]:.2f} s", flush=True)
    blocking, background = statistics.median(stalls["blocking"]), statistics.median(stalls["async"])
    print(f"save stall (median of {args.reps}): blocking {blocking:.2f} s, async {background:.2f} s; "
          f"ratio async/blocking {background / blocking:.3f}")


if __name__ == "__main__":
    main()
