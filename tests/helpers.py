"""Shared test helpers: tiny indexed datasets and training workers."""

from __future__ import annotations

import numpy as np

VOCAB = 256
EOD = 0


def make_indexed_dataset(prefix: str, n_docs: int = 200, seed: int = 0, vocab: int = VOCAB) -> str:
    """Write a Megatron indexed dataset of random documents with megatron-core's own builder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    # A learnable signal: documents are noisy arithmetic progressions, so the loss falls quickly.
    for _ in range(n_docs):
        length = int(rng.integers(20, 200))
        start, stride = int(rng.integers(1, vocab)), int(rng.integers(1, 4))
        doc = (start + stride * np.arange(length)) % (vocab - 1) + 1
        noise = rng.random(length) < 0.1
        doc[noise] = rng.integers(1, vocab, noise.sum())
        builder.add_document(torch.from_numpy(np.append(doc, EOD).astype(np.int64)), [length + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def tiny_overrides(data_prefix: str, **extra) -> list:
    """Overrides that turn examples/tiny_cpu.yaml into a few-second run on the tiny dataset."""
    base = {
        "data.data_path": f"[{data_prefix}]", "data.tokenizer_type": "none", "data.eod_id": EOD,
        "model.vocab_size": VOCAB, "model.num_layers": 4, "model.hidden_size": 64,
        "model.ffn_hidden_size": 128, "model.num_attention_heads": 4, "model.num_query_groups": 2,
        "data.seq_length": 64, "train.micro_batch_size": 2, "train.global_batch_size": 8,
        "train.train_steps": 6, "train.log_interval": 1, "train.eval_interval": 0, "train.eval_steps": 0,
        "optimizer.lr_warmup_steps": 2, "checkpoint.save_interval": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_worker(config_path: str, overrides: list, callbacks_factory=None) -> dict:
    """Build and train in this process (already a rank); returns losses and the final step."""
    from megatron_apex.config import load_config
    from megatron_apex.distributed import initialize_distributed
    from megatron_apex.training.trainer import Trainer

    cfg = load_config(config_path, overrides)
    ctx = initialize_distributed(cfg)
    callbacks = callbacks_factory(cfg) if callbacks_factory else []
    result = Trainer(cfg, ctx, callbacks).setup().train()
    return {"losses": result.losses, "valid": result.valid, "step": result.step, "exit": result.exit_reason,
            "rank": ctx.rank}


def wait_or_kill(proc, log_path, timeout: float) -> int:
    """The exit code of a launch started in its own session (``start_new_session=True``); past
    ``timeout`` seconds the whole session is killed and the test fails with the end of the log."""
    import os
    import signal
    import subprocess

    import pytest

    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launch's own session: the test started it
        proc.wait()
        pytest.fail(f"launch did not finish in {timeout} s; log:\n{log_path.read_text()[-6000:]}")
