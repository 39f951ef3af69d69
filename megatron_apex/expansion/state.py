"""Stage-boundary surgery on base weights and their optimizer state, whatever the optimizer.

At an APEX stage boundary the base weights change in place twice: the finished stage's operator
is fused into them, and units are permuted across tensor-parallel ranks so that every rank holds
an equal share of the new P and N units. The optimizer's copy of those weights (fp32 master
weights under bf16) and Adam's moments must change with them, row for row.

:class:`ParamStates` gives a uniform view of one model parameter's *master weight* and *moments* as
full local tensors (the rank's TP shard, in fp32), for megatron-core's three optimizers:

* FP32Optimizer (fp32 training): the parameter is its own master; moments in ``state[param]``;
* Float16OptimizerWithFloat16Params (bf16): ``param.main_param`` and ``state[main_param]``;
* DistributedOptimizer: each data-parallel rank owns a flat range of the parameter; the full local
  tensor is assembled with one all-reduce over the data-parallel group and split back afterwards.

These collectives run at stage boundaries only (a few times per run), never per step.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from megatron_apex.model.sharding import tp_gather, tp_shard  # noqa: F401  (used by the engine)

MOMENTS = ("exp_avg", "exp_avg_sq")


def _leaf_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


class ParamStates:
    """Gather/scatter a parameter's master weight and Adam moments as full local fp32 tensors."""

    def __init__(self, optimizer, dp_group):
        self.optimizers = _leaf_optimizers(optimizer)
        self.dp_group = dp_group

    def _owner(self, param):
        for opt in self.optimizers:
            if hasattr(opt, "model_param_group_index_map"):
                # model_param_group_index_map / model_param_gbuf_map only hold the parameters that
                # overlap this rank's shard; a parameter owned entirely by other DP ranks must still
                # take the distributed path (its gather/scatter are collectives over the DP group).
                if param in opt.model_param_group_index_map or param in getattr(opt, "model_param_gbuf_map", {}) \
                        or any(param in getattr(b, "param_index_map", {}) for b in getattr(opt, "buffers", [])):
                    return opt, "distributed"
            else:
                for group in opt.optimizer.param_groups:
                    main = getattr(param, "main_param", None)
                    if any(p is param or (main is not None and p is main) for p in group["params"]):
                        return opt, "local"
        return None, None

    def gather(self, param: torch.Tensor) -> dict:
        """{'param': master weight, 'exp_avg': ..., 'exp_avg_sq': ...} as fp32 tensors of param's shape.

        Moments are zeros where the optimizer has none yet (before the first step).
        """
        opt, kind = self._owner(param)
        if kind == "distributed":
            return self._gather_distributed(opt, param)
        out = {"param": param.detach().float().clone()}
        main = getattr(param, "main_param", None) if opt is not None else None
        if main is not None:
            out["param"] = main.detach().float().clone().view_as(param)
        state = opt.optimizer.state.get(main if main is not None else param, {}) if opt is not None else {}
        for k in MOMENTS:
            out[k] = state[k].detach().float().clone().view_as(param) if k in state else torch.zeros_like(out["param"])
        return out

    def scatter(self, param: torch.Tensor, tensors: dict, reset_step: bool = False) -> None:
        """Write back master weight (and moments when given) and refresh the model parameter."""
        opt, kind = self._owner(param)
        with torch.no_grad():
            param.copy_(tensors["param"].to(param.dtype))
            if kind == "distributed":
                self._scatter_distributed(opt, param, tensors, reset_step)
                return
            if opt is None:
                return
            main = getattr(param, "main_param", None)
            if main is not None:
                main.copy_(tensors["param"].view_as(main))
            state = opt.optimizer.state.get(main if main is not None else param, {})
            for k in MOMENTS:
                if k in state and k in tensors:
                    state[k].copy_(tensors[k].view_as(state[k]))
            if reset_step and "step" in state:
                _zero_step(state)

    # -------------------------------------------------------------- distributed optimizer
    def _local_range(self, opt, param):
        try:
            r = opt._get_model_param_range_map(param)["param"]
            return r.start, r.end
        except KeyError:
            return 0, 0

    def _gather_distributed(self, opt, param) -> dict:
        start, end = self._local_range(opt, param)
        owned = {}
        if end > start and param in opt.model_param_group_index_map:
            owned = opt._get_main_param_and_optimizer_states(param)
        out = {}
        # The same keys on every data-parallel rank (collective order must match).
        for k in ("param",) + MOMENTS:
            buf = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            if k in owned:
                buf[start:end] = owned[k].detach().float().view(-1)
            dist.all_reduce(buf, group=self.dp_group)
            out[k] = buf.view_as(param)
        return out

    def _scatter_distributed(self, opt, param, tensors, reset_step) -> None:
        start, end = self._local_range(opt, param)
        if end <= start or param not in opt.model_param_group_index_map:
            return
        group_index, group_order = opt.model_param_group_index_map[param]
        main = opt.optimizer.param_groups[group_index]["params"][group_order]
        main.data.copy_(tensors["param"].reshape(-1)[start:end].to(main.dtype))
        state = opt.optimizer.state.get(main, {})
        for k in MOMENTS:
            if k in state and k in tensors:
                state[k].copy_(tensors[k].reshape(-1)[start:end].to(state[k].dtype))
        if reset_step and "step" in state:
            _zero_step(state)


def _zero_step(state: dict) -> None:
    step = state["step"]
    if torch.is_tensor(step):
        step.zero_()
    else:
        state["step"] = 0


def reduce_votes(votes: torch.Tensor, group) -> torch.Tensor:
    """Sum vote counts over a process group (data-parallel replicas saw different data)."""
    out = votes.clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(out, group=group)
    return out


def reduce_and_clip_grads(grads: list, ctx, clip: float, spanning: list = ()) -> None:
    """The operators' gradients, in place: averaged over the data x context parallel group (one
    all-reduce for all of them, as megatron-core averages the model's gradients; under CP each rank's
    gradient is its chunks' part, scaled by CP in the loss), then scaled so their global norm (over TP
    and PP too) is at most ``clip`` (0: off). Clipping happens on the device, without a host
    synchronisation.

    ``spanning``: the gradients of operators replicated over the tensor-parallel group
    (expansion/spanning.py), where each rank holds the part that came through its rows: summed over
    the group first (one all-reduce), then treated as the others, and counted once in the norm."""
    spanning = list(spanning)
    if spanning and ctx.tp_size > 1:
        flat = torch.cat([g.reshape(-1) for g in spanning])
        dist.all_reduce(flat, group=ctx.tp_group)
        torch._foreach_copy_(spanning, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in spanning]),
                                                                      spanning)])
    counted = grads + spanning if ctx.tp_rank == 0 else grads  # one rank counts the replicated ones
    grads = grads + spanning
    if ctx.dp_size * ctx.cp_size > 1 and grads:  # data-parallel peers hold the same operators
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.dp_group)
        flat /= ctx.dp_size * ctx.cp_size
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
    if clip > 0:
        # A rank without operator blocks (fewer blocks than TP ranks) adds 0 to the reduction.
        sq = (torch.stack(torch._foreach_norm(counted)).double().square().sum() if counted
              else torch.zeros((), dtype=torch.float64, device=ctx.device))
        if ctx.tp_size * ctx.pp_size > 1:
            dist.all_reduce(sq, group=ctx.mp_group)
        if grads:
            torch._foreach_mul_(grads, torch.clamp(clip / (sq.sqrt() + 1e-6), max=1.0).to(grads[0].dtype))
