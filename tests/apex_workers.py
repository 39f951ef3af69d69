"""Workers for the APEX engine tests (module-level so torch.multiprocessing's spawn can import them).

Each worker runs in a process that is already a rank (see distributed_utils.run_distributed) and
returns plain Python data: losses per step, the P/N selections of every boundary per *global*
layer, whether a balancing permutation moved units, and whatever a test asks to inspect.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_apex.expansion import votes as apex_votes
from megatron_apex.expansion.boundary import StageBoundary
from megatron_apex.expansion.engine import ApexCallback
from megatron_apex.training.trainer import Callback


class RecordingBoundary(StageBoundary):
    """The stage boundary, recording the permutation of every layer and the finished stage's operator norm."""

    def __init__(self, *args):
        super().__init__(*args)
        self.op_norms = []       # per boundary: the finished stage's operator norm, as logged
        self.cur_perms = {}

    def operator_norm(self, ctx=None):
        norm = super().operator_norm(ctx)
        if ctx is not None:  # the boundary's log line
            self.op_norms.append(norm)
        return norm

    def select(self, entry, li, kind, votes, raw):
        perm = super().select(entry, li, kind, votes, raw)
        self.cur_perms.setdefault(entry.index, {})[kind] = None if perm is None else perm.tolist()
        return perm


class RecordingApex(ApexCallback):
    """ApexCallback that records its selections and permutations at every boundary."""

    Boundary = RecordingBoundary

    def __init__(self, cfg):
        super().__init__(cfg)
        self.record = []         # one dict per boundary: {global layer: {kind: {"P", "N", "p_pos", "n_pos"}}}
        self.perms = []          # one dict per boundary: {global layer: {kind: perm list or None}}
        self.op_norms = self.boundary.op_norms

    def _boundary(self, trainer, step):
        self.boundary.cur_perms = {}
        votes = {kind: v.tolist() for kind, v in self.recorder.votes.items()}  # the votes this boundary selects on
        vote_steps = self.recorder.vote_steps
        super()._boundary(trainer, step)
        rec = {}
        for e in self.layers:
            rec[e.index] = {}
            for kind in ("attn", "ffn"):
                sel = e.selection.get(kind)
                rec[e.index][kind] = None if sel is None else {
                    k: sel[k].reshape(-1).tolist() for k in ("P", "N", "E", "p_pos", "n_pos")}
        spanning = sorted({kind for e in self.layers for kind in ("attn", "ffn")
                           if getattr(getattr(e, f"{kind}_op"), "span", None) is not None})
        in_place = sum(len(e.inplace.groups) for e in self.layers if e.inplace is not None)
        self.record.append({"step": step, "stage": self.boundary.stage, "layers": rec, "votes": votes,
                            "vote_steps": vote_steps, "spanning": spanning, "in_place_groups": in_place})
        self.perms.append(self.boundary.cur_perms)


class StopAt(Callback):
    """Requests a clean stop (save + exit) after step ``step``."""

    def __init__(self, step: int):
        self.step = step
        self.current = -1

    def on_step_start(self, trainer, step):
        self.current = step

    def stop_requested(self, trainer):
        return "test stop" if self.current == self.step else None


def _callbacks(cfg, stop_at: Optional[int] = None):
    from megatron_apex.run import build_callbacks

    cbs = [RecordingApex(cfg) if isinstance(cb, ApexCallback) else cb for cb in build_callbacks(cfg)]
    if stop_at is not None:
        cbs.append(StopAt(stop_at))
    return cbs


def _started_trainer(config_path: str, overrides: list):
    """(cfg, trainer, recording APEX callback) of a set-up trainer whose on_train_start hooks ran."""
    from megatron_apex.config import load_config
    from megatron_apex.distributed import initialize_distributed
    from megatron_apex.training.trainer import Trainer

    cfg = load_config(config_path, overrides)
    cbs = _callbacks(cfg)
    trainer = Trainer(cfg, initialize_distributed(cfg), cbs).setup()
    for cb in trainer.callbacks:
        cb.on_train_start(trainer)
    return cfg, trainer, _apex(cbs)


