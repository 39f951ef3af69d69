"""compat.host_memory: on a CPU, a tensor freed and allocated again every step keeps its pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh interpreter (this one may already have the setting): page faults per alloc/fill/free cycle of
# a 48 MiB tensor, with glibc's defaults (above its largest dynamic mmap threshold, 32 MiB: a mapping
# of its own every time) and after keep_freed_memory().
PROBE = """
import resource, sys, torch
from megatron_apex.compat.host_memory import keep_freed_memory
def per_cycle():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(12 << 20).fill_(1.0)  # 48 MiB of float32
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10
per_cycle()
default = per_cycle()
applied = keep_freed_memory()
per_cycle()
print(default, applied, per_cycle())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_tensors_keep_their_pages():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    default, applied, kept = out.stdout.split()
    if applied != "True":
        pytest.skip("malloc is not glibc's")
    assert float(default) > 5000  # 12,288 pages of 4 KiB faulted in again every cycle
    assert float(kept) < 50, kept
