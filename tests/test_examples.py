"""Every example config is a valid plan for the world size its recipe is written for (``--dry-run``); the
examples' documents hold commands that paste into a shell, name files that exist and say what the code does."""

from __future__ import annotations

import glob
import os
import re

import pytest
import yaml

from conftest import ROOT
from megatron_apex.cli import main

MOCK = ["data.mock=true", "model.vocab_size=256", "data.eod_id=0", "data.tokenizer_type=none"]
# The dry run reads the tokenizer and checks the data, which the cluster recipes' paths do not hold
# here: plan them on random tokens (their configs set model.vocab_size, so the output is the same).
PLAN = ["data.mock=true", "data.tokenizer_type=none"]

# config (relative to examples/) -> (intended world size, overrides, lines the recipe's README quotes)
RECIPES = {
    "tiny_cpu.yaml": (2, MOCK, ["layout: world=2 = TP 1 x PP 1 x CP 1 x DP 2"]),
    "tinyllama_1b_apex_10b/config.yaml": (8, PLAN, [
        "layout: world=8 = TP 1 x PP 1 x CP 1 x DP 8",
        "batch: micro 8 x 8 micro-batches x DP 8 = global 512 sequences of 2048 tokens",
        "run: 9537 steps = 10.000B tokens",
        "APEX: mode all, ratio 0.125, stage boundaries [0, 3179, 6358]"]),
    "llama2_7b_apex_cpt/config.yaml": (32, PLAN, [
        "layout: world=32 = TP 2 x PP 2 x CP 1 x DP 8 (sequence parallel)",
        "batch: micro 1 x 32 micro-batches x DP 8 = global 256 sequences of 4096 tokens",
        "run: 19074 steps = 20.001B tokens"]),
    "llama31_8b_apex_cpt/config.yaml": (32, PLAN, [
        "layout: world=32 = TP 2 x PP 1 x CP 1 x DP 16 (sequence parallel)",
        "batch: micro 1 x 8 micro-batches x DP 16 = global 128 sequences of 8192 tokens",
        "run: 9537 steps = 10.000B tokens",
        "attention units k=2 of 8 in 2 partitions"]),
    "qwen25_1p5b_apex_cpt/config.yaml": (8, PLAN, [
        "layout: world=8 = TP 1 x PP 1 x CP 1 x DP 8",
        "parameters: 1543.7M total (1310.3M non-embedding), vocab 151936 padded to 151936",
        "attention units k=1 of 2 in 1 partitions in 7 of 28 layers per stage"]),
}


def _dry_run(capsys, path: str, world_size: int, overrides: list) -> str:
    rc = main(["train", path, *overrides, "--dry-run", "--world-size", str(world_size)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for what in ("layout: world=", "parameters:", "memory estimate per GPU"):
        assert what in out
    return out


def _readme(config: str) -> str:
    """The recipe's README: NAME.md beside NAME.yaml, or README.md in the recipe's folder."""
    stem = os.path.join(ROOT, "examples", os.path.splitext(config)[0])
    candidates = [stem + ".md", os.path.join(os.path.dirname(stem), "README.md")]
    return next(open(p, encoding="utf-8").read() for p in candidates if os.path.isfile(p))


@pytest.mark.parametrize("config", sorted(RECIPES))
def test_recipe_dry_run_matches_readme(config, capsys):
    world, overrides, expected = RECIPES[config]
    out = _dry_run(capsys, os.path.join(ROOT, "examples", config), world, overrides)
    readme = _readme(config)
    for line in expected:
        assert line in out
    # The README pastes this very output: keep them in sync (but for the note that the recipe's imported
    # checkpoint does not exist here: the README plans after the import, the test before it).
    for line in out.strip().splitlines():
        if line.startswith("note: checkpoint.finetune_from=") and "does not exist here" in line:
            continue
        assert line in readme, f"{config}: README lacks the dry-run line {line!r}"


def test_plain_comparison_run_is_the_same_plan(capsys):
    config = os.path.join(ROOT, "examples", "tinyllama_1b_apex_10b", "config.yaml")
    apex = _dry_run(capsys, config, 8, PLAN)
    plain = _dry_run(capsys, config, 8, [*PLAN, "apex.enabled=false"])
    assert "APEX" not in plain
    memory = "memory estimate per GPU"
    assert [ln for ln in plain.strip().splitlines() if not ln.startswith(memory)] == [
        ln for ln in apex.strip().splitlines() if not ln.startswith(("APEX:", memory))]
    # The same memory but for APEX's own (operators and their AdamW, the kept P/N rows), counted on top.
    plain_mem, apex_mem = (next(ln for ln in out.splitlines() if ln.startswith(memory)) for out in (plain, apex))
    apex_gib = float(apex_mem.rsplit("+ APEX ", 1)[1])
    assert apex_gib > 0 and apex_mem.rsplit(" + APEX ", 1)[0].split(" = ", 1)[1] == plain_mem.split(" = ", 1)[1]
    total = lambda line: float(line.split(": ", 1)[1].split(" GiB")[0])  # noqa: E731
    assert total(apex_mem) == pytest.approx(total(plain_mem) + apex_gib, abs=0.011)


def test_every_example_config_dry_runs(capsys):
    """Configs not in RECIPES (other engineers' examples) still plan for their smallest world size."""
    configs = sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.yaml"), recursive=True))
    assert configs
    for path in configs:
        rel = os.path.relpath(path, os.path.join(ROOT, "examples"))
        if rel in RECIPES:
            world, overrides, _ = RECIPES[rel]
        else:
            values = yaml.safe_load(open(path, encoding="utf-8")) or {}
            if "config" in values:  # a study's settings (examples/apex_cpt_study), naming its model config
                assert os.path.isfile(os.path.join(os.path.dirname(path), values["config"])), path
                continue
            p = values.get("parallel", {})
            world = (p.get("tensor_model_parallel_size", 1) * p.get("pipeline_model_parallel_size", 1)
                     * p.get("context_parallel_size", 1))
            overrides = PLAN + ([] if values.get("model", {}).get("vocab_size") else ["model.vocab_size=32000"])
        _dry_run(capsys, path, world, overrides)


def _example_docs() -> dict:
    paths = sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.md"), recursive=True))
    assert paths
    return {os.path.relpath(p, ROOT): open(p, encoding="utf-8").read() for p in paths}


def test_example_commands_paste_into_a_shell():
    """A backslash followed by a blank (a space before an inline comment, say) escapes the blank instead of
    continuing the line: the rest of the command then runs as commands of its own."""
    for doc, text in _example_docs().items():
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            for line in block.splitlines():
                assert not re.search(r"\\[ \t]", line), f"{doc}: a backslash is followed by a blank in {line!r}"


def test_example_docs_name_files_that_exist():
    for doc, text in _example_docs().items():
        for path in re.findall(r"(?<![\w./-])((?:tools|examples|launch_scripts|benchmarks)/[\w./-]*\w)", text):
            assert os.path.exists(os.path.join(ROOT, path)), f"{doc} names {path}, which does not exist"


def test_example_docs_say_mid_stage_checkpoints_export_fused():
    """The exporter fuses the operators of a checkpoint saved in the middle of an APEX stage (as the README says)."""
    for doc, text in _example_docs().items():
        for sentence in re.split(r"(?<=\.)\s+", " ".join(text.split())):
            if "middle of an APEX" in sentence:
                assert "fused" in sentence and "refused" not in sentence, f"{doc}: {sentence}"