def _apex(cbs) -> Optional[RecordingApex]:
    return next((cb for cb in cbs if isinstance(cb, ApexCallback)), None)


def op_state_summary(apex: ApexCallback) -> dict:
    """Operator norm and operator-optimizer step counts (evidence of a real restore)."""
    steps = []
    if apex.boundary.op_optimizer is not None:
        for st in apex.boundary.op_optimizer.state.values():
            s = st.get("step")
            steps.append(int(s.item() if torch.is_tensor(s) else s))
    params = [p.detach().clone() for p in apex.boundary.op_params()]
    return {"op_norm": apex.boundary.operator_norm(), "opt_steps": sorted(set(steps)),
            "op_params": [p.tolist() for p in params[:6]]}


def apex_train_worker(config_path: str, overrides: list, stop_at: Optional[int] = None) -> dict:
    """Train with APEX (recording selections); returns losses, selections, perms and op state."""
    from megatron_apex.config import load_config
    from megatron_apex.distributed import initialize_distributed
    from megatron_apex.training.trainer import Trainer

    cfg = load_config(config_path, overrides)
    ctx = initialize_distributed(cfg)
    cbs = _callbacks(cfg, stop_at)
    apex = _apex(cbs)
    trainer = Trainer(cfg, ctx, cbs).setup()
    start = {}
    if apex is not None:
        class _Probe(Callback):  # op state right after the restore (on_train_start of the APEX callback)
            def on_train_start(self, trainer_):
                start.update(op_state_summary(apex))
        trainer.callbacks.append(_Probe())
    stop_state = {}
    if apex is not None and stop_at is not None:
        class _End(Callback):
            def on_step_end(self, trainer_, step, metrics):
                if step == stop_at:
                    stop_state.update(op_state_summary(apex))
        trainer.callbacks.append(_End())
    memory = {}
    if torch.cuda.is_available():
        class _Memory(Callback):  # bytes of live tensors after every step
            def on_step_end(self, trainer_, step, metrics):
                memory[step] = torch.cuda.memory_allocated()
        trainer.callbacks.append(_Memory())
    first_step = trainer.step
    result = trainer.train()
    out = {"losses": result.losses, "step": result.step, "exit": result.exit_reason, "rank": ctx.rank,
           "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank, "first_step": first_step,
           "checkpoint": result.checkpoint, "memory": memory}
    if apex is not None:
        out.update({"record": apex.record, "perms": apex.perms, "op_norms": apex.op_norms, "start_state": start, "stop_state": stop_state,
                    "stage": apex.boundary.stage, "finished": apex.boundary.finished,
                    "graph_replays": apex._runner.replays if apex._runner is not None else 0,
                    "gate_releases": apex._gate.releases if apex._gate is not None else None,
                    "silu_recorded": [e.layer.mlp.config.activation_func is not torch.nn.functional.silu
                                      for e in apex.layers]})
    return out


def merge_records(results: list) -> list:
    """Per boundary: {global layer: selection}, merged over the pipeline stages of all ranks."""
    merged = []
    for res in results:
        for i, rec in enumerate(res["record"]):
            while len(merged) <= i:
                merged.append({"step": rec["step"], "layers": {}})
            assert merged[i]["step"] == rec["step"]
            for li, sel in rec["layers"].items():
                if li in merged[i]["layers"]:
                    assert merged[i]["layers"][li] == sel, f"ranks disagree on layer {li} at boundary {i}"
                merged[i]["layers"][li] = sel
    return merged


# ---------------------------------------------------------------------- single-process engine probes
def _eval_loss(trainer, batches: list) -> float:
    """Forward-only mean loss on a fixed list of micro-batches (no scoring recorded)."""
    apex = _apex(trainer.callbacks)
    rec, apex.recorder.recording = apex.recorder.recording, False
    apex.on_evaluate(trainer, begin=True)  # the engine's contract for forward-only passes
    with torch.no_grad():
        losses = trainer.forward_only(iter(list(batches)))
    apex.on_evaluate(trainer, begin=False)
    apex.recorder.recording = rec
    return trainer._reduce(losses, False)[0]


