"""Train a LLaMA-style sentencepiece tokenizer on JSONL text.

The settings copy what Meta used for LLaMA-1/2 so a model trained here behaves like the real
thing: BPE, ``byte_fallback`` (no ``<unk>`` for unseen characters -- they become byte pieces),
``split_digits``, identity normalization and no whitespace squeezing (so code and indentation
round-trip exactly), and special ids unk=0, bos=1, eos=2 with no pad piece (pad=-1).

Input is streamed through ``sentence_iterator``: documents are split into lines (sentencepiece
drops "sentences" longer than ``max_sentence_length`` bytes, so whole documents would be lost)
and capped by ``max_sentences`` / ``max_chars`` because the trainer keeps every sentence it is
given in memory.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Optional, Sequence

from .jsonl import InputError, expand_inputs, iter_texts

logger = logging.getLogger(__name__)

__all__ = ["train_sentencepiece", "iter_training_sentences"]


def iter_training_sentences(
    inputs: Sequence[str],
    json_key: str = "text",
    max_sentences: Optional[int] = None,
    max_chars: Optional[int] = None,
    max_sentence_bytes: int = 4096,
) -> Iterator[str]:
    """Non-blank lines of the ``json_key`` texts, cut to ``max_sentence_bytes`` and capped by count
    and total characters (whichever limit is reached first)."""
    sentences = chars = 0
    for text in iter_texts(inputs, json_key):
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line) > max_sentence_bytes // 4:  # keep well under the trainer's byte limit
                line = line[: max_sentence_bytes // 4]
            yield line
            sentences += 1
            chars += len(line)
            if (max_sentences is not None and sentences >= max_sentences) or (
                max_chars is not None and chars >= max_chars
            ):
                return


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    max_sentences: Optional[int] = None,
    max_chars: Optional[int] = None,
    unk_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int = -1,
    byte_fallback: bool = True,
    character_coverage: float = 0.99995,
    num_threads: Optional[int] = None,
    hard_vocab_limit: bool = True,
    extra_options: Optional[dict] = None,
) -> str:
    """Train ``{model_prefix}.model`` + ``{model_prefix}.vocab``; returns the ``.model`` path.

    ``vocab_size`` includes the special and byte pieces (LLaMA-2: 32000). Raises ValueError when
    the corpus is too small for the requested size (with ``hard_vocab_limit``) or the inputs hold
    no text.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    try:
        expand_inputs(inputs)
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    counted = {"n": 0}

    def sentences():
        for sentence in iter_training_sentences(inputs, json_key, max_sentences, max_chars):
            counted["n"] += 1
            yield sentence

    options = dict(
        model_type=model_type,
        vocab_size=int(vocab_size),
        unk_id=unk_id,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=16384,
        hard_vocab_limit=hard_vocab_limit,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    options.update(extra_options or {})
    logger.info("training sentencepiece %s, vocab %d, on %s", model_type, vocab_size, list(inputs))
    try:
        spm.SentencePieceTrainer.Train(sentence_iterator=sentences(), model_prefix=model_prefix, **options)
    except RuntimeError as exc:
        raise ValueError(f"sentencepiece training failed: {exc}") from exc
    if counted["n"] == 0:
        raise ValueError(f"no {json_key!r} text found in {list(inputs)}")
    logger.info("wrote %s.model and %s.vocab from %d sentences", model_prefix, model_prefix, counted["n"])
    return model_prefix + ".model"
