"""Training-engine overhead: megatron-apex's Trainer.train_step against a bare megatron-core loop.

Both loops train the same model (``build_model`` + ``initialize_weights``: identical weights), with
megatron-core DDP, ``get_megatron_optimizer`` (AdamW, clipping) and ``get_forward_backward_func``,
on the same batches (the framework's global sample order, precomputed for the bare loop), in the
same process. What the framework adds on top is what is measured: the LR schedule, the data
loader, the loss/stop all-reduce and the non-finite checks; no logging or checkpoints in either.
Repetitions are interleaved (framework block, bare block, bare block, framework block, ...) so that
load from other processes on the machine hits both alike; the first steps of each loop are warm-up
and excluded. The losses of the two loops are compared step by step: they must agree, which shows
that both did the same work.

CPU (default): hidden 256, 4 layers, seq 256, mock data, fp32, 4 micro-batches per step, one
process, ``--threads`` torch threads (default 1).
GPU (``--tinyllama``, needs CUDA): a TinyLlama-shaped model (1.1B: 22 layers, hidden 2048, 32 heads,
4 KV groups, FFN 5632, vocab 32000, seq 2048, bf16) on one GPU; reports tokens/s and MFU as well.

    python benchmarks/bench_engine.py [--threads 1] [--reps 4] [--steps 3]
    python benchmarks/bench_engine.py --tinyllama            # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apex.compat.cpu import apply_cpu_patches  # noqa: E402
from megatron_apex.config import load_config  # noqa: E402
from megatron_apex.distributed import LaunchEnv, destroy_distributed, initialize_distributed  # noqa: E402

CPU_SHAPE = {
    "model.num_layers": 4, "model.hidden_size": 256, "model.ffn_hidden_size": 704,
    "model.num_attention_heads": 4, "model.num_query_groups": "none", "model.vocab_size": 2048,
    "model.max_position_embeddings": 256, "data.seq_length": 256, "train.micro_batch_size": 1,
    "train.global_batch_size": 4, "train.precision": "fp32",
}
TINYLLAMA_SHAPE = {
    "model.num_layers": 22, "model.hidden_size": 2048, "model.ffn_hidden_size": 5632,
    "model.num_attention_heads": 32, "model.num_query_groups": 4, "model.vocab_size": 32000,
    "model.max_position_embeddings": 2048, "data.seq_length": 2048, "train.micro_batch_size": 4,
    "train.global_batch_size": 32, "train.precision": "bf16",
}
COMMON = {
    "data.mock": "true", "data.tokenizer_type": "none", "optimizer.lr": 1e-4, "optimizer.min_lr": 1e-4,
    "optimizer.lr_warmup_steps": 0, "optimizer.lr_decay_style": "constant", "optimizer.clip_grad": 1.0,
    "train.log_interval": 10 ** 6, "train.eval_interval": 0, "train.eval_steps": 0,
    "checkpoint.save_interval": 0, "train.exit_on_signal": "false",
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class BareLoop:
    """The shortest correct megatron-core training step: what Megatron-LM's train_step does."""

    def __init__(self, cfg, ctx, vocab_size: int, batches: list):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_apex.model.init import initialize_weights
        from megatron_apex.model.llama import build_model, build_transformer_config
        from megatron_apex.training.optim import build_optimizer, wrap_ddp

        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.tconfig = build_transformer_config(cfg, dtype, use_cpu=not torch.cuda.is_available())
        model = build_model(cfg, self.tconfig, cfg.padded_vocab_size(vocab_size), True, True)
        initialize_weights(model, cfg, ctx.tp_rank, ctx.tp_size)
        model.to(ctx.device)
        if dtype == torch.bfloat16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(self.tconfig, model)
        # The same DDP and optimizer settings as the framework (gradients in fp32, one bucket on CPU).
        self.model = wrap_ddp(cfg, model, self.tconfig)
        self.optimizer = build_optimizer(cfg, [self.model], dtype)
        for group in self.optimizer.param_groups:  # constant LR, set once
            group["lr"] = cfg.optimizer.lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = cfg.optimizer.weight_decay * group.get("wd_mult", 1.0)
        self.tconfig.no_sync_func = self.model.no_sync
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.grad_scale_func = self.optimizer.scale_loss
        self.fb = get_forward_backward_func()
        self.cfg, self.device, self.batches = cfg, ctx.device, batches
        self.num_micro = cfg.num_micro_batches(1)

    def _forward_step(self, it, model):
        # Asynchronous copies from the loader's pinned memory, as Megatron-LM's get_batch does: a
        # blocking copy would make the host wait for the GPU's queue to drain at every micro-batch.
        b = {k: v.to(self.device, non_blocking=True) for k, v in next(it).items() if torch.is_tensor(v)}
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, partial(_loss, b["loss_mask"])

    def step(self, step: int) -> float:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.fb(forward_step_func=self._forward_step, data_iterator=iter(self.batches[step]),
                         model=[self.model], num_microbatches=self.num_micro,
                         seq_length=self.cfg.data.seq_length, micro_batch_size=self.cfg.train.micro_batch_size,
                         forward_only=False)
        self.optimizer.step()
        return torch.stack([x["lm loss"] for x in losses]).mean().item()


