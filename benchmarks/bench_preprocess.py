#!/usr/bin/env python
"""Benchmark tools/preprocess_data.py against naive and Megatron-LM-style preprocessing.

What it does (everything in a temporary directory that is deleted afterwards):

1. generates a JSONL corpus of ``--size-mb`` MB (default 200) from Python's standard library
   source (shuffled lines) and prose made of stdlib words, plus its first quarter (size S = 1/4);
2. trains a sentencepiece BPE tokenizer (``--vocab-size``, default 32000) on a capped sample, or
   uses ``--tokenizer-model``;
3. runs, each in its own process, with peak RSS sampled over the process and its children:
   * ``naive``: one process, ``json.loads`` + ``encode`` per line + ``IndexedDatasetBuilder.add_item``;
   * ``megatron-style``: what Megatron-LM's tools/preprocess_data.py does -- ``Pool.imap`` with
     chunksize 32, one ``encode`` per document, ``IndexedDatasetBuilder.add_document`` (2 workers);
   * ours with 1 and 2 workers at sizes S and 4S;
   baselines are timed from inside (without their torch/megatron-core import), ours by wall clock
   of the whole CLI process (start-up included);
4. checks that every method wrote byte-identical ``.bin`` files and prints tokens/s and ratios.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Baselines run as `python bench_preprocess.py --_baseline MODE INPUT PREFIX MODEL WORKERS`.
_BASELINE = r"""
import json, sys, time
import numpy as np, sentencepiece, torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, DType
mode, path, prefix, model, workers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
sp = sentencepiece.SentencePieceProcessor(model_file=model)
eod = sp.eos_id()
def encode(line):
    text = json.loads(line)["text"]
    return sp.encode(text) + [eod], len(line)
builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(sp.vocab_size()))
tokens = 0
start = time.time()
with open(path, "rb") as fin:
    if mode == "naive":
        for line in fin:
            ids, _ = encode(line)
            builder.add_item(torch.IntTensor(ids))
            builder.end_document()
            tokens += len(ids)
    else:  # Megatron-LM tools/preprocess_data.py: Pool.imap(chunksize=32), per-document encode
        import multiprocessing
        with multiprocessing.Pool(workers) as pool:
            for ids, _ in pool.imap(encode, fin, 32):
                builder.add_document(ids, [len(ids)])
                tokens += len(ids)
