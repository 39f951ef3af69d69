"""tools/apex_report.py (heat map of votes and selections) and tools/effective_rank.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from apex_workers import apex_train_worker
from distributed_utils import run_distributed
from helpers import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_effective_rank_known_matrices():
    from megatron_apex.analysis.effective_rank import effective_rank

    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)
    u, v = torch.randn(9, 1), torch.randn(1, 5)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    # Two equal singular values and one zero: 2; rectangular and scaled matrices alike.
    assert effective_rank(3.0 * torch.diag(torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(2.0, rel=1e-12)
    # Singular values 2, 1: p = (2/3, 1/3).
    expected = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert effective_rank(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])) == pytest.approx(expected, rel=1e-12)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    with pytest.raises(ValueError):
        effective_rank(torch.ones(2, 2, 2))


@pytest.fixture(scope="module")
def apex_checkpoint(tiny_data, tiny_config, tmp_path_factory):
    """TP=2 APEX run: a checkpoint mid-stage (step 2) and the final one (step 5)."""
    root = tmp_path_factory.mktemp("apex_ckpt")
    over = tiny_overrides(tiny_data, **{
        "apex.enabled": True, "apex.init_scoring_samples": 16, "apex.ratio": 0.25, "apex.partitions": 2,
        "apex.boundaries": "[0, 3]", "apex.lr_scale": 20.0, "train.train_steps": 5,
        "model.num_attention_heads": 8, "model.num_query_groups": 8, "model.ffn_hidden_size": 128,
        "parallel.tensor_model_parallel_size": 2, "checkpoint.save": str(root), "checkpoint.save_interval": 2})
    results = run_distributed(apex_train_worker, 2, tiny_config, over)
    return str(root), results[0]


def _run_tool(*args, preexec_fn=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
                          preexec_fn=preexec_fn)


def test_apex_report_heatmap(apex_checkpoint, tmp_path):
    from megatron_apex.analysis.checkpoint_io import is_png

    root, run = apex_checkpoint
    png, js = tmp_path / "heat.png", tmp_path / "votes.json"
    proc = _run_tool("tools/apex_report.py", "--checkpoint", os.path.join(root, "iter_0000002"),
                     "--output", str(png), "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert is_png(str(png)) and png.stat().st_size > 1000
    data = json.loads(js.read_text())
    assert data["step"] == 2 and data["stage"] == 1 and not data["finished"]
    # Whole-model view from the two TP shards: 4 layers x 8 attention units / 128 FFN channels.
    assert len(data["votes"]["attn"]) == 4 and len(data["votes"]["attn"][0]) == 8
    assert len(data["votes"]["ffn"][0]) == 128
    # Votes of two steps (plus none from scoring: it was used at boundary 0) are nonzero.
    assert any(v != 0 for row in data["votes"]["ffn"] for v in row)
    assert data["statistic"] == "rank" and len(data["raw"]["ffn"][0]) == 128
    assert all(x > 0 for row in data["raw"]["ffn"] for x in row)  # summed norms (the vote tie-break)
    # The selections are those the run made at its first boundary.
    first = run["record"][0]["layers"]
    for li in range(4):
        for kind in ("attn", "ffn"):
            assert data["selection"][str(li)][kind]["P"] == first[li][kind]["P"]
            assert data["selection"][str(li)][kind]["n_pos"] == first[li][kind]["n_pos"]


def test_apex_report_scores_follow_the_statistic(tmp_path):
    """'norm'/'ema' runs do not vote (their saved votes are zero): the report shows the raw score they select
    by, labelled; data without a statistic (checkpoints saved before the option) shows votes."""
    from megatron_apex.analysis.apex_report import render, scores
    from megatron_apex.analysis.checkpoint_io import is_png

    g = torch.Generator().manual_seed(0)
    raw = {"attn": torch.rand(2, 8, generator=g, dtype=torch.float64) + 1,
           "ffn": torch.rand(2, 16, generator=g, dtype=torch.float64) + 1}
    votes = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in raw.items()}
    sel = {"attn": {"p_pos": torch.tensor([[0], [4]]), "n_pos": torch.tensor([[1], [5]])}, "ffn": None}
    data = {"votes": votes, "raw": raw, "selection": {0: sel, 1: sel}, "statistic": "norm", "step": 2, "stage": 1,
            "finished": False, "boundaries": [0, 3]}
    matrix, label = scores(data, "ffn")
    assert matrix is raw["ffn"] and label == "summed norm"
    assert scores({**data, "statistic": "ema"}, "attn")[1] == "EMA of norm"
    old = {k: v for k, v in data.items() if k != "statistic"}
    assert scores(old, "attn")[0] is votes["attn"] and scores(old, "attn")[1] == "votes"
    for d, name in ((data, "norm.png"), (old, "old.png")):
        render(d, str(tmp_path / name))
        assert is_png(str(tmp_path / name))


def test_apex_report_rejects_plain_checkpoint(tmp_path):
    proc = _run_tool("tools/apex_report.py", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "apex_report:" in proc.stderr


def test_effective_rank_tool(apex_checkpoint, tmp_path):
    root, _ = apex_checkpoint
    js = tmp_path / "erank.json"
    proc = _run_tool("tools/effective_rank.py", "--checkpoint", os.path.join(root, "iter_0000002"),
                     "--compare", root, "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(js.read_text())
    first, second = out["checkpoint"], out["compare"]
    assert first["step"] == 2 and second["step"] == 5
    assert len(first["layers"]) == 4
    # Bounds: 1 <= erank <= min(out, in) (hidden 64, head_dim 8 x 8 heads).
    for row in first["layers"] + second["layers"]:
        for name, v in row.items():
            assert 1.0 <= v <= 64.0 + 1e-9, (name, v)
    assert "embedding" in first["global"] and "output_layer" in first["global"]
    assert "layer" in proc.stdout and "gate" in proc.stdout and "(" in proc.stdout  # table with differences
    # The tool reads global tensors: the value matches a direct computation on the TP-1 view.
    from megatron_apex.analysis.effective_rank import checkpoint_effective_ranks

    assert checkpoint_effective_ranks(root)["layers"][0]["down"] == pytest.approx(second["layers"][0]["down"])



def test_tools_refuse_an_incomplete_checkpoint_and_an_unwritable_output(apex_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(apex_checkpoint[0], "iter_0000002"), ckpt)
    (ckpt / "__1_1.distcp").unlink()
    for tool, extra in (("tools/effective_rank.py", []), ("tools/apex_report.py", ["--output", str(tmp_path / "h.png")])):
        proc = _run_tool(tool, "--checkpoint", str(ckpt), *extra)
        assert proc.returncode == 2 and f"{ckpt}/__1_1.distcp: missing" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    nowhere = tmp_path / "nonexistent" / "h.png"
    proc = _run_tool("tools/apex_report.py", "--checkpoint", os.path.join(apex_checkpoint[0], "iter_0000002"),
                     "--output", str(nowhere))
    assert proc.returncode == 2 and f"--output {nowhere}: the directory {nowhere.parent} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr

def test_outputs_are_written_whole_under_the_given_name(apex_checkpoint, tmp_path):
    """The heat map is a PNG at exactly --output, whatever its name ends with; a write that fails (here
    a file size limit) leaves the previous file as it was, not a truncated one."""
    import resource

    from megatron_apex.analysis.checkpoint_io import is_png

    ckpt = os.path.join(apex_checkpoint[0], "iter_0000002")
    plain = tmp_path / "heat"
    proc = _run_tool("tools/apex_report.py", "--checkpoint", ckpt, "--output", str(plain))
    assert proc.returncode == 0 and is_png(str(plain)) and not (tmp_path / "heat.png").exists(), proc.stderr[-3000:]
    previous = plain.read_bytes()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = _run_tool("tools/apex_report.py", "--checkpoint", ckpt, "--output", str(plain), preexec_fn=small_files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert plain.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat"]  # no temporary left behind


def test_effective_rank_of_a_mid_stage_checkpoint_is_that_of_the_fused_model(apex_checkpoint, tmp_path):
    """Mid-stage, the model is the base weights with the stage's operators applied: the ranks are those of
    the matrices the export writes (operators fused), and the output says so."""
    from safetensors.torch import load_file

    from megatron_apex.analysis.effective_rank import effective_rank

    mid = os.path.join(apex_checkpoint[0], "iter_0000002")
    hf = tmp_path / "hf"
    proc = _run_tool("tools/convert_checkpoint.py", "export", "--checkpoint", mid, "--output", str(hf), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    js = tmp_path / "erank.json"
    proc = _run_tool("tools/effective_rank.py", "--checkpoint", mid, "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved during APEX stage 1 of 2: measured with the stage's operators fused into the weights" in proc.stdout
    result = json.loads(js.read_text())["checkpoint"]
    assert result["fused_operators"]
    weights = load_file(str(hf / "model.safetensors"))
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for li, row in enumerate(result["layers"]):
        for matrix, name in names.items():
            exported = effective_rank(weights[f"model.layers.{li}.{name}.weight"])
            assert row[matrix] == pytest.approx(exported, rel=1e-9), (li, matrix)
    assert result["global"]["embedding"] == pytest.approx(effective_rank(weights["model.embed_tokens.weight"]))


def test_train_tokenizer_refuses_to_overwrite_a_model_unless_forced(tmp_path):
    """An existing PREFIX.model (datasets may have been made with it) used to be replaced silently. The
    demo (run twice by `make demo`) retrains its own on purpose: it passes --force."""
    import json
    import subprocess

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"line {i} of some text, words and more words"})
                                               + "\n" for i in range(200)))
    (tmp_path / "tok.model").write_text("old")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", str(tmp_path / "in.jsonl"),
           "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "300", "--soft-vocab-limit"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{tmp_path / 'tok.model'} already exists: pass --force" in proc.stderr
    assert (tmp_path / "tok.model").read_text() == "old"
    proc = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tok.model").read_bytes() != b"old"
    demo = open(os.path.join(ROOT, "tools", "run_demo.py"), encoding="utf-8").read()
    assert '"tools/train_tokenizer.py"' in demo and '"--force"], logs)' in demo
