#!/usr/bin/env python3
"""The end-to-end demo behind ``make demo``: every step a user would run, on CPU, offline.

1. build the embedded corpus from Python's standard library      (tools/make_demo_corpus.py)
2. train a sentencepiece tokenizer on it                           (tools/train_tokenizer.py)
3. preprocess train/valid JSONL to Megatron .bin/.idx              (tools/preprocess_data.py)
4. train a tiny LLaMA with APEX through three stages               (megatron-apex train)
5. train the same model plainly (the baseline), same data and steps (megatron-apex train apex.enabled=false)
6. both final models on the same held-out tokens, and their curves   (tools/evaluate.py, tools/compare_runs.py)
7. render the APEX votes/selection heat map of a mid-stage ckpt    (tools/apex_report.py)
8. export the final (fused) checkpoint to Hugging Face and verify  (tools/convert_checkpoint.py)

Each step is a subprocess running the same command a user would type; a step whose tool is not
present is reported as skipped, never faked. Outputs go under --output (default demo_output/).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(step: str, cmd: list, log_dir: str, env=None, log: str = "") -> float:
    """Run one demo step, its output shown and written to ``log_dir/{log or the step's first word}.log``."""
    print(f"\n=== {step}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    log_path = os.path.join(log_dir, (log or step.split()[0].lower()) + ".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        for line in proc.stdout:
            log.write(line)
            if "Warning" not in line and "warnings.warn" not in line:
                sys.stdout.write("  " + line)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"demo step '{step}' failed with exit code {rc}; full log: {log_path}")
    return time.time() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "demo_output"))
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    out = os.path.abspath(args.output)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    py = sys.executable
    corpus, data, ckpt = (os.path.join(out, d) for d in ("corpus", "data", "checkpoints"))
    tok = os.path.join(out, "tokenizer")
    tb = os.path.join(out, "tensorboard")
    hf = os.path.join(out, "hf_model")
    heatmap = os.path.join(out, "apex_heatmap.png")
    times = {}
    t_start = time.time()

    times["corpus"] = run("Corpus from the standard library",
                          [py, "tools/make_demo_corpus.py", "--output-dir", corpus], logs)
    times["tokenizer"] = run("Tokenizer (sentencepiece BPE)",
                             [py, "tools/train_tokenizer.py", "--input", os.path.join(corpus, "train.jsonl"),
                              "--model-prefix", tok, "--vocab-size", str(args.vocab_size), "--force"], logs)
    for split in ("train", "valid"):
        times[f"preprocess {split}"] = run(
            f"Preprocess {split}",
            [py, "tools/preprocess_data.py", "--input", os.path.join(corpus, f"{split}.jsonl"),
             "--output-prefix", os.path.join(data, split), "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", tok + ".model", "--append-eod", "--workers", "1", "--progress", "log"], logs,
            log=f"preprocess_{split}")

    third = args.steps // 3
    overrides = [
        f"data.data_path=[{os.path.join(data, 'train_text_document')}]",
        f"data.valid_data_path=[{os.path.join(data, 'valid_text_document')}]",
        f"data.tokenizer_model={tok}.model", "data.tokenizer_type=sentencepiece",
        f"train.train_steps={args.steps}", f"train.eval_interval={third}", "train.eval_steps=2",
        f"checkpoint.save={ckpt}", f"checkpoint.save_interval={third + third // 2}",
        f"logging.tensorboard_dir={tb}",
        # MHA with 4 heads and one operator block, so that attention units are expanded too at this size.
        "model.num_query_groups=4", "apex.partitions=1",
        "apex.enabled=true", "apex.stages=3", "apex.ratio=0.25", "apex.init_scoring_samples=64",
        "apex.lr_scale=10.0",
    ]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"), "OMP_NUM_THREADS": "2"}
    times["train"] = run("Train tiny LLaMA with APEX",
                         [py, "-m", "megatron_apex.train", "examples/tiny_cpu.yaml", *overrides], logs, env)
    plain_ckpt, plain_tb = os.path.join(out, "checkpoints_plain"), os.path.join(out, "tensorboard_plain")
    times["train plain"] = run("Train the same model plainly (the baseline)",
                               [py, "-m", "megatron_apex.train", "examples/tiny_cpu.yaml", *overrides,
                                "apex.enabled=false", f"checkpoint.save={plain_ckpt}", "checkpoint.save_interval=0",
                                f"logging.tensorboard_dir={plain_tb}"], logs, env, log="train_plain")
    valid = os.path.join(data, "valid_text_document")
    finals = {}
    for name, path in (("apex", ckpt), ("plain", plain_ckpt)):
        result = os.path.join(out, f"eval_{name}.json")
        times[f"evaluate {name}"] = run(f"Evaluate the {name} model on the held-out set",
                                        [py, "tools/evaluate.py", "--model", path, "--data", valid, "--samples", "64",
                                         "--json", result], logs, env, log=f"evaluate_{name}")
        with open(result, encoding="utf-8") as f:
            finals[name] = json.load(f)["datasets"][0]["loss"]
    curves = os.path.join(out, "apex_vs_plain")
    times["compare"] = run("Loss curves, APEX and plain",
                           [py, "tools/compare_runs.py", "--group", "apex/demo", tb, "--group", "plain/demo", plain_tb,
                            "--metric", "valid/loss", "--curve", "valid/loss", "--out", curves], logs, env)

    mid_stage = os.path.join(ckpt, f"iter_{third + third // 2:07d}")
    if os.path.exists(os.path.join(ROOT, "tools", "apex_report.py")) and os.path.isdir(mid_stage):
        times["heat map"] = run("APEX heat map", [py, "tools/apex_report.py", "--checkpoint", mid_stage,
                                                  "--output", heatmap], logs, env)
    else:
        heatmap = None
        print("\n=== APEX heat map: skipped (tools/apex_report.py not available)")

    if os.path.exists(os.path.join(ROOT, "tools", "convert_checkpoint.py")):
        times["export"] = run("Export to Hugging Face",
                              [py, "tools/convert_checkpoint.py", "export", "--checkpoint", ckpt, "--output", hf,
                               "--tokenizer", tok + ".model", "--verify", "--force"], logs, env)
    else:
        hf = None
        print("\n=== Export to Hugging Face: skipped (tools/convert_checkpoint.py not available)")

    print(f"\n=== APEX and plain, {args.steps} steps each, the same 64 held-out samples:\n"
          f"  validation loss   APEX {finals['apex']:.4f}   plain {finals['plain']:.4f}   "
          f"(difference {finals['apex'] - finals['plain']:+.4f})\n"
          f"  curves            {curves}.png\n"
          "  One seed of a model this small is not evidence either way. What APEX buys, measured over\n"
          "  seeds, budgets and ablations: docs/evidence.md (examples/apex_cpt_study).")
    print(f"\n=== Done in {time.time() - t_start:.0f}s")
    for step, secs in times.items():
        print(f"  {step:<20s} {secs:6.1f}s")
    print(f"\n  corpus            {corpus}\n  tokenizer         {tok}.model\n  datasets          {data}"
          f"\n  checkpoints       {ckpt}\n  TensorBoard       tensorboard --logdir {tb}")
    if heatmap:
        print(f"  APEX heat map     {heatmap}")
    if hf:
        print(f"  Hugging Face      {hf}")
    print(f"  logs              {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
