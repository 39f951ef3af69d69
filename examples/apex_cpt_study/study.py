#!/usr/bin/env python3
"""The APEX continued-pre-training study: what APEX buys over plain training, measured.

  python examples/apex_cpt_study/study.py all              # prepare, base, dev, runs, report (resumable)
  python examples/apex_cpt_study/study.py runs --only apex-b50   # one part; see --help of each command
  python examples/apex_cpt_study/study.py all --smoke      # a few steps of every arm (the test)

1. prepare: two real-text domains from Debian packages (downloaded with apt-get, never generated):
   A = English technical prose (the reStructuredText sources of the Python 3.11 documentation),
   B = source code (the Python 3.11 standard library and its test suite). Every file is a document;
   one in --valid-every (by a hash of its path) is held out. A sentencepiece tokenizer is trained on
   both training sets and the four JSONL files are preprocessed into indexed datasets.
2. base: a small LLaMA pre-trained on A until its validation loss flattens.
3. dev: the settings the report depends on are chosen on a development seed (never reported).
4. runs: plain and APEX continued pre-training on B from the base (checkpoint.finetune_from), each
   at 1/3, 1/2 and 1 of the full budget with its own LR schedule, plus the ablations at the full
   budget, for every reported seed. A seed changes the data order and the operators'
   initialisation, never the base.
5. report: every run evaluated on the same held-out tokens of A (forgetting) and B (gain) with
   tools/evaluate.py (fixed order seed), compared with tools/compare_runs.py.

Settings come from a study file (--study, default cpu.yaml beside this script; gpu.yaml is the
TinyLlama-scale set). Everything large goes under --output (default study_output/); each finished run's
summary (a small JSON) goes to results/ beside the study file, and is what the report reads: commit
those. Interrupted work resumes: finished runs are skipped, a run with a checkpoint continues from it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

DEBIAN_PACKAGES = {"A": ["python3.11-doc"], "B": ["libpython3.11-stdlib", "libpython3.11-testsuite"]}


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list, log_path: str, env: dict | None = None) -> None:
    """Run a step; its output goes to ``log_path``; a failure names the log."""
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    if rc != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-15:])
        raise SystemExit(f"study: `{' '.join(cmd[:4])} ...` failed (exit {rc}); its log {log_path} ends:\n{tail}")


# ---------------------------------------------------------------------- corpora
def _debian_documents(work: str) -> dict:
    """{domain: [(name, text)]} from the Debian packages (downloaded and unpacked under ``work``)."""
    deb_dir = os.path.join(work, "debs")
    os.makedirs(deb_dir, exist_ok=True)
    versions = {}
    for packages in DEBIAN_PACKAGES.values():
        for pkg in packages:
            if not glob.glob(os.path.join(deb_dir, f"{pkg}_*.deb")):
                rc = subprocess.call(["apt-get", "download", pkg], cwd=deb_dir, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # apt's note that root downloads unsandboxed
                if rc != 0:  # package lists not there yet (a fresh machine)
                    subprocess.check_call(["apt-get", "update", "-qq"])
                    subprocess.check_call(["apt-get", "download", pkg], cwd=deb_dir, stdout=subprocess.DEVNULL)
            deb = sorted(glob.glob(os.path.join(deb_dir, f"{pkg}_*.deb")))[-1]
            versions[pkg] = os.path.basename(deb)
            subprocess.check_call(["dpkg-deb", "-x", deb, os.path.join(work, "root")])
    root = os.path.join(work, "root")
    docs = os.path.join(root, "usr/share/doc/python3.11/html/_sources")
    code = os.path.join(root, "usr/lib/python3.11")
    # Dangling links (to files of other packages) are left out.
    out = {"A": [(os.path.relpath(p, docs), p) for p in glob.glob(os.path.join(docs, "**/*.rst.txt"), recursive=True)
                 if os.path.isfile(p)],
           "B": [(os.path.relpath(p, code), p) for p in glob.glob(os.path.join(code, "**/*.py"), recursive=True)
                 if os.path.isfile(p)]}
    return out, versions


def _local_documents() -> dict:
    """The smoke test's corpora, from this checkout (no download): A its Markdown, B its Python."""
    md = [p for p in glob.glob(os.path.join(ROOT, "**/*.md"), recursive=True) if "/.venv/" not in p]
    py = [p for p in glob.glob(os.path.join(ROOT, "megatron_apex/**/*.py"), recursive=True)]
    return {"A": [(os.path.relpath(p, ROOT), p) for p in md], "B": [(os.path.relpath(p, ROOT), p) for p in py]}, {}


def _held_out(name: str, every: int) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % every == 0


