#!/usr/bin/env python
"""Time and peak memory of HF import and export on a random TinyLlama-1.1B-shaped LLaMA (fp32).

The HF checkpoint is written tensor by tensor with the converter's streaming safetensors writer
(random values, never the whole model in memory), in 2 GB shards like the hub's. Import and
export then each run in a fresh child process; peak RSS is the child's whole-process high-water
mark (``ru_maxrss``, cross-checked by psutil polling), reported as a ratio of the checkpoint size.

  python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--scale 1.0] [--keep]

``--scale`` multiplies the number of layers (22 at 1.0) to fit a smaller machine or time budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
             "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import logging; logging.basicConfig(level=logging.WARNING)
t = time.time()
if {phase!r} == "import":
    from megatron_apex.convert.importer import import_hf_checkpoint
    import_hf_checkpoint({src!r}, {dst!r}, progress=False)
else:
    from megatron_apex.convert.exporter import export_hf_checkpoint
    export_hf_checkpoint({src!r}, {dst!r}, shard_size="2GB", progress=False)
print(json.dumps({{"seconds": time.time() - t, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def write_random_hf(out: str, hf: dict) -> int:
    import torch

    from megatron_apex.convert.exporter import hf_tensor_specs
    from megatron_apex.convert.hf_io import SafetensorsShardWriter, write_json
    from megatron_apex.convert.mapping import hf_config_to_model_config

    os.makedirs(out, exist_ok=True)
    m = hf_config_to_model_config(hf)
    specs = hf_tensor_specs(m, m.vocab_size, torch.float32)
    writer = SafetensorsShardWriter(out, specs, 2 * 10 ** 9)
    g = torch.Generator().manual_seed(0)
    total = 0
    for name, shape, dtype in specs:
        t = (torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02)
        writer.add(name, t)
        total += t.numel() * t.element_size()
        del t
    writer.close()
    write_json(os.path.join(out, "config.json"), hf)
    return total


def run_phase(phase: str, src: str, dst: str) -> dict:
    import psutil

    code = CHILD.format(root=ROOT, phase=phase, src=src, dst=dst)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["polled_rss"] = peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of layers (22) by this")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args()
    hf = dict(TINYLLAMA, num_hidden_layers=max(1, round(22 * args.scale)))
    shutil.rmtree(args.workdir, ignore_errors=True)
    src, ckpt, out = (os.path.join(args.workdir, n) for n in ("hf", "ckpt", "hf_out"))
    t = time.time()
    size = write_random_hf(src, hf)
    gib = 2 ** 30
    n_params = size // 4
    print(f"model: {hf['num_hidden_layers']} layers, {n_params / 1e9:.3f} B parameters, fp32 checkpoint "
          f"{size / gib:.2f} GiB (random HF checkpoint written in {time.time() - t:.1f} s)")
    for phase, a, b in (("import", src, ckpt), ("export", ckpt, out)):
        r = run_phase(phase, a, b)
        peak = max(r["maxrss"], r["polled_rss"])
        print(f"{phase}: {r['seconds']:.1f} s, peak RSS {peak / gib:.2f} GiB = {peak / size:.2f} x checkpoint size "
              f"(target <= 1.5x)")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
