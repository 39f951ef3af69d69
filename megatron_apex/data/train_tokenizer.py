"""Train a LLaMA-style sentencepiece tokenizer on JSONL text.

The settings copy what Meta used for LLaMA-1/2 so a model trained here behaves like the real
thing: BPE, ``byte_fallback`` (no ``<unk>`` for unseen characters -- they become byte pieces),
``split_digits``, identity normalization and no whitespace squeezing (so code and indentation
round-trip exactly), and special ids unk=0, bos=1, eos=2 with no pad piece (pad=-1).

Input is streamed through ``sentence_iterator``: documents are split into lines (sentencepiece
drops "sentences" longer than ``max_sentence_length`` bytes, so whole documents would be lost)
and capped by ``max_sentences`` (default :data:`DEFAULT_MAX_SENTENCES`, the first lines of the
input) and ``max_chars``, because the trainer keeps every sentence it is given in memory (about
1-2 GB and tens of minutes of training for 10M lines of ordinary text). ``None`` or 0 lifts a cap.
Unusable lines (bad JSON or UTF-8, a missing or non-string key, lone surrogates) are skipped,
counted by reason and reported like preprocessing does; a progress line is logged every
``progress_every`` sentences while the input is read. The trainer itself runs in C++ and reports
nothing until it ends (``verbose=True`` shows sentencepiece's own log).

The model is written under temporary names and renamed into place, so an interrupted run never
leaves a half-written ``.model``. SIGTERM keeps its default action here on purpose: a Python
handler would only run after the C++ trainer returns.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Iterator, Optional, Sequence

from .jsonl import expand_inputs, iter_texts

logger = logging.getLogger(__name__)

__all__ = ["train_sentencepiece", "iter_training_sentences", "DEFAULT_MAX_SENTENCES"]

DEFAULT_MAX_SENTENCES = 10_000_000


def iter_training_sentences(
    inputs: Sequence[str],
    json_key: str = "text",
    max_sentences: Optional[int] = DEFAULT_MAX_SENTENCES,
    max_chars: Optional[int] = None,
    max_sentence_bytes: int = 4096,
    skipped: Optional[dict] = None,
    progress_every: int = 1_000_000,
) -> Iterator[str]:
    """Non-blank lines of the ``json_key`` texts, cut to ``max_sentence_bytes`` and capped by count
    and total characters (whichever limit is reached first; ``None`` or 0: no cap). Skipped input
    lines are counted by reason in ``skipped`` (see :func:`~megatron_apex.data.jsonl.iter_texts`)."""
    sentences = chars = 0
    start = time.monotonic()
    for text in iter_texts(inputs, json_key, skipped=skipped):
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line) > max_sentence_bytes // 4:  # keep well under the trainer's byte limit
                line = line[: max_sentence_bytes // 4]
            yield line
            sentences += 1
            chars += len(line)
            if progress_every and sentences % progress_every == 0:
                logger.info("read %d sentences, %.1fM characters (%.0f sentences/s)", sentences, chars / 1e6,
                            sentences / max(time.monotonic() - start, 1e-9))
            for name, cap, value in (("max_sentences", max_sentences, sentences), ("max_chars", max_chars, chars)):
                if cap and value >= cap:
                    logger.info("reached %s=%d: the rest of the input is not used", name, cap)
                    return


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    max_sentences: Optional[int] = DEFAULT_MAX_SENTENCES,
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
    verbose: bool = False,
) -> str:
    """Train ``{model_prefix}.model`` + ``{model_prefix}.vocab``; returns the ``.model`` path.

    ``vocab_size`` includes the special and byte pieces (LLaMA-2: 32000). Raises ValueError when
    the corpus is too small for the requested size (with ``hard_vocab_limit``; without it the
    vocabulary shrinks, with a warning) or the inputs hold no usable text (the message gives the
    skipped lines by reason), and :class:`~megatron_apex.data.jsonl.InputError` for a missing or
    damaged input.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    files = expand_inputs(inputs)
    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    skipped: dict = {}
    stream = iter_training_sentences(files, json_key, max_sentences, max_chars, skipped=skipped)
    first = next(stream, None)  # sentencepiece's own message for an empty input names nothing
    if first is None:
        raise ValueError(f"no usable {json_key!r} text in {list(inputs)}"
                         + (f" (skipped lines by reason: {skipped})" if skipped else " (no non-blank lines)"))
    counted = {"n": 0}
    failure: list = []

    def sentences():
        try:
            for sentence in itertools.chain([first], stream):
                counted["n"] += 1
                yield sentence
        except BaseException as exc:  # sentencepiece turns it into a RuntimeError without the type
            failure.append(exc)
            raise

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
        minloglevel=0 if verbose else 2,
    )
    options.update(extra_options or {})
    logger.info("training sentencepiece %s, vocab %d, on %s (reading the input, then training in C++; "
                "this takes a while on a large input)", model_type, vocab_size, list(inputs))
    tmp_prefix = f"{model_prefix}.tmp{os.getpid()}"
    try:
        try:
            spm.SentencePieceTrainer.Train(sentence_iterator=sentences(), model_prefix=tmp_prefix, **options)
        except RuntimeError as exc:
            if failure:
                raise failure[0] from None
            raise ValueError(f"sentencepiece training failed: {exc}") from exc
        for suffix in (".vocab", ".model"):  # the .model last: its presence means "complete"
            os.replace(tmp_prefix + suffix, model_prefix + suffix)
    finally:
        for suffix in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + suffix):
                os.unlink(tmp_prefix + suffix)
    if skipped:
        logger.warning("skipped %d unusable input line(s) by reason: %s", sum(skipped.values()), skipped)
    pieces = spm.SentencePieceProcessor(model_file=model_prefix + ".model").GetPieceSize()
    if pieces != vocab_size:
        logger.warning("the corpus supports only %d pieces: %s.model has a vocabulary of %d, not the %d asked "
                       "for (soft vocabulary limit)", pieces, model_prefix, pieces, vocab_size)
    logger.info("wrote %s.model and %s.vocab (%d pieces) from %d sentences", model_prefix, model_prefix, pieces,
                counted["n"])
    return model_prefix + ".model"
