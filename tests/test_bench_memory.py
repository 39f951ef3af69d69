"""The CPU tensor-memory count of benchmarks/memory_phases.py (what it counts and what it does not), and
the APEX overhead benchmark that reports it, end to end on a tiny model."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from memory_phases import LiveBytes, PhasePeaks  # noqa: E402

MIB = 1 << 20


def test_live_bytes_counts_new_storages_until_freed():
    before = torch.zeros(MIB // 4)
    with LiveBytes() as lb:
        before.add_(1)  # storages from before the mode, changed in place or viewed, add nothing
        before.view(4, -1).t()[:8].unsqueeze(0)
        assert lb.live == 0 and lb.peak == 0
        a = torch.empty(MIB // 4)  # 1 MiB of fp32
        assert lb.live == MIB
        v = a.view(2, -1)[0]  # a view: no new memory
        a.add_(1)  # in place: none either
        torch.add(a, 1, out=a)
        assert lb.live == MIB
        b = a * 2
        assert lb.live == 2 * MIB and lb.peak == 2 * MIB
        del a
        assert lb.live == 2 * MIB  # the view keeps a's storage alive
        del v
        assert lb.live == MIB
        c = torch.empty(MIB // 8)  # 0.5 MiB
        assert lb.live == MIB + MIB // 2 and lb.peak == 2 * MIB
        lb.reset_peak()
        assert lb.peak == lb.live
        del b, c
    assert lb.live == 0


def test_live_bytes_sees_the_backward_pass():
    lin = torch.nn.Linear(256, 256)  # built outside: its weights are not counted
    x = torch.randn(1024, 256, requires_grad=True)
    with LiveBytes() as lb:
        y = torch.relu(lin(x)).sum()
        forward = lb.live
        assert forward >= 1024 * 256 * 4  # at least the saved linear output
        y.backward()
        # x.grad (1 MiB) and the weight's gradient (256 KiB) stay; the graph's saved tensors are gone.
        del y
        assert lb.live >= x.numel() * 4 + lin.weight.numel() * 4
        assert lb.peak > lb.live
    assert x.grad is not None and lin.weight.grad is not None


def test_phase_peaks_credit_the_innermost_phase():
    peaks = PhasePeaks(cuda=False)
    peaks.start()
    keep = torch.empty(MIB // 4)  # 1 MiB alive throughout

    class Work:
        def temporary(self):  # 4 MiB, freed before returning
            t = torch.empty(MIB)
            return float(t.numel())

        def outer(self):
            self.temporary()
            return torch.empty(MIB // 2)  # 2 MiB, returned

    w = Work()
    peaks.wrap(w, "temporary", "temp")
    peaks.wrap(w, "outer", "outer")
    assert peaks.take() == MIB
    kept = w.outer()
    assert peaks.peaks["temp"] == 5 * MIB  # keep + the temporary
    assert peaks.peaks["outer"] == 3 * MIB  # keep + the returned tensor; the temporary counts for "temp"
    assert peaks.take() == 5 * MIB  # everything since the last take
    assert peaks.take() == 3 * MIB  # what is alive now
    del kept, keep
    peaks.stop()
    assert peaks.peak == 5 * MIB and peaks.peaks["setup"] == 3 * MIB


def test_phase_peaks_on_a_gpu_read_and_reset_the_allocator_counters(monkeypatch):
    """On a GPU the allocator's peak counter is read at every phase change and reset (a stand-in
    allocator here: CI has no GPU)."""

    class Allocator:
        allocated = peak = reserved = 0

        def alloc(self, n):
            self.allocated += n
            self.peak = max(self.peak, self.allocated)
            self.reserved = max(self.reserved, self.allocated)

        def reset(self):
            self.peak = self.allocated

    gpu = Allocator()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: gpu.peak)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: gpu.reserved)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", gpu.reset)
    peaks = PhasePeaks(cuda=True)
    peaks.start()
    gpu.alloc(100)
    peaks.enter("step")
    gpu.alloc(50)
    peaks.enter("chain rule")
    gpu.alloc(30)
    gpu.alloc(-30)
    peaks.exit()
    gpu.alloc(-50)
    assert peaks.take() == 180
    peaks.stop()
    assert peaks.peaks == {"setup": 100, "step": 150, "chain rule": 180}
    assert peaks.peak == 180 and peaks.reserved == 180


@pytest.mark.slow
def test_apex_overhead_benchmark_reports_memory_by_phase():
    """The benchmark end to end on a tiny model (both variants, one round, --memory-phases): every phase
    is reported, APEX's only in the APEX run, and APEX's peak includes the rows it keeps (so it is not
    below plain's)."""
    import re
    import subprocess

    from distributed_utils import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "benchmarks", "bench_apex_overhead.py"), "--hidden", "64", "--layers",
           "2", "--heads", "4", "--ffn", "128", "--seq", "64", "--vocab", "256", "--steps", "4", "--warmup", "1",
           "--rounds", "1", "--memory-phases", "--port", str(free_port())]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    m = re.search(r"peak CPU tensor memory \(--memory-phases\): plain ([\d.]+) MiB, APEX ([\d.]+) MiB -> ratio ([\d.]+)",
                  text)
    assert m, text
    assert float(m.group(3)) >= 1.0
    rows = dict(re.findall(r"^  (\S.*?)\s+plain\s+([\d.]+)\s+APEX", text, re.M))
    for phase in ("setup", "other (between the phases below)", "forward-backward", "optimizer step",
                  "after the last step (final fuse)", "APEX: W_eff rows in", "APEX: chain rule, rows back",
                  "APEX: stage boundary"):
        assert phase in rows, (phase, text)
    assert all(float(rows[p]) == 0 for p in rows if p.startswith("APEX:"))  # plain runs no APEX phase
    assert float(rows["forward-backward"]) > 0
    assert "stage boundary:" in text and "peak in a steady step" in text