def _token_count(prefix: str) -> int:
    from megatron_apex.data.indexed import IndexedDatasetReader

    reader = IndexedDatasetReader(prefix)
    try:
        return int(reader.token_count)
    finally:
        reader.close()


def prepare(study: dict, out: str) -> dict:
    """Corpora, tokenizer and indexed datasets under ``out/data``; returns the manifest."""
    data = os.path.join(out, "data")
    manifest_path = os.path.join(data, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(data, exist_ok=True)
    c = study["corpus"]
    log(f"prepare: corpora from {c['source']}")
    documents, versions = (_debian_documents(os.path.join(out, "debian")) if c["source"] == "debian"
                           else _local_documents())
    manifest = {"source": c["source"], "packages": versions, "datasets": {}}
    for domain, files in documents.items():
        parts = {"train": [], "valid": []}
        for name, path in sorted(files):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                parts["valid" if _held_out(name, c["valid_every"]) else "train"].append({"text": text, "name": name})
        for part, docs in parts.items():
            jsonl = os.path.join(data, f"{domain.lower()}_{part}.jsonl")
            with open(jsonl, "w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps(d) + "\n")
            manifest["datasets"][f"{domain}_{part}"] = {
                "documents": len(docs), "chars": sum(len(d["text"]) for d in docs),
                "sha256": hashlib.sha256(open(jsonl, "rb").read()).hexdigest()}
            log(f"prepare: {domain} {part}: {len(docs)} documents, {manifest['datasets'][f'{domain}_{part}']['chars']} "
                "characters")
    logs = os.path.join(data, "prepare.log")
    tok = os.path.join(data, "tokenizer")
    sh([sys.executable, "tools/train_tokenizer.py", "--input", os.path.join(data, "a_train.jsonl"),
        os.path.join(data, "b_train.jsonl"), "--model-prefix", tok, "--vocab-size", str(c["vocab_size"]),
        "--max-chars", str(c.get("tokenizer_chars", 0)), "--force"], logs)
    for name in ("a_train", "a_valid", "b_train", "b_valid"):
        sh([sys.executable, "tools/preprocess_data.py", "--input", os.path.join(data, f"{name}.jsonl"),
            "--output-prefix", os.path.join(data, name), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", tok + ".model", "--append-eod", "--workers", "2", "--progress", "none"], logs)
        manifest["datasets"][name.replace("a_", "A_").replace("b_", "B_")]["tokens"] = _token_count(
            os.path.join(data, f"{name}_text_document"))
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def dataset(out: str, name: str) -> str:
    return os.path.join(out, "data", f"{name}_text_document")


# ---------------------------------------------------------------------- runs
def train(run_dir: str, config: str, overrides: dict) -> None:
    """One megatron-apex training run, resumable: started again, it continues from its checkpoint."""
    os.makedirs(run_dir, exist_ok=True)
    args = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
    launcher = shlex.split(os.environ.get("STUDY_LAUNCHER", "")) or [sys.executable]  # e.g. "torchrun --nproc-per-node 8"
    sh([*launcher, "-m", "megatron_apex.cli", "train", config, *args], os.path.join(run_dir, "train.log"))


def evaluate(run_dir: str, ckpt: str, out: str, study: dict) -> None:
    e = study["eval"]
    sh([sys.executable, "tools/evaluate.py", "--model", ckpt, "--data", dataset(out, "a_valid"), dataset(out, "b_valid"),
        "--samples", str(e["samples"]), "--seed", str(e["seed"]), "--json", os.path.join(run_dir, "eval.json"),
        "--data-cache-path", os.path.join(out, "cache")], os.path.join(run_dir, "eval.log"))


def summarize(run_dir: str, meta: dict, results: str) -> dict:
    from megatron_apex.analysis.compare import read_run

    run = read_run(run_dir)
    run["final"] = {k.replace("_text_document", ""): v for k, v in run["final"].items()}
    run.update(meta)
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "w", encoding="utf-8") as f:
        json.dump(run, f, indent=1)
    return run


def common_overrides(study: dict, out: str, run_dir: str) -> dict:
    return {"data.tokenizer_model": os.path.join(out, "data", "tokenizer.model"),
            "data.data_cache_path": os.path.join(out, "cache"), "checkpoint.save": os.path.join(run_dir, "ckpt"),
            "checkpoint.keep_last": 1, "logging.tensorboard_dir": os.path.join(run_dir, "tb")}


def base(study: dict, out: str, results: str) -> str:
    """The base model, pre-trained on domain A; returns its checkpoint."""
    run_dir, b = os.path.join(out, "base"), study["base"]
    summary = os.path.join(results, "base.json")
    ckpt = os.path.join(run_dir, "ckpt")
    if os.path.isfile(summary) and os.path.isdir(ckpt):
        return ckpt
    log(f"base: {b['steps']} steps on A")
    t0 = time.time()
    train(run_dir, study["config"], {
        **common_overrides(study, out, run_dir), "data.data_path": [dataset(out, "a_train")],
        "data.valid_data_path": [dataset(out, "a_valid")], "train.train_steps": b["steps"], "train.seed": b["seed"],
        "optimizer.lr": b["lr"], "optimizer.min_lr": b["min_lr"], "optimizer.lr_warmup_steps": b["warmup_steps"],
        "train.eval_interval": b["eval_interval"], "train.eval_steps": b["eval_steps"],
        "checkpoint.save_interval": b["save_interval"], "train.log_interval": b["eval_interval"]})
    evaluate(run_dir, ckpt, out, study)
    run = summarize(run_dir, {"name": "base", "arm": "base", "steps": b["steps"], "wall_s": time.time() - t0},
                    summary)
    log(f"base: final A {run['final']['a_valid']:.4f}, B {run['final']['b_valid']:.4f}")
    return ckpt


def plan(study: dict, dev: bool) -> list:
    """Every CPT run of the study (or of its development grid), in the order they run: seed by seed,
    so that each finished seed is a complete paired comparison."""
    c = study["cpt"]
    runs = []
    seeds = [study["dev_seed"]] if dev else study["seeds"]
    for seed in seeds:
        arms = study["dev_grid"] if dev else (
            [{"arm": arm, "budget": frac} for frac in c["budgets"] for arm in ("plain", "apex")]
            + [{"arm": f"apex+{name}", "budget": 1.0, "apex": extra} for name, extra in study["ablations"].items()])
        for spec in arms:
            budget = spec.get("budget", 1.0)
            lr = f"-lr{spec['lr']:g}" if "lr" in spec else ""
            name = f"{spec['arm']}{lr}-b{round(100 * budget)}-s{seed}"
            runs.append({**spec, "name": ("dev/" if dev else "") + name, "seed": seed, "budget": budget,
                         "steps": max(1, round(c["full_steps"] * budget))})
    return runs


def chosen_lr(study: dict, results: str) -> float:
    """cpt.lr, or with ``cpt.lr: dev`` the learning rate of the development grid's best plain run
    (lowest final loss on B): chosen for the baseline, on a seed that is never reported."""
    lr = study["cpt"]["lr"]
    if lr != "dev":
        return float(lr)
    from megatron_apex.analysis.compare import read_run

    dev = [read_run(p) for p in sorted(glob.glob(os.path.join(results, "runs", "dev", "plain-*.json")))]
    if not dev:
        raise SystemExit("study: cpt.lr is 'dev' but no development run of the plain arm is finished; run `dev` first")
    best = min(dev, key=lambda r: r["final"]["b_valid"])
    choice = {"lr": best["lr"], "by": "lowest final B loss of the plain arm on the development seed",
              "candidates": {r["name"]: r["final"]["b_valid"] for r in dev}}
    with open(os.path.join(results, "dev_choice.json"), "w", encoding="utf-8") as f:
        json.dump(choice, f, indent=1)
    return float(best["lr"])


def cpt_overrides(study: dict, out: str, run_dir: str, spec: dict, base_ckpt: str) -> dict:
    c, steps = study["cpt"], spec["steps"]
    o = {**common_overrides(study, out, run_dir), "checkpoint.finetune_from": base_ckpt,
         "data.data_path": [dataset(out, "b_train")], "data.valid_data_path": [dataset(out, "b_valid")],
         "train.train_steps": steps, "train.seed": spec["seed"], "optimizer.lr": spec["lr"],
         "optimizer.min_lr": spec["lr"] * c["min_lr_ratio"],
         "optimizer.lr_warmup_steps": max(1, round(c["warmup_fraction"] * steps)),
         "train.eval_interval": max(1, steps // c["evals"]), "train.eval_steps": c["eval_steps"],
         "train.log_interval": max(1, steps // c["evals"]), "checkpoint.save_interval": c["save_interval"]}
    if spec["arm"].startswith("apex"):
        o.update({"apex.enabled": True, **{f"apex.{k}": v for k, v in study["apex"].items()},
                  **{f"apex.{k}": v for k, v in spec.get("apex", {}).items()}})
    return o


def run_cpt(study: dict, out: str, results: str, runs: list, base_ckpt: str) -> None:
    todo = [r for r in runs if not os.path.isfile(os.path.join(results, "runs", r["name"] + ".json"))]
    log(f"runs: {len(runs) - len(todo)} of {len(runs)} done, {len(todo)} to go")
    for i, spec in enumerate(todo):
        run_dir = os.path.join(out, "runs", spec["name"])
        log(f"run {i + 1}/{len(todo)}: {spec['name']} ({spec['steps']} steps)")
        t0 = time.time()
        train(run_dir, study["config"], cpt_overrides(study, out, run_dir, spec, base_ckpt))
        evaluate(run_dir, os.path.join(run_dir, "ckpt"), out, study)
        meta = {k: v for k, v in spec.items() if k != "name"}
        run = summarize(run_dir, {"name": spec["name"], **meta, "wall_s": time.time() - t0},
                        os.path.join(results, "runs", spec["name"] + ".json"))
        log(f"  {spec['name']}: B {run['final']['b_valid']:.4f}, A {run['final']['a_valid']:.4f} "
            f"({time.time() - t0:.0f} s)")


# ---------------------------------------------------------------------- report
def report(study: dict, results: str) -> str:
    from megatron_apex.analysis.compare import compare, markdown_report, plot_curves, read_run

    runs = [read_run(p) for p in sorted(glob.glob(os.path.join(results, "runs", "*.json")))]
    if not runs:
        raise SystemExit(f"study: no finished runs in {results}/runs")
    label = {100: "full", 50: "half", 33: "third"}
    groups: dict = {}
    for r in runs:
        pct = round(100 * r["budget"])
        groups.setdefault(f"{r['arm']}/{label.get(pct, f'b{pct}')}", []).append(r)
    order = sorted(groups, key=lambda g: (g.split("/")[0] != "plain", "+" in g, g.split("/")[0],
                                          -1 if g.endswith("full") else 0, g))
    groups = {g: groups[g] for g in order}
    reference = "plain/full" if "plain/full" in groups else None
    text = [f"# APEX continued-pre-training study: results ({study['name']})", "",
            f"Seeds: {sorted({r['seed'] for r in runs})}; runs: {len(runs)}.", ""]
    out = {}
    for metric, what in (("b_valid", "domain B (code), the continued pre-training's gain"),
                         ("a_valid", "domain A (prose), forgetting")):
        result = compare(groups, metric, reference)
        out[metric] = result
        text += [f"## {what}", "", markdown_report(result["groups"], metric, result["paired"],
                                                   result["tokens_to_match"] if metric == "b_valid" else {},
                                                   reference)]
    main_groups = {g: v for g, v in groups.items() if "+" not in g}
    plot_curves(main_groups, "valid/loss", os.path.join(results, "curves_b.png"),
                "validation loss on B during continued pre-training (band: min..max over seeds)")
    path = os.path.join(results, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(text))
    with open(os.path.join(results, "report.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, default=str)
    return path


# ---------------------------------------------------------------------- entry point
def load_study(path: str, smoke: bool) -> dict:
    with open(path, encoding="utf-8") as f:
        study = yaml.safe_load(f)
    if smoke:
        with open(os.path.join(HERE, "smoke.yaml"), encoding="utf-8") as f:
            smoke_cfg = yaml.safe_load(f)
        for key, value in smoke_cfg.items():
            study[key] = {**study[key], **value} if isinstance(value, dict) and key in study else value
    study["config"] = os.path.join(os.path.dirname(os.path.abspath(path)), study["config"])
    return study


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "base", "dev", "runs", "report", "all"])
    ap.add_argument("--study", default=os.path.join(HERE, "cpu.yaml"), help="study settings (default: cpu.yaml)")
    ap.add_argument("--output", default=os.path.join(ROOT, "study_output"), help="data, checkpoints and logs")
    ap.add_argument("--results", help="where run summaries and the report go (default: results/ beside --study)")
    ap.add_argument("--only", help="runs: only the runs whose name contains this")
    ap.add_argument("--smoke", action="store_true", help="a few steps of every arm on this checkout's own text")
    args = ap.parse_args(argv)
    study = load_study(args.study, args.smoke)
    results = args.results or os.path.join(os.path.dirname(os.path.abspath(args.study)), "results")
    out = args.output
    os.makedirs(out, exist_ok=True)
    if args.command in ("prepare", "all") or not os.path.isfile(os.path.join(out, "data", "manifest.json")):
        manifest = prepare(study, out)
        os.makedirs(results, exist_ok=True)
        with open(os.path.join(results, "corpus.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    if args.command == "prepare":
        return 0
    base_ckpt = base(study, out, results)
    if args.command in ("dev", "all") and study.get("dev_grid"):
        run_cpt(study, out, results, plan(study, dev=True), base_ckpt)
    if args.command in ("runs", "all"):
        lr = chosen_lr(study, results)
        log(f"runs: continued pre-training learning rate {lr:g}")
        runs = [{**r, "lr": lr} for r in plan(study, dev=False) if not args.only or args.only in r["name"]]
        run_cpt(study, out, results, runs, base_ckpt)
    if args.command in ("report", "all"):
        log(f"report: {report(study, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