def _manual_steps(trainer, steps) -> None:
    for step in steps:
        for cb in trainer.callbacks:
            cb.on_step_start(trainer, step)
        metrics = trainer.train_step(step)
        trainer.step = step + 1
        for cb in trainer.callbacks:
            cb.on_step_end(trainer, step, metrics)


def function_preservation_worker(config_path: str, overrides: list) -> dict:
    """Drives ApexCallback through stage 1 and the boundary into stage 2, measuring the loss on one
    fixed batch: with the trained operator, after the fuse (operators removed), and with the fresh
    operators inserted vs. removed."""
    from megatron_apex.data.datasets import build_loader

    cfg, trainer, apex = _started_trainer(config_path, overrides)
    it = iter(build_loader(trainer.valid_ds or trainer.train_ds, cfg, 0, cfg.train.global_batch_size, 0, 1))
    batches = [next(it) for _ in range(trainer.num_micro)]
    b1 = apex.geometry.boundaries[1]
    out = {"plain_step0": _eval_loss(trainer, batches)}
    _manual_steps(trainer, range(b1))
    out["with_op"] = _eval_loss(trainer, batches)
    out["op_norm"] = apex.boundary.operator_norm()

    orig_fuse, orig_build_opt = apex.boundary.fuse, apex.boundary.build_op_optimizer
    biases = lambda: [e.linears["qkv"].bias.detach().clone() for e in apex.layers  # noqa: E731
                      if e.linears["qkv"].bias is not None]
    stage1_biases, fused_biases = [], []

    def fuse_then_measure():
        stage1_biases.extend(biases())
        orig_fuse()
        fused_biases.extend(biases())
        # The fused weights now hold W_eff: the old operators must not act again (the boundary
        # replaces them by fresh ones right after), so evaluate the plain fused model.
        for e in apex.layers:
            e.attn_op = e.ffn_op = e.deltas = e.inplace = None
        out["fused"] = _eval_loss(trainer, batches)

    def measure_insertion():
        # QKV biases (Qwen2): the layers whose bias the fuse changed, and those whose bias the permutation moved
        out["bias_fused"] = sum(not torch.equal(a, b) for a, b in zip(stage1_biases, fused_biases))
        out["bias_moved"] = sum(not torch.equal(a, b) for a, b in zip(fused_biases, biases()))
        out["inserted"] = _eval_loss(trainer, batches)
        saved = [(e.attn_op, e.ffn_op, e.deltas, e.inplace) for e in apex.layers]
        out["n_fresh_ops"] = sum(len(e.operators()) for e in apex.layers)
        for e in apex.layers:
            e.attn_op = e.ffn_op = e.deltas = e.inplace = None
        out["removed"] = _eval_loss(trainer, batches)
        for e, (a, f, d, i) in zip(apex.layers, saved):
            e.attn_op, e.ffn_op, e.deltas, e.inplace = a, f, d, i
        orig_build_opt()

    apex.boundary.fuse, apex.boundary.build_op_optimizer = fuse_then_measure, measure_insertion
    apex.on_step_start(trainer, b1)
    apex.boundary.fuse, apex.boundary.build_op_optimizer = orig_fuse, orig_build_opt
    out["perms"] = apex.perms
    _manual_steps_after_start(trainer, b1)
    out["with_op2"] = _eval_loss(trainer, batches)
    out["op_norm2"] = apex.boundary.operator_norm()
    apex.on_train_end(trainer)
    out["final_fused"] = _eval_loss(trainer, batches)
    out["ops_left"] = sum(len(e.operators()) for e in apex.layers)
    out["state_keys"] = {k: tuple(v.shape) for k, v in trainer.model.state_dict().items()
                         if not k.endswith("_extra_state")}
    return out


def _manual_steps_after_start(trainer, step) -> None:
    """Finish ``step`` whose on_step_start already ran for the APEX callback."""
    metrics = trainer.train_step(step)
    trainer.step = step + 1
    for cb in trainer.callbacks:
        cb.on_step_end(trainer, step, metrics)


