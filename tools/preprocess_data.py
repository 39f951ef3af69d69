#!/usr/bin/env python3
"""Tokenize JSONL corpora into Megatron .bin/.idx datasets; also merge and inspect them.

Flags follow Megatron-LM's tools/preprocess_data.py where they overlap. Examples:

  python tools/preprocess_data.py --input data/ --output-prefix out/corpus \\
      --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8
  python tools/preprocess_data.py --merge out/a_text_document out/b_text_document --output-prefix out/ab
  python tools/preprocess_data.py --inspect out/corpus_text_document

Exit codes: 0 ok, 2 bad arguments / inputs / tokenizer / output location, or a damaged input
(nothing was published), 3 too many unusable lines (nothing was published), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM: slurm, timeout, docker stop); an interrupted run removes its
temporary files and leaves existing outputs as they were.
"""

import argparse
import errno
import json
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apex.data.indexed import merge_datasets  # noqa: E402
from megatron_apex.data.preprocess import (  # noqa: E402
    PreprocessError,
    TooManyBadLinesError,
    document_delimiters,
    inspect_dataset,
    preprocess_jsonl,
)
from megatron_apex.data.tokenizers import TokenizerError, load_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--merge", nargs="+", metavar="PREFIX",
                      help="merge these datasets into --output-prefix (datasets whose sidecars record different "
                           "tokenizers are refused: see --allow-mixed-tokenizers)")
    mode.add_argument("--inspect", metavar="PREFIX", help="print counts and the first samples of a dataset")
    group = parser.add_argument_group("input / output")
    group.add_argument("--input", nargs="+", help="JSONL files (plain, .gz, .zst, .bz2, .xz) and/or directories of them")
    group.add_argument("--output-prefix", help="outputs are {prefix}_{key}_document.{bin,idx,json} (merge: {prefix}.{bin,idx})")
    group.add_argument("--allow-mixed-tokenizers", action="store_true",
                       help="--merge: merge datasets made with different tokenizers anyway (the merged sidecar then "
                            "records no tokenizer, and training checks only that its ids fit the vocabulary)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group.add_argument("--prepend-bos", action="store_true",
                       help="start each document with the tokenizer's beginning-of-document token (Llama-3 style)")
    group.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (per key)")
    group.add_argument("--max-bad-fraction", type=float, default=0.01,
                       help="fail if more than this share of records is unusable (default 0.01)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="auto",
                       help="SentencePieceTokenizer | HuggingFaceTokenizer (or sentencepiece | huggingface | auto)")
    group.add_argument("--tokenizer-model", help="sentencepiece .model, tokenizer.json, or a directory with one")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    group.add_argument("--log-interval", type=int, default=100000, help="log a progress line every N documents (and at least every 30 s)")
    group.add_argument("--block-size-mb", type=float, default=4.0, help="MB of input lines per work item")
    group.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto")
    group.add_argument("--num-samples", type=int, default=3, help="--inspect: samples to decode")
    group.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return parser


def _fail(message: str, code: int) -> int:
    logging.getLogger("preprocess_data").error("%s", message)
    return code


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (temporaries removed, nothing published)."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.inspect:
            tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model) if args.tokenizer_model else None
            info = inspect_dataset(args.inspect, tokenizer, num_samples=args.num_samples)
            print(f"dataset    {info['prefix']}")
            print(f"dtype      {info['dtype']}")
            print(f"documents  {info['documents']}")
            print(f"sequences  {info['sequences']}")
            print(f"tokens     {info['tokens']}")
            print(f"length     min {info['min_length']} / mean {info['mean_length']:.1f} / max {info['max_length']}")
            if info["sidecar"]:
                side = info["sidecar"]
                tok = side.get("tokenizer")
                print(f"tokenizer  {tok.get('kind')} {tok.get('path')} (vocab {tok.get('vocab_size')}, "
                      f"sha256 {str(tok.get('sha256'))[:12]})" if isinstance(tok, dict) else "tokenizer  not recorded")
                print(f"skipped    {json.dumps(side.get('skipped', {}), sort_keys=True)}")
                print(f"delimiters {document_delimiters(side)}")
            for sample in info["samples"]:
                shown = json.dumps(sample["text"], ensure_ascii=False) if "text" in sample else sample["ids"]
                print(f"[{sample['index']}] {sample['length']} tokens: {shown}")
            return 0
        if not args.output_prefix:
            return _fail("--output-prefix is required", 2)
        if args.merge:
            counts = merge_datasets(args.merge, args.output_prefix, args.allow_mixed_tokenizers)
            print(json.dumps(counts, indent=2))
            return 0
        if not args.input or not args.tokenizer_model:
            return _fail("--input and --tokenizer-model are required", 2)
        if args.workers < 1:
            return _fail(f"--workers {args.workers}: must be >= 1", 2)
        if not 0.0 <= args.max_bad_fraction <= 1.0:  # also refuses nan (every comparison with it is false)
            return _fail(f"--max-bad-fraction {args.max_bad_fraction}: must lie in [0, 1] (a share of the records)", 2)
        block_bytes = int(args.block_size_mb * (1 << 20))
        if block_bytes < 1:
            return _fail(f"--block-size-mb {args.block_size_mb}: must be > 0 (it is the size of one work item)", 2)
        preprocess_jsonl(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
            json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers, dedup=args.dedup,
            max_bad_fraction=args.max_bad_fraction, log_interval=args.log_interval,
            progress="none" if args.quiet else args.progress, block_bytes=block_bytes, prepend_bos=args.prepend_bos,
        )
        return 0
    except (PreprocessError, TokenizerError, FileNotFoundError, ValueError) as exc:
        return _fail(f"error: {exc}", 2)
    except OSError as exc:  # disk full, no permission, quota: what and where, in one line
        if exc.errno == errno.ENOSPC:
            return _fail(f"error: no space left on the device while writing {exc.filename or args.output_prefix}; "
                         "nothing was published (the partial output was removed); free space and run again", 2)
        return _fail(f"error: {exc.strerror or exc} ({exc.filename or args.output_prefix}); nothing was published", 2)
    except TooManyBadLinesError as exc:
        return _fail(f"error: {exc}", 3)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        return _fail(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}; no output was published",
                     128 + signal.SIGTERM if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
