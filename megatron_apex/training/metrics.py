"""Throughput, MFU and where metrics go (console, TensorBoard, optionally Weights & Biases)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Optional

import torch

from megatron_apex.config import ConfigError

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per GPU (no sparsity), by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def gpu_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class MetricsWriter:
    """Console lines on the logging rank, plus TensorBoard / W&B when configured."""

    def __init__(self, enabled: bool, tensorboard_dir: Optional[str], wandb_project: Optional[str],
                 run_config: dict):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                # cli.train_main refuses this before the run starts; an import that fails all the same
                # (a broken install) is still the configuration's to fix, in one line.
                raise ConfigError(f"logging.wandb_project={wandb_project!r}: wandb cannot be imported ({exc}); "
                                  "pip install 'megatron_apex[wandb]'") from exc
            self.wandb = wandb.init(project=wandb_project, config=run_config)

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    """Tokens/s, TFLOP/s per GPU and MFU over the steps since the last report."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int,
                 peak_tflops: Optional[float]):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_tflops
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside (checkpoints, validation) out of the measured interval."""
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - start

    def report(self) -> dict:
        _synchronize()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tokens = self.tokens_per_step * self.steps
        out = {"step_time_s": dt / max(self.steps, 1), "tokens_per_s": tokens / dt}
        tflops = tokens * self.flops_per_token / dt / self.world_size / 1e12
        out["tflops_per_gpu"] = tflops
        if self.peak:
            out["mfu"] = tflops / self.peak
        self.reset()
        return out


def _synchronize() -> None:
    """Wait for queued GPU work, so that wall-clock intervals measure it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
