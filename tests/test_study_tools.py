"""The evidence tools: tools/compare_runs.py on runs with a known answer, tools/evaluate.py against the
trainer's own validation loss (and an exported Hugging Face copy of the same model), and a smoke run of
examples/apex_cpt_study/study.py (a few steps of every arm)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _summary(path, name, seed, tokens, b, a=3.0, curve=None):
    run = {"name": name, "seed": seed, "tokens": tokens, "final": {"b_valid": b, "a_valid": a},
           "curves": {"valid/loss": curve or [[10, b + 1.0], [20, b]]}}
    path.write_text(json.dumps(run))
    return str(path)


def test_compare_runs_known_answer(tmp_path, capsys):
    """Means, Student-t intervals, seed-paired differences and tokens-to-match on made-up runs whose
    answers are worked out by hand; a TensorBoard run directory with eval.json reads the same way."""
    import compare_runs
    from torch.utils.tensorboard import SummaryWriter

    from megatron_apex.analysis.checkpoint_io import is_png
    from megatron_apex.analysis.compare import mean_interval, read_run

    mean, half = mean_interval([2.0, 2.1, 2.2])
    assert mean == pytest.approx(2.1) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert math.isnan(mean_interval([1.0])[1])
    groups = {
        "plain/full": [(1, 3e6, 2.00), (2, 3e6, 2.10), (3, 3e6, 2.20)],
        "apex/third": [(1, 1e6, 2.30), (2, 1e6, 2.35), (3, 1e6, 2.40)],
        "apex/half": [(1, 1.5e6, 2.02), (2, 1.5e6, 2.06), (3, 1.5e6, 2.13)],   # mean 2.07 <= 2.10
        "apex/full": [(1, 3e6, 1.90), (2, 3e6, 2.00), (3, 3e6, 2.10)],
    }
    args = []
    for g, runs in groups.items():
        paths = [_summary(tmp_path / f"{g.replace('/', '-')}-{s}.json", f"{g}-{s}", s, t, b) for s, t, b in runs]
        args += ["--group", g, *paths]
    # A run directory: TensorBoard events and eval.json (as tools/evaluate.py --json writes it).
    tb = tmp_path / "tbrun"
    writer = SummaryWriter(log_dir=str(tb / "tb"))
    for step, loss in ((5, 3.0), (10, 2.5)):
        writer.add_scalar("valid/loss", loss, step)
    writer.close()
    (tb / "eval.json").write_text(json.dumps({"trained": {"seed": 4, "tokens": 3e6}, "datasets": [
        {"prefix": "/x/b_valid", "loss": 2.05}, {"prefix": "/x/a_valid", "loss": 3.0}]}))
    run = read_run(str(tb))
    assert run["seed"] == 4 and run["final"] == {"b_valid": 2.05, "a_valid": 3.0}
    assert run["curves"]["valid/loss"] == [[5, 3.0], [10, 2.5]]
    args[args.index("plain/full") + 1:args.index("plain/full") + 1] = [str(tb)]  # a fourth plain run, seed 4
    out = str(tmp_path / "report")
    assert compare_runs.main([*args, "--metric", "b_valid", "--reference", "plain/full", "--out", out]) == 0
    result = json.loads(open(out + ".json").read())
    rows = {r["group"]: r for r in result["groups"]}
    assert rows["plain/full"]["n"] == 4 and rows["plain/full"]["mean"] == pytest.approx(2.0875)
    assert rows["apex/full"]["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-6)
    # Paired by seed (1-3; seed 4 has no apex partner): apex/full - plain/full = -0.1 on every seed.
    paired = result["paired"]["apex/full"]
    assert paired["n"] == 3 and paired["mean"] == pytest.approx(-0.1) and paired["ci95"] == pytest.approx(0, abs=1e-9)
    # Tokens to match plain/full's mean 2.0875: apex/half (1.5M) is the cheapest whose mean is below; its
    # interval's lower bound is below too, apex/third's never; only apex/full's upper bound is below.
    match = result["tokens_to_match"]["apex"]
    assert match["tokens"] == 1.5e6 and match["optimistic"] == 1.5e6 and match["conservative"] is None
    text = capsys.readouterr().out
    assert "| apex/full | 3 | 3M | 2.0000 | ± 0.2484 | -0.1000 ± 0.0000 (n=3) |" in text, text
    assert "- apex: 1.5M (interval 1.5M .. not reached)" in text, text
    assert is_png(out + ".png")
    # Bad input is one line, exit 2.
    assert compare_runs.main(["--group", "a/x", str(tmp_path / "nope"), "--out", out]) == 2
    assert compare_runs.main([*args, "--metric", "c_valid", "--out", out]) == 2
    assert "no run has a final 'c_valid'" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_matches_trainer_validation_and_hf_export(tiny_data, tiny_config, tmp_path, capsys):
    """tools/evaluate.py at the run's own seed gives the trainer's validation loss on the same data; a
    fixed other seed reads other samples (another loss); the exported Hugging Face model, run by
    transformers, gives the same losses as the checkpoint."""
    import evaluate as evaluate_tool
    from distributed_utils import run_distributed
    from helpers import tiny_overrides, train_worker

    from megatron_apex.convert.exporter import export_hf_checkpoint

    ckpt = str(tmp_path / "ckpt")
    over = tiny_overrides(tiny_data, **{"data.valid_data_path": f"[{tiny_data}]", "train.eval_steps": 2,
                                        "train.seed": 7, "train.train_steps": 3, "checkpoint.save": ckpt})
    (res,) = run_distributed(train_worker, 1, tiny_config, over)
    trainer_loss = res["valid"][3]
    out = str(tmp_path / "eval.json")
    common = ["--model", ckpt, "--data", tiny_data, "--samples", "16", "--micro-batch-size", "2"]
    assert evaluate_tool.main([*common, "--seed", "7", "--json", out]) == 0
    ours = json.loads(open(out).read())
    (d,) = ours["datasets"]
    assert d["samples"] == 16 and d["tokens"] == 16 * 64
    assert d["loss"] == pytest.approx(trainer_loss, abs=2e-5), (d["loss"], trainer_loss)
    assert ours["trained"] == {"step": 3, "seed": 7, "tokens": 3 * 8 * 64}
    assert "perplexity" in capsys.readouterr().out
    assert evaluate_tool.main([*common, "--seed", "0", "--json", out]) == 0
    fixed = json.loads(open(out).read())["datasets"][0]["loss"]
    assert abs(fixed - trainer_loss) > 1e-4  # other samples
    hf = str(tmp_path / "hf")
    export_hf_checkpoint(ckpt, hf, progress=False)
    assert evaluate_tool.main(["--model", hf, "--data", tiny_data, "--samples", "16", "--seq-length", "64",
                               "--seed", "0", "--json", out]) == 0
    theirs = json.loads(open(out).read())
    assert theirs["kind"] == "huggingface" and theirs["datasets"][0]["tokens"] == 16 * 64
    assert theirs["datasets"][0]["loss"] == pytest.approx(fixed, abs=1e-4)
    assert evaluate_tool.main(["--model", str(tmp_path / "missing"), "--data", tiny_data]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_evaluate_follows_document_masks(tiny_data, tiny_config, tmp_path):
    """A checkpoint trained with data.reset_attention_mask is evaluated with the trainer's document masks:
    at the run's seed, its validation loss; attending across documents instead gives another loss."""
    import evaluate as evaluate_tool
    from distributed_utils import run_distributed
    from helpers import tiny_overrides, train_worker

    from megatron_apex.analysis import evaluate as ev

    ckpt = str(tmp_path / "ckpt")
    over = tiny_overrides(tiny_data, **{"data.valid_data_path": f"[{tiny_data}]", "train.eval_steps": 2,
                                        "train.seed": 7, "train.train_steps": 3, "checkpoint.save": ckpt,
                                        "data.reset_attention_mask": True})
    (res,) = run_distributed(train_worker, 1, tiny_config, over)
    out = str(tmp_path / "eval.json")
    args = ["--model", ckpt, "--data", tiny_data, "--samples", "16", "--micro-batch-size", "2", "--seed", "7"]
    assert evaluate_tool.main([*args, "--json", out]) == 0
    masked = json.loads(open(out).read())["datasets"][0]["loss"]
    assert masked == pytest.approx(res["valid"][3], abs=2e-5), (masked, res["valid"][3])
    real = ev.eval_batches
    ev.eval_batches = lambda *a: real(*a[:8])  # the same batches without the masks
    try:
        assert evaluate_tool.main([*args, "--json", out]) == 0
    finally:
        ev.eval_batches = real
    assert abs(json.loads(open(out).read())["datasets"][0]["loss"] - masked) > 1e-3