def _loss(mask, output):
    mask = mask.view(-1).float()
    loss = (output.float().view(-1) * mask).sum() / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def _batches(trainer, steps: int) -> list:
    """The framework's micro-batches of each step (its global sample order), for the bare loop."""
    from megatron_apex.data.datasets import build_datasets, build_loader

    cfg = trainer.cfg
    g = cfg.train.global_batch_size
    ds, _ = build_datasets(cfg, trainer.vocab_size, trainer.eod_id, steps * g, 0)
    it = iter(build_loader(ds, cfg, 0, steps * g, 0, 1))
    return [[next(it) for _ in range(trainer.num_micro)] for _ in range(steps)]


def run(args) -> None:
    from megatron_apex.model.llama import flops_per_token
    from megatron_apex.training.metrics import gpu_peak_tflops
    from megatron_apex.training.trainer import Trainer

    shape = TINYLLAMA_SHAPE if args.tinyllama else CPU_SHAPE
    overrides = [f"{k}={v}" for k, v in {**COMMON, **shape}.items()]
    warmup, steps_per_block = args.warmup, args.steps
    total_steps = warmup + args.reps * steps_per_block
    overrides.append(f"train.train_steps={total_steps}")
    cfg = load_config(None, overrides, world_size=1)
    apply_cpu_patches()  # a no-op with CUDA
    ctx = initialize_distributed(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single"))
    try:
        trainer = Trainer(cfg, ctx).setup()
        bare = BareLoop(cfg, ctx, trainer.vocab_size, _batches(trainer, total_steps))
        times = {"framework": [], "bare": []}
        losses = {"framework": [], "bare": []}

        def block(name, first, count):
            for s in range(first, first + count):
                _sync()
                t0 = time.perf_counter()
                loss = trainer.train_step(s)["loss"] if name == "framework" else bare.step(s)
                _sync()
                dt = time.perf_counter() - t0
                losses[name].append(loss)
                if s >= warmup:
                    times[name].append(dt)

        block("framework", 0, warmup)
        block("bare", 0, warmup)
        for rep in range(args.reps):
            order = ("framework", "bare") if rep % 2 == 0 else ("bare", "framework")
            for name in order:
                block(name, warmup + rep * steps_per_block, steps_per_block)

        diff = max(abs(a - b) for a, b in zip(losses["framework"], losses["bare"]))
        fw, bb = statistics.median(times["framework"]), statistics.median(times["bare"])
        tokens = cfg.train.global_batch_size * cfg.data.seq_length
        m = cfg.model
        print(f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads}/"
              f"{m.query_groups} kv, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}, seq {cfg.data.seq_length}, "
              f"{cfg.train.precision}; {trainer.num_micro} micro-batches of {cfg.train.micro_batch_size} per step")
        print(f"device: {ctx.device.type}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available()
                                               else f", torch threads {torch.get_num_threads()}"))
        print(f"steps timed: {len(times['framework'])} per loop ({args.reps} interleaved blocks of "
              f"{steps_per_block}, after {warmup} warm-up steps)")
        print(f"max |loss difference| framework vs bare over {total_steps} steps: {diff:.3e}")
        print(f"median step time: framework {fw * 1000:.1f} ms, bare megatron-core {bb * 1000:.1f} ms")
        print(f"ratio framework/bare: {fw / bb:.4f} (overhead {100 * (fw / bb - 1):+.2f}%; target <= +5%)")
        if args.tinyllama or torch.cuda.is_available():
            f = flops_per_token(trainer._shape_cfg())
            peak = gpu_peak_tflops(cfg.train.gpu_peak_tflops)
            for name, t in (("framework", fw), ("bare", bb)):
                line = f"{name}: {tokens / t:,.0f} tokens/s, {tokens * f / t / 1e12:.1f} TFLOP/s"
                if peak:
                    line += f", MFU {100 * tokens * f / t / 1e12 / peak:.1f}%"
                print(line)
        else:
            print(f"throughput: framework {tokens / fw:,.0f} tokens/s, bare {tokens / bb:,.0f} tokens/s")
    finally:
        destroy_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tinyllama", action="store_true", help="TinyLlama-shaped 1.1B model on one GPU (bf16)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU run)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps of each loop")
    p.add_argument("--reps", type=int, default=4, help="interleaved blocks per loop")
    p.add_argument("--steps", type=int, default=3, help="timed steps per block")
    args = p.parse_args()
    if args.tinyllama and not torch.cuda.is_available():
        sys.exit("--tinyllama needs a CUDA GPU")
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