builder.finalize(prefix + ".idx")
print(json.dumps({"tokens": tokens, "seconds": time.time() - start}))
"""


def make_corpus(directory, size_mb, seed=0):
    """Write corpus_4s.jsonl (size_mb) and corpus_s.jsonl (its first quarter). Returns both paths."""
    from megatron_apex.data.demo_corpus import iter_stdlib_documents

    rng = random.Random(seed)
    sources = [d["text"] for d in iter_stdlib_documents(max_bytes=12_000_000)]
    words = sorted({w for s in sources[:400] for w in s.split() if w.isalpha() and len(w) < 14})
    big = os.path.join(directory, "corpus_4s.jsonl")
    small = os.path.join(directory, "corpus_s.jsonl")
    target = int(size_mb * 1e6)
    written = 0
    with open(big, "w", encoding="utf-8") as out_big, open(small, "w", encoding="utf-8") as out_small:
        i = 0
        while written < target:
            if rng.random() < 0.5:
                lines = rng.choice(sources).split("\n")
                start = rng.randrange(len(lines))
                text = "\n".join(lines[start : start + rng.randint(20, 120)])
            else:
                sentences = []
                for _ in range(rng.randint(5, 40)):
                    sentence = " ".join(rng.choices(words, k=rng.randint(6, 25)))
                    sentences.append(sentence[:1].upper() + sentence[1:] + ".")
                text = " ".join(sentences)
            if not text.strip():
                continue
            line = json.dumps({"text": text, "id": i}) + "\n"
            out_big.write(line)
            if written < target // 4:
                out_small.write(line)
            written += len(line)
            i += 1
    return small, big


class PeakRSS:
    """Run a command and sample the summed RSS of it and all its children."""

    @staticmethod
    def run(cmd, env=None):
        import psutil

        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                procs = [root] + root.children(recursive=True)
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed:\n{err[-3000:]}")
        return time.time() - start, peak, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200.0, help="size 4S of the large corpus (S = 1/4)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--train-chars", type=int, default=20_000_000, help="characters used to train the tokenizer")
    parser.add_argument("--tokenizer-model", default=None, help="reuse this sentencepiece model")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--workdir", default=None, help="where to put the temporary corpus (default: $TMPDIR)")
    args = parser.parse_args()

    from megatron_apex.data.train_tokenizer import train_sentencepiece

    tmp = tempfile.mkdtemp(prefix="bench_preprocess_", dir=args.workdir)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        t0 = time.time()
        small, big = make_corpus(tmp, args.size_mb)
        print(f"corpus: S={os.path.getsize(small) / 1e6:.1f} MB, 4S={os.path.getsize(big) / 1e6:.1f} MB "
              f"(generated in {time.time() - t0:.1f}s)", flush=True)
        model = args.tokenizer_model
        if model is None:
            t0 = time.time()
            model = train_sentencepiece([small], os.path.join(tmp, "tok"), args.vocab_size,
                                        max_chars=args.train_chars, hard_vocab_limit=False)
            print(f"tokenizer: sentencepiece BPE vocab {args.vocab_size} trained on {args.train_chars / 1e6:.0f}M "
                  f"chars in {time.time() - t0:.1f}s", flush=True)
        import sentencepiece

        print(f"tokenizer vocab size: {sentencepiece.SentencePieceProcessor(model_file=model).vocab_size()}")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n", flush=True)

        results = []
        runs = []
        if not args.skip_baselines:
            runs += [("naive (1 proc)", "naive", big, 1), ("megatron-style Pool.imap", "megatron", big, 2)]
        runs += [("ours", "ours", small, 1), ("ours", "ours", small, 2), ("ours", "ours", big, 1), ("ours", "ours", big, 2)]
        for label, mode, path, workers in runs:
            prefix = os.path.join(tmp, f"{mode}_{workers}_{os.path.basename(path)}")
            if mode == "ours":
                cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", path,
                       "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                       model, "--append-eod", "--workers", str(workers), "--quiet"]
                seconds, peak, _ = PeakRSS.run(cmd, env)
                with open(f"{prefix}_text_document.json") as handle:
                    tokens = json.load(handle)["tokens"]
                bin_path = f"{prefix}_text_document.bin"
            else:
                cmd = [sys.executable, "-c", _BASELINE, mode, path, prefix, model, str(workers)]
                seconds, peak, out = PeakRSS.run(cmd, env)
                reported = json.loads(out.strip().splitlines()[-1])
                tokens = reported["tokens"]
                # time the work only: importing torch + megatron-core costs several seconds that a
                # fair comparison should not charge to the baseline (ours is timed including start-up)
                seconds = reported["seconds"]
                bin_path = prefix + ".bin"
            size_label = "S" if path == small else "4S"
            results.append(dict(label=label, workers=workers, size=size_label, seconds=seconds, tokens=tokens,
                                peak=peak, bin=bin_path, mb=os.path.getsize(path) / 1e6))
            print(f"{label:<26} workers={workers} size={size_label:<2} {seconds:7.1f}s  {tokens / seconds:12,.0f} tok/s  "
                  f"{os.path.getsize(path) / 1e6 / seconds:6.1f} MB/s  peak RSS {peak / 2**20:7.0f} MiB", flush=True)

        print()
        by_size = {}
        for r in results:
            by_size.setdefault(r["size"], []).append(r)
        for size, group in by_size.items():
            reference = open(group[0]["bin"], "rb").read()
            same = all(open(r["bin"], "rb").read() == reference for r in group[1:])
            print(f"size {size}: all .bin outputs byte-identical: {same}")
        base = next((r for r in results if r["label"].startswith("naive")), None)
        mega = next((r for r in results if r["label"].startswith("megatron")), None)
        for r in results:
            if r["label"] == "ours" and r["size"] == "4S":
                speed = r["tokens"] / r["seconds"]
                parts = []
                if base:
                    parts.append(f"{speed / (base['tokens'] / base['seconds']):.2f}x naive")
                if mega:
                    parts.append(f"{speed / (mega['tokens'] / mega['seconds']):.2f}x megatron-style(2 workers)")
                print(f"ours workers={r['workers']} at 4S: " + ", ".join(parts))
        for workers in (1, 2):
            pair = {r["size"]: r for r in results if r["label"] == "ours" and r["workers"] == workers}
            if "S" in pair and "4S" in pair:
                print(f"ours workers={workers}: peak RSS at S {pair['S']['peak'] / 2**20:.0f} MiB, at 4S "
                      f"{pair['4S']['peak'] / 2**20:.0f} MiB (ratio {pair['4S']['peak'] / pair['S']['peak']:.2f} "
                      f"for 4x the input)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
