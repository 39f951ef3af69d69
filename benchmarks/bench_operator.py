#!/usr/bin/env python
"""Per-step cost of the APEX operator alone (expansion/inplace.py, mode ``all``): writing the W_eff
rows into the weights of every layer (materialize) and the chain rule on ``main_grad`` with the
original rows put back (restore), as a training step runs them, at given layer shapes.

Variants, each timed over ``--steps`` steps after ``--warmup``:
* ``per-layer``: every layer's operators computed on their own (BATCH_BYTES = 0);
* ``batched``: groups of equal shape in several layers computed together (the default);
* ``batched+graphs`` (GPU only): the batched step captured once as two CUDA graphs and replayed (what
  training runs on a GPU).
``--batch-mib`` tries other batch sizes than the library's. On a CPU the process keeps freed blocks
for reuse as training does (compat.host_memory); ``--fresh-pages`` measures glibc's default instead,
which unmaps them and faults their pages in again every step (page faults per step are printed).

Stand-in linears (weight + fp32 ``main_grad``) replace the model, so no megatron-core is needed; the
operators are real (``FFNExpansion``/``AttentionExpansion``, packed positions as after a boundary,
random non-zero parameters). ``--profile`` prints the kernel (GPU) or op (CPU) table of one eager
batched step.

    python benchmarks/bench_operator.py --hidden 2048 --ffn 5632 --heads 16 --layers 16 --dtype bf16
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apex.compat.host_memory import keep_freed_memory  # noqa: E402
from megatron_apex.expansion import inplace  # noqa: E402
from megatron_apex.expansion.operator import AttentionExpansion, FFNExpansion  # noqa: E402
from megatron_apex.expansion.partition import packed_positions  # noqa: E402


def build(args, device):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    h, f, nh, ng = args.hidden, args.ffn, args.heads, args.groups or args.heads
    d, r, b = h // nh, nh // ng, args.partitions
    gen = torch.Generator().manual_seed(0)
    shapes = {"qkv": (ng * (r + 2) * d, h), "proj": (h, nh * d), "fc1": (2 * f, h), "fc2": (h, f)}
    layers = []
    for _ in range(args.layers):
        linears = {}
        for kind, shape in shapes.items():
            w = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
            w.main_grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
            linears[kind] = types.SimpleNamespace(weight=w)
        k_attn, k_ffn = max(1, round(args.ratio * ng / b)), max(1, round(args.ratio * f / b))
        attn = AttentionExpansion(b, k_attn, d, r, device=device)
        ffn = FFNExpansion(b, k_ffn, device=device)
        attn.set_positions(*packed_positions(b, k_attn, ng, device))
        ffn.set_positions(*packed_positions(b, k_ffn, f, device))
        with torch.no_grad():
            for p in list(attn.parameters()) + list(ffn.parameters()):
                p.add_(torch.randn(p.shape, generator=gen).to(device) * 0.01)
        layers.append(inplace.InPlaceLayer(linears, attn, ffn, d, r))
    return layers


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_variant(layers, runner, steps, warmup, sync) -> tuple:
    """(seconds, minor page faults of this process) per step."""
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0, f0 = time.perf_counter(), _page_faults()
        runner.materialize(layers)
        runner.restore(layers, with_grads=True)
    sync()
    return (time.perf_counter() - t0) / steps, (_page_faults() - f0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--groups", type=int, default=0, help="query groups (0: MHA)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.125)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--batch-mib", type=int, nargs="*", help="batch sizes to try (default: inplace.BATCH_BYTES)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--fresh-pages", action="store_true",
                    help="CPU: leave glibc's malloc as it is (freed blocks unmapped, re-faulted every step)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda and not args.fresh_pages:  # as training on a CPU runs (Trainer.setup)
        keep_freed_memory()
    layers = build(args, device)
    default_bytes = getattr(inplace, "BATCH_BYTES", 0)
    sizes = [m << 20 for m in args.batch_mib] if args.batch_mib else [default_bytes]
    variants = [("per-layer", 0, False)]
    for nbytes in sizes:
        tag = f"batched({nbytes >> 20}MiB)"
        variants += [(tag, nbytes, False)] + ([(tag + "+graphs", nbytes, True)] if cuda else [])
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; {args.layers} layers, hidden {args.hidden}, "
          f"ffn {args.ffn}, heads {args.heads}/{args.groups or args.heads} groups, {args.dtype} weights, ratio "
          f"{args.ratio}, {args.partitions} partitions")
    base = None
    for name, nbytes, graphs in variants:
        inplace.BATCH_BYTES = nbytes
        runner = inplace.InPlaceRunner(use_graphs=graphs)
        t, faults = time_variant(layers, runner, args.steps, args.warmup, sync)
        base = base or t
        batches = len(getattr(runner, "_batches", []))
        runner.restore(layers, with_grads=False)
        runner.release()
        print(f"  {name:26s} {1000 * t:8.2f} ms per step ({batches} batches; {base / t:.2f}x per-layer; "
              f"{faults:.0f} page faults per step)")
    if args.profile:
        inplace.BATCH_BYTES = default_bytes
        runner = inplace.InPlaceRunner(use_graphs=False)
        time_variant(layers, runner, 1, 1, sync)  # warm-up
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            runner.materialize(layers)
            runner.restore(layers, with_grads=True)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