def plain_state_worker(config_path: str, overrides: list) -> dict:
    from megatron_apex.config import load_config
    from megatron_apex.distributed import initialize_distributed
    from megatron_apex.training.trainer import Trainer

    cfg = load_config(config_path, overrides)
    ctx = initialize_distributed(cfg)
    trainer = Trainer(cfg, ctx, []).setup()
    result = trainer.train()
    return {"losses": result.losses, "checkpoint": result.checkpoint,
            "state_keys": {k: tuple(v.shape) for k, v in trainer.model.state_dict().items()
                           if not k.endswith("_extra_state")}}


def selected_mode_worker(config_path: str, overrides: list) -> dict:
    """One boundary and two steps in ``selected`` mode: which parameters get gradients and move."""
    cfg, trainer, apex = _started_trainer(config_path, overrides)
    model = trainer.model
    _manual_steps(trainer, range(1))  # the boundary at step 0 permutes (frozen) weights: snapshot after it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _manual_steps(trainer, range(1, 2))
    out = {"params": {}, "ops": [], "deltas": []}
    for n, p in model.named_parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        out["params"][n] = {"requires_grad": p.requires_grad, "numel": p.numel(),
                            "grad_nonzero": bool(g is not None and g.abs().sum() > 0),
                            "changed": not torch.equal(before[n], p.detach())}
    for e in apex.layers:
        for name in ("attn_op", "ffn_op"):
            op = getattr(e, name)
            if op is not None:
                out["ops"] += [{"numel": p.numel(), "grad": p.grad is not None and bool(p.grad.abs().sum() > 0)}
                               for p in op.parameters()]
        if e.deltas is not None:
            out["deltas"] += [{"numel": p.numel(), "grad": p.grad is not None and bool(p.grad.abs().sum() > 0)}
                              for p in e.deltas.parameters()]
    out["fraction"] = apex.trainable_fraction(trainer)
    out["record"] = apex.record
    out["n"] = dict(apex.boundary.n)
    out["parts"] = dict(apex.boundary.parts)
    return out


def functional_path_callbacks(cfg):
    """APEX callbacks forced onto the per-call W_eff path (the reference for the in-place path)."""
    from apex_export_workers import apex_callbacks

    cbs = apex_callbacks(cfg)
    for cb in cbs:
        if hasattr(cb, "inplace"):
            cb.inplace = cb.boundary.inplace = False
    return cbs


def apex_train_worker_fc1_hook(config_path: str, overrides: list) -> dict:
    """apex_train_worker with the FFN statistic taken by the fallback forward hook on linear_fc1
    (SiLU recomputed) instead of from megatron-core's own SiLU."""
    apex_votes._record_silu = lambda mlp, recorder: False
    return apex_train_worker(config_path, overrides)


class PoisonAttention(Callback):
    """NaN attention output in the first layer during ``step`` (as an overflow would): the statistics of
    every later layer, and the loss, become NaN (the first layer's own statistic is taken before)."""

    def __init__(self, step: int):
        self.step, self.handle = step, None

    def on_step_start(self, trainer, step):
        if step == self.step:
            proj = trainer.model.module.decoder.layers[0].self_attention.linear_proj
            self.handle = proj.register_forward_pre_hook(lambda m, args: (args[0] * float("nan"), *args[1:]))

    def on_step_end(self, trainer, step, metrics):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def apex_poisoned_worker(config_path: str, overrides: list, step: int) -> dict:
    """APEX training with NaN activations during one step; returns exit, losses and recorded votes."""
    from megatron_apex.config import load_config
    from megatron_apex.distributed import initialize_distributed
    from megatron_apex.training.trainer import Trainer

    cfg = load_config(config_path, overrides)
    cbs = _callbacks(cfg) + [PoisonAttention(step)]
    result = Trainer(cfg, initialize_distributed(cfg), cbs).setup().train()
    return {"exit": result.exit_reason, "losses": result.losses, "record": _apex(cbs).record}