@pytest.mark.slow
def test_study_smoke(tmp_path):
    """study.py all --smoke: corpora from this checkout, a base model, a few steps of every arm (plain and
    APEX at two budgets, every ablation), each run evaluated and summarised, and the report."""
    out, results = tmp_path / "out", tmp_path / "results"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "apex_cpt_study", "study.py"), "all",
                           "--smoke", "--output", str(out), "--results", str(results)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = sorted(name for name in os.listdir(results / "runs") if name.endswith(".json"))
    # The learning rate was chosen on the development seed (never reported), from the plain arm.
    dev = sorted(os.listdir(results / "runs" / "dev"))
    assert dev == ["plain-lr0.001-b50-s0.json", "plain-lr0.003-b50-s0.json"], dev
    choice = json.loads((results / "dev_choice.json").read_text())
    assert choice["lr"] in (1e-3, 3e-3) and len(choice["candidates"]) == 2
    assert choice["candidates"][f"dev/plain-lr{choice['lr']:g}-b50-s0"] == min(choice["candidates"].values())
    assert runs == sorted(["apex+ema-b100-s1.json", "apex+lr_scale10-b100-s1.json", "apex+partitions1-b100-s1.json",
                           "apex+scoring-b100-s1.json", "apex-b100-s1.json", "apex-b50-s1.json",
                           "plain-b100-s1.json", "plain-b50-s1.json"]), runs
    for name in runs:
        run = json.loads((results / "runs" / name).read_text())
        assert set(run["final"]) == {"a_valid", "b_valid"} and all(math.isfinite(v) for v in run["final"].values())
        assert run["seed"] == 1 and run["curves"]["valid/loss"] and run["lr"] == choice["lr"], name
    full = json.loads((results / "runs" / "apex-b100-s1.json").read_text())
    half = json.loads((results / "runs" / "apex-b50-s1.json").read_text())
    assert full["steps"] == 2 * half["steps"] and full["tokens"] == 2 * half["tokens"]
    apex_log = (out / "runs" / "apex-b100-s1" / "train.log").read_text()
    assert "APEX stage 3/3" in apex_log and "final fuse done" in apex_log
    report = (results / "report.md").read_text()
    assert "| plain/full | 1 |" in report and "Tokens to match plain/full" in report
    assert (results / "curves_b.png").stat().st_size > 0 and json.loads((results / "corpus.json").read_text())
    # Started again, everything is done already: nothing runs.
    again = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "apex_cpt_study", "study.py"), "runs",
                            "--smoke", "--output", str(out), "--results", str(results)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "8 of 8 done, 0 to go" in again.stdout, again.stdout + again.stderr
