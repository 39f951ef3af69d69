"""Every parallel layout trains the same model as one process: TP (with and without sequence parallelism),
CP, PP, DP, TPxPP, distributed optimizer.

Weights come from per-name generators and data from the global sample index, so every layout
starts from the same weights and sees the same samples at every step; only the order of floating
point reductions differs. Tolerance: 1e-5 absolute on losses of ~5.5 in fp32 (measured differences
are below 5e-7). Measured effects of defects within the 6 steps: the norms' gradients left unsummed
over TP under sequence parallelism, 3.8e-5; a one-position causal-mask leak under CP, 2.3e-2; a loss
scaled by 2, 5.7e-3; shard mix-ups and skipped micro-batches move the losses by 1e-3 or more.

Process starts dominate the cost on a small machine, so the two-process layouts share one pair of
processes (megatron-core's parallel state is rebuilt between runs) and the reference trains in
the pytest process itself.
"""

from __future__ import annotations

import pytest

from distributed_utils import run_distributed
from training_workers import train_many, trainer_in_process
from helpers import tiny_overrides

pytestmark = pytest.mark.slow

TOL = 1e-5  # fp32, see the module docstring
MHA = {"model.num_query_groups": "none"}  # the tiny overrides use GQA (4 heads, 2 groups)
TP2 = {"parallel.tensor_model_parallel_size": 2}
TWO_PROCESS_LAYOUTS = {
    "TP2-GQA": TP2,
    "TP2-MHA": {**TP2, **MHA},
    "TP2-SP": {**TP2, "parallel.sequence_parallel": True},  # activations split along the sequence
    "CP2": {"parallel.context_parallel_size": 2},  # every sequence split over two ranks
    "PP2": {"parallel.pipeline_model_parallel_size": 2},
    "DP2": {},
    "DP2-distopt": {"parallel.use_distributed_optimizer": "true"},  # DP=2, optimizer state sharded
}


@pytest.fixture(scope="module")
def reference(tiny_config, tiny_data):
    """TP=1 losses, GQA and MHA, trained in this process (world size 1, one thread)."""
    from megatron_apex.distributed import destroy_distributed

    try:
        gqa = trainer_in_process(tiny_config, tiny_overrides(tiny_data)).train()
        mha = trainer_in_process(tiny_config, tiny_overrides(tiny_data, **MHA)).train()
    finally:
        destroy_distributed()
    assert sorted(gqa.losses) == list(range(6)) and gqa.exit_reason == "finished"
    # The run learns (so the comparison is of a moving curve, not a constant).
    assert gqa.losses[5] < gqa.losses[0] - 0.1
    assert gqa.losses != mha.losses
    return {"gqa": gqa.losses, "mha": mha.losses}


@pytest.fixture(scope="module")
def two_process(tiny_config, tiny_data):
    """{layout: per-rank results} for every two-process layout, from one pair of processes."""
    names = list(TWO_PROCESS_LAYOUTS)
    per_rank = run_distributed(train_many, 2, tiny_config,
                               [tiny_overrides(tiny_data, **TWO_PROCESS_LAYOUTS[n]) for n in names])
    return {name: [rank[i] for rank in per_rank] for i, name in enumerate(names)}


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in a)


def _logged(results: list) -> dict:
    """The losses every rank reports (they are all-reduced, so every rank must agree)."""
    first = results[0]["losses"]
    for r in results[1:]:
        assert r["losses"] == first, f"rank {r['rank']} reports different losses"
    return first


@pytest.mark.parametrize("layout, variant", [
    ("TP2-GQA", "gqa"), ("TP2-MHA", "mha"), ("TP2-SP", "gqa"), ("CP2", "gqa"), ("PP2", "gqa"), ("DP2", "gqa"), ("DP2-distopt", "gqa"),
])
def test_two_process_layout_matches_single_process(two_process, reference, layout, variant):
    assert _max_diff(_logged(two_process[layout]), reference[variant]) <= TOL


def test_four_process_layouts_match_single_process(tiny_config, tiny_data, reference):
    """TPxPP, and TPxCP with sequence parallelism (the sequence split over CP, then over TP), from one
    set of four processes."""
    layouts = {"TP2xPP2": {**TP2, "parallel.pipeline_model_parallel_size": 2},
               "TP2xCP2-SP": {**TP2, "parallel.context_parallel_size": 2, "parallel.sequence_parallel": True}}
    results = run_distributed(train_many, 4, tiny_config, [tiny_overrides(tiny_data, **o) for o in layouts.values()])
    for i, name in enumerate(layouts):
        assert _max_diff(_logged([r[i] for r in results]), reference["gqa"]) <= TOL, name
