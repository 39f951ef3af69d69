#!/usr/bin/env python
"""Bandwidth of APEX's scoring statistic: per-unit sums of squares over all tokens of one activation.

The hooks reduce, per micro-batch and layer, SiLU(gate) ``[tokens, f]`` over the tokens (one value per
FFN channel) and the attention output ``[tokens, groups, r*d]`` over tokens and head dims (one value per
query group), in at least fp32 (``expansion.scoring._sq_norms``). On a GPU they read every activation
once and nothing else, so their cost is set by the bandwidth they reach: the third GPU session measured
about 1.15 TB/s at the 953M shapes on an H100 that copies at about 3 TB/s (``benchmarks/RESULTS.md``).

This times ways of computing the same reduction at given shapes, reports the bandwidth each reaches
(bytes of the activation read, over the time) and its largest relative error against a float64
reference, so that the library can use the fastest one that is exact enough:
* ``vector_norm``: what the library runs on a GPU (one reduction, fp32 accumulator, then squared);
* ``split``: the tokens cut into chunks, each chunk reduced by ``vector_norm``, then the chunks summed
  (more thread blocks along the reduced dimension);
* ``square-sum``: ``x.float().square().sum(0)``, what the library runs on a CPU (fp32 copies written
  and read again);
* ``matmul``: ``ones @ (x * x)`` in fp32 (a GEMV after one elementwise pass).

    python benchmarks/bench_statistics.py --tokens 8192 --ffn 5632 --hidden 2048 --groups 16 --dtype bf16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apex.expansion.scoring import _sq_norms  # noqa: E402


def _split(x: torch.Tensor, dims, chunks: int) -> torch.Tensor:
    t = x.shape[0]
    c = next(c for c in range(min(chunks, t), 0, -1) if t % c == 0)  # a chunk count that divides the tokens
    part = torch.linalg.vector_norm(x.view(c, t // c, *x.shape[1:]), dim=tuple(d + 1 for d in dims),
                                    dtype=torch.float32)
    return part.square_().sum(0)


def _square_sum(x: torch.Tensor, dims) -> torch.Tensor:
    return x.float().square().sum(dims)


def _matmul(x: torch.Tensor, dims) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).float()
    out = torch.ones(1, flat.shape[0], device=x.device) @ flat.square()
    out = out.view(x.shape[1:])
    return out.sum(tuple(d - 1 for d in dims if d > 0)) if len(dims) > 1 else out


VARIANTS = {
    "vector_norm": lambda x, dims: torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32).square_(),
    "split": lambda x, dims: _split(x, dims, 64),
    "square-sum": _square_sum,
    "matmul": _matmul,
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, x: torch.Tensor, dims, ref: torch.Tensor, steps: int) -> str:
    fn = VARIANTS[name]
    out = fn(x, dims)
    err = float(((out.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    _sync(x.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x, dims)
    _sync(x.device)
    dt = (time.perf_counter() - t0) / steps
    gbs = x.numel() * x.element_size() / dt / 1e9
    return f"  {name:12s} {dt * 1e6:9.1f} us  {gbs:8.1f} GB/s  max rel. error {err:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (micro-batch x seq)")
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--groups", type=int, default=16, help="query groups (units of attention)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    shapes = {"FFN SiLU(gate)": ((args.tokens, args.ffn), (0,)),
              "attention output": ((args.tokens, args.groups, args.hidden // args.groups), (0, 2))}
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; {args.dtype}; "
          f"{args.steps} timed calls per variant")
    for what, (shape, dims) in shapes.items():
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        ref = x.double().square().sum(dims)
        assert torch.equal(_sq_norms(x, dims).double(), VARIANTS["vector_norm" if x.is_cuda else "square-sum"](
            x, dims).double()), "the library's statistic is not the variant named for this device"
        print(f"{what} {list(shape)} ({x.numel() * x.element_size() / 2**20:.1f} MiB), reduced over dims {dims}:")
        for name in VARIANTS:
            VARIANTS[name](x, dims)  # warm-up
            print(measure(name, x, dims, ref, args.steps))


if __name__ == "__main__":
    main()
