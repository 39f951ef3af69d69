#!/usr/bin/env python3
"""Train a LLaMA-style sentencepiece tokenizer (BPE or unigram) on JSONL text.

Writes PREFIX.model and PREFIX.vocab; an existing PREFIX.model (which datasets may have been made
with) is refused unless --force. Example:
  python tools/train_tokenizer.py --input demo/train.jsonl --model-prefix demo/tok --vocab-size 4096

The trainer keeps every input line in memory, so only the first --max-sentences lines are used
(default 10,000,000: about 1-2 GB and tens of minutes for ordinary text; 0 lifts the cap).
Exit codes: 0 ok, 2 bad arguments / inputs / no usable text / training failed, 130 interrupted.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apex.data.train_tokenizer import DEFAULT_MAX_SENTENCES, train_sentencepiece  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files (plain/.gz/.zst/.bz2/.xz) or directories")
    parser.add_argument("--model-prefix", "--output-prefix", dest="model_prefix", required=True)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--max-sentences", type=int, default=DEFAULT_MAX_SENTENCES,
                        help=f"use the first N input lines (default {DEFAULT_MAX_SENTENCES:,}; 0: no cap)")
    parser.add_argument("--max-chars", type=int, default=0, help="cap on training characters (default 0: no cap)")
    parser.add_argument("--unk-id", type=int, default=0)
    parser.add_argument("--bos-id", type=int, default=1)
    parser.add_argument("--eos-id", type=int, default=2)
    parser.add_argument("--pad-id", type=int, default=-1)
    parser.add_argument("--no-byte-fallback", action="store_true")
    parser.add_argument("--character-coverage", type=float, default=0.99995)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--soft-vocab-limit", action="store_true",
                        help="allow a smaller vocabulary when the corpus is too small (with a warning)")
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own training log")
    parser.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.model / PREFIX.vocab")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    existing = [p for p in (args.model_prefix + ".model", args.model_prefix + ".vocab") if os.path.exists(p)]
    if existing and not args.force:
        # It used to be replaced silently: datasets tokenized with the old model would no longer match it.
        logging.error("error: %s already exists: pass --force to overwrite it (datasets made with it would no "
                      "longer match), or choose another --model-prefix", " and ".join(existing))
        return 2
    for name in ("max_sentences", "max_chars"):
        if getattr(args, name) < 0:
            logging.error("error: --%s %d: must be >= 0 (0: no cap)", name.replace("_", "-"), getattr(args, name))
            return 2
    try:
        path = train_sentencepiece(
            args.input, args.model_prefix, args.vocab_size, model_type=args.model_type, json_key=args.json_key,
            max_sentences=args.max_sentences, max_chars=args.max_chars, unk_id=args.unk_id, bos_id=args.bos_id,
            eos_id=args.eos_id, pad_id=args.pad_id, byte_fallback=not args.no_byte_fallback,
            character_coverage=args.character_coverage, num_threads=args.num_threads,
            hard_vocab_limit=not args.soft_vocab_limit, verbose=args.verbose,
        )
    except (OSError, ValueError) as exc:
        logging.error("error: %s", exc)
        return 2
    except KeyboardInterrupt:
        logging.error("interrupted; no tokenizer was written")
        return 130
    logging.info("tokenizer written to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
