#!/usr/bin/env python
"""APEX overhead on CPU: the same run with and without APEX, each variant in its own process.

The two processes run side by side in lockstep: a token passed through two pipes lets exactly one of
them run at a time (plain step i, APEX step i, plain step i+1, ...; a process hands the token over
only when it is about to start its next step), so every APEX step is timed next to its plain twin and
a change in machine load hits both alike. Both are pinned to the
same ``--threads`` cores (default one thread on one core); the waiting one sleeps in ``os.read``.

On a virtual machine the hypervisor also takes cores away (steal time; 10-15 % on the machine this
was written on, varying from second to second). Each step's steal time on the pinned core is read from
/proc/stat and subtracted, which gives the step's own time; with one thread that correction is exact
to the 10 ms tick. Both the raw wall time and the time less steal are printed; the target is checked
on the latter's median of per-step ratios (paired steps ran back to back), or on the ratio of the mean
step times when ``apex.score_interval`` > 1 (only some steps score, and a median would leave them out).

Config (defaults): LLaMA with hidden 512, 8 layers, 16 heads (MHA), FFN 1408, seq 512, micro-batch 1,
4 micro-batches per step, fp32, single process, mock data (data.mock=true, vocab 8192). APEX: ratio
0.125, apex.partitions 2 (so attention units are expanded too), boundaries [0, S-2] of S steps,
no initial scoring pass (it is a one-off cost before stage 1, not part of a stage).

Measured, per variant and round (rounds alternate which variant steps first):
* step time of every step (on_step_start -> on_step_end); the *steady state* is the steps of stage 1
  after ``--warmup`` steps and before the timed boundary. With APEX these steps include the operator
  (W_eff rows written in, chain rule on main_grad, the side AdamW) and scoring (hooks + per-step
  ranking);
* the time of the boundary at step S-2 (fuse, DP vote reduction, selection, balancing permutation of
  weights + Adam moments, fresh operators), timed around ApexCallback._boundary, excluded from the
  step time of that step;
* peak memory: ru_maxrss of the child process (resource.getrusage, includes the Python/torch/megatron
  baseline of both variants, so the ratio understates relative model-state growth); the bytes of live
  tensors per step (on a GPU, from the allocator's peak counter) and, with ``--memory-phases``, per
  phase of the step (forward-backward, optimizer, the operator's two halves, the boundary, the final
  fuse; ``memory_phases.py``). On the CPU that count is a dispatch mode, which slows every operator,
  and on a GPU it reads the allocator's counters a few times per step: use such a run for memory;
* APEX breakdown per step: the operator (in-place W_eff rows and the chain rule on main_grad,
  expansion/inplace.py), the scoring hooks' statistics, ranking + TP gather (_rank_step, queued in finalize_model_grads), and the
  operator optimizer step (on_optimizer_step).

With ``--dp N`` each variant is N data-parallel processes (gloo; rank r pinned to the r-th of the
cores, one thread each), rank 0 holding the token; the other ranks follow through the collectives. With
``--set parallel.overlap_grad_reduce=true`` (and a ``parallel.ddp_bucket_size`` small enough for several
buckets) the operator's chain rule runs from megatron-core's gradient-ready signals during the backward
pass (expansion/inplace.py, GradReadyGate); it counts in the operator's part all the same.

Targets: step-time ratio <= 1.03, boundary <= 1 step, peak RSS ratio <= 1.05.
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
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def overrides(args, apex: bool) -> list:
    o = {
        "data.mock": True, "data.tokenizer_type": "none", "model.vocab_size": args.vocab,
        "model.num_layers": args.layers, "model.hidden_size": args.hidden, "model.ffn_hidden_size": args.ffn,
        "model.num_attention_heads": args.heads, "model.num_query_groups": args.heads,
        "model.max_position_embeddings": args.seq, "data.seq_length": args.seq,
        "train.micro_batch_size": args.mbs, "train.global_batch_size": args.micro * args.mbs * args.dp,
        "train.train_steps": args.steps,
        "train.log_interval": 1000, "train.eval_interval": 0, "train.eval_steps": 0, "train.precision": args.precision,
        "optimizer.lr_warmup_steps": 1, "checkpoint.save_interval": 0,
    }
    if apex:
        o.update({"apex.enabled": True, "apex.ratio": args.ratio, "apex.partitions": args.partitions,
                  "apex.boundaries": f"[0, {args.steps - 2}]", "apex.init_scoring_samples": 0})
    return [f"{k}={v}" for k, v in o.items()] + list(args.set)


# ---------------------------------------------------------------------- child: one variant
def steal_seconds(cpus) -> float:
    """Hypervisor steal time so far on ``cpus`` (/proc/stat, 8th value of each ``cpuN`` line), 0 if unknown."""
    try:
        with open("/proc/stat") as f:
            lines = {ln.split()[0]: ln.split() for ln in f if ln.startswith("cpu")}
        return sum(int(lines[f"cpu{c}"][8]) for c in cpus) / os.sysconf("SC_CLK_TCK")
    except (OSError, KeyError, IndexError, ValueError):
        return 0.0


def child(args) -> None:
    import resource

    import torch

    every = sorted(os.sched_getaffinity(0))
    # Both variants on the same cores (data-parallel rank r on the r-th); their steal time is read per step.
    cpus = every[-args.threads:] if args.dp == 1 else [every[(args.rank * args.threads + i) % len(every)]
                                                       for i in range(args.threads)]
    os.sched_setaffinity(0, cpus)

    os.environ.update({"RANK": str(args.rank), "WORLD_SIZE": str(args.dp), "LOCAL_RANK": str(args.rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.port)})
    torch.set_num_threads(args.threads)
    from megatron_apex.compat.cpu import apply_cpu_patches
    from megatron_apex.config import load_config
    from megatron_apex.distributed import destroy_distributed, initialize_distributed
    from megatron_apex.expansion import boundary as apex_boundary
    from megatron_apex.expansion import engine
    from megatron_apex.expansion import votes as apex_votes
    from megatron_apex.run import build_callbacks
    from megatron_apex.training.trainer import Callback, Trainer
    from memory_phases import PhasePeaks

    apex = args.child == "apex" and not args.control
    cuda = torch.cuda.is_available()
    # On a GPU the step's work is asynchronous: every clock read below is preceded by a synchronize.
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = load_config(None, overrides(args, apex))
    apply_cpu_patches()  # a no-op with CUDA
    ctx = initialize_distributed(cfg)
    cbs = build_callbacks(cfg)
    times, steal, boundary, boundary_steal, faults = {}, {}, {}, {}, {}
    parts = {"w_eff": 0.0, "op_opt": 0.0, "hooks": 0.0}
    if apex:
        from megatron_apex.expansion import inplace

        cb = next(c for c in cbs if isinstance(c, engine.ApexCallback))
        orig_b, orig_opt, orig_eff = cb._boundary, cb.on_optimizer_step, apex_boundary.Layer.effective

        busy = [False]  # a timed call inside another (the runner's restore restores batches) counts once

        def timed(fn, key):
            def wrapper(*a, **k):
                if busy[0]:
                    return fn(*a, **k)
                busy[0] = True
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    parts[key] += time.perf_counter() - t0
                    busy[0] = False
            return wrapper

        # The in-place path (mode all): W_eff rows written once per step, chain rule once per step (with
        # overlapped reduction: batch by batch from the gradient-ready signals, restore_batch).
        inplace.InPlaceRunner.materialize = timed(inplace.InPlaceRunner.materialize, "w_eff")
        inplace.InPlaceRunner.restore = timed(inplace.InPlaceRunner.restore, "w_eff")
        inplace.InPlaceRunner.restore_batch = timed(inplace.InPlaceRunner.restore_batch, "w_eff")
        # The per-micro-batch statistics computed in the scoring hooks.
        apex_votes.unit_sq_norms_ffn = timed(apex_votes.unit_sq_norms_ffn, "hooks")  # fallback path (not used here)
        apex_votes.unit_sq_norms_silu = timed(apex_votes.unit_sq_norms_silu, "hooks")
        apex_votes.unit_sq_norms_attn = timed(apex_votes.unit_sq_norms_attn, "hooks")

        def timed_boundary(trainer, step):
            parts["scoring"] = parts.get("scoring", 0.0) + cb.recorder.stats_time  # reset by the boundary
            sync()
            t0, s0 = time.perf_counter(), steal_seconds(cpus)
            orig_b(trainer, step)
            sync()
            boundary[step] = time.perf_counter() - t0
            boundary_steal[step] = steal_seconds(cpus) - s0

        def timed_opt(trainer, step, skipped):
            t0 = time.perf_counter()
            orig_opt(trainer, step, skipped)
            parts["op_opt"] += time.perf_counter() - t0

        def timed_eff(self, kind, w):
            t0 = time.perf_counter()
            out = orig_eff(self, kind, w)
            parts["w_eff"] += time.perf_counter() - t0
            return out

        cb._boundary, cb.on_optimizer_step = timed_boundary, timed_opt
        apex_boundary.Layer.effective = timed_eff
        # Diagnostics only (the figures are then not APEX's overhead): leave one part of APEX out.
        if args.ablate == "scoring":  # no statistics and no ranking; the boundary selects from zero votes
            cb.recorder._recording = lambda: False
        elif args.ablate == "operator":  # W_eff never written in, no chain rule, no operator AdamW
            inplace.InPlaceRunner.materialize = lambda self, layers: None
            inplace.InPlaceRunner.restore = lambda self, layers, with_grads: None

    def take_turn():
        if args.turn_in < 0:  # a data-parallel rank other than 0: the collectives keep it in step
            return
        if not os.read(args.turn_in, 1):
            sys.exit("the other benchmark process exited")

    def give_turn():
        if args.turn_out >= 0:
            os.write(args.turn_out, b"t")

    # A process keeps the token from its step's start until it is about to start its next step, so
    # whatever it does between two steps never overlaps the partner's timed step.
    class Start(Callback):  # first callback: before APEX's on_step_start (boundary)
        def on_step_start(self, trainer, step):
            if step > 0:
                give_turn()
            take_turn()
            sync()
            if mem is not None:
                if step == 0:
                    mem.enter("other (between the phases below)")
                mem.take()  # the step's own peak starts here (a boundary counts in its step)
            if args.profile and step == args.warmup - 1:  # the step before the timed ones (on a GPU the
                # operator's graphs are captured in step 1 and replayed from step 2: use --warmup 3 there)
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
            self.t0, self.s0 = time.perf_counter(), steal_seconds(cpus)
            self.f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    class End(Callback):  # last callback: after APEX's on_step_end (scoring)
        def on_step_end(self, trainer, step, metrics):
            sync()
            times[step] = time.perf_counter() - start.t0
            steal[step] = steal_seconds(cpus) - start.s0
            faults[step] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start.f0
            if mem is not None:
                step_peak[step] = mem.take()
                if cuda:  # what stays allocated between steps (the step's peak is above)
                    step_end[step] = torch.cuda.memory_allocated()
            parts_at[step] = dict(parts, scoring=cb.recorder.stats_time) if apex else {}
            if getattr(start, "prof", None) is not None:
                start.prof.__exit__(None, None, None)
                os.makedirs(args.profile, exist_ok=True)
                with open(os.path.join(args.profile, f"{args.child}_{args.port}.txt"), "w") as f:  # one per round
                    for key in (["cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
                        f.write(f"# step {step}, sorted by {key}\n")
                        f.write(start.prof.key_averages().table(sort_by=key, row_limit=70) + "\n")
                start.prof = None
            gc_at[step] = (gc_clock["total"], gc_clock["full"])  # after the profile dump, not counting it
            if step == args.steps - 1:
                if mem is not None:
                    mem.enter("after the last step (final fuse)")
                give_turn()
                if args.first:
                    take_turn()  # let the partner's last step run alone before tearing down

    parts_at = {}  # per step: the APEX part timers after it (cumulative)
    # Peak tensor memory per step: always on a GPU (the allocator counts); per phase with --memory-phases
    # (on the CPU every operator then goes through Python: the step times are not APEX's overhead).
    mem = PhasePeaks(cuda) if cuda or args.memory_phases else None
    step_peak = {}  # per step: peak tensor memory within it (a boundary counts in its step)
    step_end = {}  # per step, on a GPU: bytes allocated at its end
    import gc

    gc_clock = {"total": 0.0, "t0": 0.0, "full": 0}  # time in Python's cyclic garbage collector

    def on_gc(phase, info):
        if phase == "start":
            gc_clock["t0"] = time.perf_counter()
        else:
            gc_clock["total"] += time.perf_counter() - gc_clock["t0"]
            gc_clock["full"] += info["generation"] == 2

    gc.callbacks.append(on_gc)
    gc_at = {}
    start = Start()
    if mem is not None:
        mem.start()  # before the model is built: on the CPU only what is allocated after this counts
    trainer = Trainer(cfg, ctx, [start] + cbs + [End()]).setup()
    phases = {"fwd_bwd": [], "optimizer": []}  # per step, both variants (APEX work included where it runs)

    def timed_phase(fn, key):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            phases[key].append(time.perf_counter() - t0)
            return out
        return wrapper

    trainer._run_microbatches = timed_phase(trainer._run_microbatches, "fwd_bwd")
    trainer.optimizer.step = timed_phase(trainer.optimizer.step, "optimizer")
    if args.memory_phases:
        mem.wrap(trainer, "_run_microbatches", "forward-backward")
        mem.wrap(trainer.optimizer, "step", "optimizer step")
        if apex:
            mem.wrap(inplace.InPlaceRunner, "materialize", "APEX: W_eff rows in")
            mem.wrap(inplace.InPlaceRunner, "restore", "APEX: chain rule, rows back")
            mem.wrap(cb, "_boundary", "APEX: stage boundary")
    trainer.train()
    if mem is not None:
        mem.stop()  # the final fuse and the save come after the last step
    scoring = parts.get("scoring", 0.0)
    step_times = {s: t - boundary.get(s, 0.0) for s, t in times.items()}
    # The step's own time: wall time less the time the hypervisor ran other guests on our cores.
    step_own = {s: t - steal[s] - boundary.get(s, 0.0) + boundary_steal.get(s, 0.0) for s, t in times.items()}
    out = {"variant": args.child, "phases": phases, "faults": faults, "step_times": step_times, "step_own": step_own, "boundary": boundary, "parts": parts,
           "scoring_last_stage": scoring, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "device": torch.cuda.get_device_name() if cuda else "cpu",
           "max_gpu_bytes": mem.peak if cuda else 0, "max_gpu_reserved": mem.reserved if cuda else 0,
           "step_peak": step_peak, "step_end": step_end, "memory_phases": mem.peaks if mem is not None else {},
           "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0,
           "parts_at": parts_at, "gc_at": gc_at,
           "params": sum(p.numel() for p in trainer.model.parameters())}
    destroy_distributed()
    with open(args.out, "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------- parent
def run_pair(args, order: tuple, port: int) -> dict:
    """Both variants side by side, in lockstep through a token ring of two pipes; ``order[0]`` starts."""
    a_to_b, b_to_a = os.pipe(), os.pipe()
    fds = {order[0]: (b_to_a[0], a_to_b[1]), order[1]: (a_to_b[0], b_to_a[1])}  # (turn_in, turn_out)
    procs, outs, others = {}, {}, []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    for i, variant in enumerate(order):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            outs[variant] = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--port", str(port + i)]
        for k in ("hidden", "layers", "heads", "ffn", "seq", "micro", "mbs", "steps", "warmup", "vocab", "ratio",
                  "partitions", "threads", "precision", "dp"):
            cmd += [f"--{k}", str(getattr(args, k))]
        cmd += [a for kv in args.set for a in ("--set", kv)] + (["--profile", args.profile] if args.profile else [])
        cmd += (["--ablate", args.ablate] if args.ablate else []) + (["--control"] if args.control else [])
        cmd += ["--memory-phases"] if args.memory_phases else []
        for rank in range(1, args.dp):  # the other data-parallel ranks: no token, no figures
            others.append(subprocess.Popen(cmd + ["--rank", str(rank), "--out", os.devnull], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        cmd += ["--out", outs[variant], "--turn-in", str(fds[variant][0]), "--turn-out", str(fds[variant][1])]
        cmd += ["--first"] if i == 0 else []
        procs[variant] = subprocess.Popen(cmd, env=env, pass_fds=fds[variant], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
    os.write(b_to_a[1], b"t")  # order[0] holds the token first
    for fd in (*a_to_b, *b_to_a):
        os.close(fd)  # a child that dies closes its ends, and its partner sees EOF instead of hanging
    results, errors = {}, {}
    for variant, proc in procs.items():
        _, err = proc.communicate()
        if proc.returncode:
            errors[variant] = err
    for proc in others:
        _, err = proc.communicate()
        if proc.returncode and not errors:
            errors["data-parallel rank"] = err
    if errors:  # the run that failed first, not its partner that saw it exit
        variant = next((v for v, e in errors.items() if "the other benchmark process exited" not in e),
                       next(iter(errors)))
        sys.exit(f"{variant} run failed:\n{errors[variant][-4000:]}")
    for variant in procs:
        with open(outs[variant]) as f:
            results[variant] = json.load(f)
        os.unlink(outs[variant])
    return results


def print_memory(runs: dict, steady: list, b: int, what: Optional[str], by_phase: bool) -> None:
    """Peak tensor memory per variant: per step kind and (``by_phase``) where in the step it is reached.
    ``what`` names the whole run's peak for a ratio line; None where it is printed already (GPU)."""
    def med(v, key):
        return statistics.median(r["memory_phases"].get(key, 0) for r in runs[v])

    if what is not None:
        peak = {v: statistics.median(max(r["memory_phases"].values()) for r in runs[v]) for v in runs}
        print(f"peak {what}: plain {peak['plain'] / 2**20:.1f} MiB, APEX {peak['apex'] / 2**20:.1f} MiB -> ratio "
              f"{peak['apex'] / peak['plain']:.4f}")
    if by_phase:
        print("  by phase (the peak reached while it ran, MiB; APEX - plain):")
    phases = list(dict.fromkeys(k for v in runs for r in runs[v] for k in r["memory_phases"])) if by_phase else []
    for key in phases:
        p, a = med("plain", key), med("apex", key)
        print(f"  {key:40s} plain {p / 2**20:9.1f}  APEX {a / 2**20:9.1f}" + (f"  ({(a - p) / 2**20:+.1f})" if p else ""))
    for v in runs:
        steady_peak = statistics.median(r["step_peak"][str(s)] for r in runs[v] for s in steady)
        b_peak = statistics.median(r["step_peak"][str(b)] for r in runs[v])
        print(f"  {v}: peak in a steady step {steady_peak / 2**20:.1f} MiB, in the boundary's step (step {b}) "
              f"{b_peak / 2**20:.1f} MiB")
    for v in runs:  # every step of the first round: where a one-off peak (a capture, a boundary) falls
        r = runs[v][0]
        print(f"  {v}, round 0, per step (MiB): peak " + " ".join(f"{r['step_peak'][k] / 2**20:.0f}" for k in r["step_peak"])
              + ("; allocated at the end " + " ".join(f"{x / 2**20:.0f}" for x in r["step_end"].values())
                 if r.get("step_end") else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--mbs", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ratio", type=float, default=0.125)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for both variants (repeatable), e.g. apex.cuda_graphs=false")
    ap.add_argument("--profile", metavar="DIR", help="write a torch.profiler op table of step warmup-1 per variant")
    ap.add_argument("--memory-phases", action="store_true",
                    help="count tensor memory by phase of the step (on the CPU every operator then runs through "
                         "Python, so the step times are not APEX's overhead; on a GPU the allocator's counters are "
                         "read a few times per step); a GPU's per-step peaks are printed without it too")
    ap.add_argument("--ablate", choices=["scoring", "operator"],
                    help="diagnostic: run APEX without its scoring or without its operator (in-place path)")
    ap.add_argument("--control", action="store_true",
                    help="A/A control: the 'apex' process runs the plain model too (measures the two processes' "
                         "own difference)")
    ap.add_argument("--child", choices=["plain", "apex"])
    ap.add_argument("--out")
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--dp", type=int, default=1, help="data-parallel processes per variant (gloo)")
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--turn-in", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--turn-out", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--first", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (per-step figures are differences with the step before)")
    if args.child:
        child(args)
        return
    b = args.steps - 2
    steady = list(range(args.warmup, b))  # stage 1 (it scores for the next boundary), after warm-up
    runs = {"plain": [], "apex": []}
    for r in range(args.rounds):
        order = ("plain", "apex") if r % 2 == 0 else ("apex", "plain")
        results = run_pair(args, order, args.port + 2 * r)
        for v in order:
            res = results[v]
            runs[v].append(res)
            print(f"round {r} {v:5s}: wall " + " ".join(f"{res['step_times'][str(s)]:.3f}" for s in steady)
                  + " | less steal " + " ".join(f"{res['step_own'][str(s)]:.3f}" for s in steady)
                  + (f" | boundary@{b} {res['boundary'][str(b)]:.3f}s" if v == "apex" and not args.control else "")
                  + f" | maxrss {res['maxrss_kb'] / 1024:.0f} MiB", flush=True)

    def summary(key):
        """(median plain, median APEX, median of the per-step APEX/plain ratios of back-to-back steps)."""
        med = {v: statistics.median(res[key][str(s)] for res in runs[v] for s in steady) for v in runs}
        paired = statistics.median(a[key][str(s)] / p[key][str(s)]
                                   for a, p in zip(runs["apex"], runs["plain"]) for s in steady)
        return med["plain"], med["apex"], paired

    per_round = [statistics.median(a["step_own"][str(s)] for s in steady) / statistics.median(p["step_own"][str(s)] for s in steady)
                 for a, p in zip(runs["apex"], runs["plain"])]
    plain_t, apex_t, paired = summary("step_times")
    plain_c, apex_c, paired_c = summary("step_own")
    bnd = statistics.median(res["boundary"].get(str(b), 0.0) for res in runs["apex"])
    rss_p = statistics.median(res["maxrss_kb"] for res in runs["plain"])
    rss_a = statistics.median(res["maxrss_kb"] for res in runs["apex"])
    # Scoring only in some steps (apex.score_interval > 1): the parts' means, not medians, include it.
    sparse = any(kv.split("=", 1)[0] == "apex.score_interval" and int(kv.split("=", 1)[1]) > 1 for kv in args.set)

    def part(key):  # median (mean with sparse scoring) over the steady steps of one APEX part's time in that step
        if args.control:
            return 0.0
        return (statistics.mean if sparse else statistics.median)(
            res["parts_at"][str(s)][key] - res["parts_at"][str(s - 1)][key] for res in runs["apex"] for s in steady)
    weff, opopt, hooks, score = part("w_eff"), part("op_opt"), part("hooks"), part("scoring")
    device = runs["plain"][0].get("device", "cpu")
    gpu = device != "cpu"
    target = 1.01 if gpu else 1.03
    print(f"\ndevice: {device}; model: {runs['plain'][0]['params'] / 1e6:.1f}M parameters, {args.precision}; "
          f"{args.micro} micro-batches x {args.mbs} x {args.seq} tokens per step and rank; DP {args.dp}; "
          f"{args.threads} threads a rank; "
          f"{args.rounds} rounds x {len(steady)} steady steps" + (f"; APEX without its {args.ablate} (diagnostic)"
                                                                  if args.ablate else "")
          + ("; CONTROL: both processes plain (the 'APEX' figures are a second plain process)" if args.control else ""))
    verdict = paired if gpu else paired_c  # a GPU step's time is not the host's: no steal correction there
    # With apex.score_interval > 1 only some steps score, and a median leaves their cost out: the mean keeps it.
    mean = {v: statistics.mean(res["step_times" if gpu else "step_own"][str(s)] for res in runs[v] for s in steady)
            for v in runs}
    if sparse:
        verdict = mean["apex"] / mean["plain"]
    on_median = "" if sparse else f"; target <= {target}: {'MET' if verdict <= target else 'MISSED'}"
    print(f"median step wall time: plain {plain_t:.4f}s, APEX {apex_t:.4f}s -> ratio {apex_t / plain_t:.4f} "
          f"(paired median {paired:.4f})" + (on_median if gpu else ""))
    if not gpu:
        print(f"median step time less hypervisor steal: plain {plain_c:.3f}s, APEX {apex_c:.3f}s -> ratio "
              f"{apex_c / plain_c:.4f} (paired median {paired_c:.4f})" + on_median)
    print(f"mean step {'wall ' if gpu else ''}time{'' if gpu else ' less steal'}: plain {mean['plain']:.4f}s, APEX "
          f"{mean['apex']:.4f}s -> ratio {mean['apex'] / mean['plain']:.4f}"
          + (f"; target <= {target} (on the mean: apex.score_interval > 1, only some steps score): "
             f"{'MET' if verdict <= target else 'MISSED'}" if sparse else ""))
    if not gpu:
        flt = {v: statistics.median(res["faults"][str(s)] for res in runs[v] for s in steady) for v in runs}
        print(f"  median minor page faults per step: plain {flt['plain']:.0f}, APEX {flt['apex']:.0f}")
    print("  per round (fresh processes), ratio of median steps: " + " ".join(f"{r:.3f}" for r in per_round)
          + (f"; median {statistics.median(per_round):.4f}" if len(per_round) > 2 else ""))
    for v in runs:  # Python's garbage collector, per steady step
        gct = [res["gc_at"][str(s)][0] - res["gc_at"][str(s - 1)][0] for res in runs[v] for s in steady]
        full = sum(res["gc_at"][str(steady[-1])][1] - res["gc_at"][str(steady[0] - 1)][1] for res in runs[v])
        print(f"  {v}: garbage collector {1000 * statistics.mean(gct):.1f} ms per step on average, "
              f"{full} full collections in {len(gct)} steps")
    for key in ("fwd_bwd", "optimizer"):
        med = {v: statistics.median(x for res in runs[v] for x in res["phases"][key][args.warmup:b]) for v in runs}
        print(f"  median {key}: plain {med['plain']:.4f}s, APEX {med['apex']:.4f}s (APEX work inside: "
              f"{'restore + chain rule, hooks' if key == 'fwd_bwd' else 'none'})")
    print(f"stage boundary: {bnd:.3f}s = {bnd / plain_t:.3f} step times; target <= 1: "
          f"{'MET' if bnd <= plain_t else 'MISSED'}")
    print(f"peak RSS (ru_maxrss): plain {rss_p / 1024:.0f} MiB, APEX {rss_a / 1024:.0f} MiB -> ratio "
          f"{rss_a / rss_p:.4f}" + ("" if gpu else f"; target <= 1.05: {'MET' if rss_a <= 1.05 * rss_p else 'MISSED'}"))
    if gpu:
        mem_p = statistics.median(res["max_gpu_bytes"] for res in runs["plain"])
        mem_a = statistics.median(res["max_gpu_bytes"] for res in runs["apex"])
        print(f"peak GPU memory (max_memory_allocated): plain {mem_p / 2**30:.2f} GiB, APEX {mem_a / 2**30:.2f} GiB "
              f"-> ratio {mem_a / mem_p:.4f}; target <= 1.05: {'MET' if mem_a <= 1.05 * mem_p else 'MISSED'}")
        res_p = statistics.median(res["max_gpu_reserved"] for res in runs["plain"])
        res_a = statistics.median(res["max_gpu_reserved"] for res in runs["apex"])
        print(f"peak GPU memory reserved (max_memory_reserved, includes the operator's CUDA graph pool): "
              f"ratio {res_a / res_p:.4f}")
        for v in runs:
            print(f"  {v}: max_memory_reserved " + ", ".join(f"{r['max_gpu_reserved'] / 2**30:.2f}" for r in runs[v])
                  + " GiB; allocator retries " + ", ".join(str(r["alloc_retries"]) for r in runs[v]))
    if runs["plain"][0]["memory_phases"]:
        # On a GPU the whole run's peak is the max_memory_allocated line above.
        print_memory(runs, steady, b, None if gpu else "CPU tensor memory (--memory-phases)", args.memory_phases)
    print(f"APEX {'host ' if gpu else ''}time per step{' (means: apex.score_interval > 1)' if sparse else ''}: operator (W_eff rows in, chain rule out) {1000 * weff:.1f} ms, "
          f"scoring hooks {1000 * hooks:.1f} ms, ranking + gather {1000 * score:.1f} ms, operator AdamW + grad "
          f"all-reduce {1000 * opopt:.1f} ms (= {100 * (weff + hooks + score + opopt) / plain_t:.2f}% of a plain step)"
          + ("; on a GPU these are launch times, the kernels run asynchronously" if gpu else ""))


if __name__ == "__main__":
    main()
