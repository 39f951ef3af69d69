"""Every parallel layout trains the same model as one process: TP, PP, DP, TPxPP, distributed optimizer.

Weights come from per-name generators and data from the global sample index, so every layout
starts from the same weights and sees the same samples at every step; only the order of floating
point reductions differs. Tolerance: 1e-5 absolute on losses of ~5.5 in fp32 (measured differences
are below 3e-7; a wrong gradient reduction, a shard mix-up or a skipped micro-batch moves the
losses by 1e-3 or more within a few steps).
"""

from __future__ import annotations

import pytest

from distributed_utils import run_distributed
from engine_workers import train_many
from helpers import tiny_overrides

pytestmark = pytest.mark.slow

TOL = 1e-5  # fp32, see the module docstring
MHA = {"model.num_query_groups": "none"}  # the tiny overrides use GQA (4 heads, 2 groups)


def _runs(tiny_data, *variants):
    return [tiny_overrides(tiny_data, **v) for v in variants]


@pytest.fixture(scope="module")
def reference(tiny_config, tiny_data):
    """TP=1 losses, GQA and MHA, computed once per module in one process."""
    gqa, mha = run_distributed(train_many, 1, tiny_config, _runs(tiny_data, {}, MHA))[0]
    assert len(gqa["losses"]) == 6 and gqa["exit"] == "finished"
    # The run learns (so the comparison is of a moving curve, not a constant).
    assert gqa["losses"][5] < gqa["losses"][0] - 0.1
    assert gqa["losses"] != mha["losses"]
    return {"gqa": gqa["losses"], "mha": mha["losses"]}


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in a)


def _logged(results: list) -> dict:
    """The losses every rank reports (they are all-reduced, so every rank must agree)."""
    first = results[0]["losses"]
    for r in results[1:]:
        assert r["losses"] == first, f"rank {r['rank']} reports different losses"
    return first


def test_tensor_parallel_gqa_and_mha(tiny_config, tiny_data, reference):
    tp = {"parallel.tensor_model_parallel_size": 2}
    results = run_distributed(train_many, 2, tiny_config, _runs(tiny_data, tp, {**tp, **MHA}))
    gqa = _logged([r[0] for r in results])
    mha = _logged([r[1] for r in results])
    assert _max_diff(gqa, reference["gqa"]) <= TOL
    assert _max_diff(mha, reference["mha"]) <= TOL


@pytest.mark.parametrize("world_size, layout", [
    (2, {"parallel.pipeline_model_parallel_size": 2}),
    (2, {}),  # DP=2
    (2, {"parallel.use_distributed_optimizer": "true"}),  # DP=2, optimizer state sharded
    (4, {"parallel.tensor_model_parallel_size": 2, "parallel.pipeline_model_parallel_size": 2}),
], ids=["PP2", "DP2", "DP2-distopt", "TP2xPP2"])
def test_layout_matches_single_process(tiny_config, tiny_data, reference, world_size, layout):
    results = run_distributed(train_many, world_size, tiny_config, _runs(tiny_data, layout))
    losses = _logged([r[0] for r in results])
    assert _max_diff(losses, reference["gqa"]) <= TOL
