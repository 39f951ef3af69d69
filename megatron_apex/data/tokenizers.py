"""One tokenizer interface for preprocessing, training and checkpoint conversion.

LLaMA-family models ship their vocabulary either as a sentencepiece ``.model`` (LLaMA-1/2,
Mistral v0.1) or as a Hugging Face ``tokenizer.json`` (LLaMA-3, newer Mistral, Qwen2/Qwen2.5). Every part of
megatron-apex that touches token ids (the ``.bin/.idx`` preprocessor, the training engine, the HF
converter) goes through :func:`load_tokenizer` so they all agree on the vocabulary size, the
end-of-document id and -- via :meth:`Tokenizer.identity` -- on *which* tokenizer file produced a
dataset or a checkpoint.

Design notes:

* ``encode`` never adds BOS/EOS. Pre-training data is a stream of documents separated by EOD
  (``--append-eod``); adding specials is a decision of the caller, not of the tokenizer.
* ``encode_batch`` is the fast path: sentencepiece's batch ``Encode`` runs a C++ thread pool and
  returns numpy buffers, Hugging Face's ``encode_batch_fast`` runs in Rust with the GIL released.
  :meth:`Tokenizer.encode_batch_arrays` exposes the numpy form so the preprocessor never touches
  individual token ids in Python.
* Only the ``tokenizers`` library is used for Hugging Face files -- no ``transformers`` and no
  network at run time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np

from megatron_apex.config import tokenizer_kind

logger = logging.getLogger(__name__)

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "TokenizerError",
    "load_tokenizer",
    "detect_tokenizer_kind",
    "normalize_tokenizer_kind",
    "file_sha256",
]


# Candidate end-of-document tokens for HF tokenizers without a tokenizer_config.json, in order of
# preference. LLaMA-3 base models end documents with <|end_of_text|>, LLaMA-2/Mistral with </s>.
_EOD_CANDIDATES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|eot_id|>", "<|im_end|>")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or lacks something the caller needs."""


def normalize_tokenizer_kind(kind: str) -> str:
    """Map user-facing names (ours and Megatron-LM's ``--tokenizer-type``) to a canonical kind."""
    canonical = tokenizer_kind(kind)
    if canonical is None:
        raise TokenizerError(
            f"unknown tokenizer kind {kind!r}; expected one of sentencepiece, huggingface "
            "(or SentencePieceTokenizer, HuggingFaceTokenizer)"
        )
    return canonical


def detect_tokenizer_kind(path: str) -> str:
    """Guess the kind from the file name: ``*.model`` -> sentencepiece, ``*.json`` or a directory
    holding ``tokenizer.json`` -> huggingface. Raises :class:`TokenizerError` if unsure."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return "huggingface"
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return "sentencepiece"
        raise TokenizerError(f"directory {path!r} holds neither tokenizer.json nor tokenizer.model")
    if path.endswith(".model"):
        return "sentencepiece"
    if path.endswith(".json"):
        return "huggingface"
    raise TokenizerError(f"cannot tell the tokenizer kind of {path!r} (expected *.model or tokenizer.json)")


def file_sha256(path: str) -> str:
    """sha256 of a file, streamed (tokenizer.json files can be tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """Common interface. Subclasses set the attributes and implement the ``_encode*`` hooks."""

    kind: str = ""
    path: str = ""
    vocab_size: int = 0  # size of the id space (largest id + 1): embedding rows and dataset dtype need this
    eod_id: int = -1
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts; batched in native code."""
        return [arr.tolist() for arr in self.encode_batch_arrays(texts)]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like :meth:`encode_batch` but returns int32 numpy arrays (no per-token Python work)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def identity(self) -> dict:
        """What is needed to recognise this tokenizer later (stored in sidecars and checkpoints)."""
        return {
            "kind": self.kind,
            "path": self.path,
            "vocab_size": int(self.vocab_size),
            "sha256": file_sha256(self.path),
            "eod_id": int(self.eod_id),
            "bos_id": None if self.bos_id is None else int(self.bos_id),
            "pad_id": None if self.pad_id is None else int(self.pad_id),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` (LLaMA-2 style). EOD is the model's ``eos`` piece."""

    kind = "sentencepiece"

    def __init__(self, path: str, num_threads: int = -1):
        import sentencepiece

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        self.path = os.path.abspath(path)
        # num_threads=-1 lets sentencepiece use all cores for batch calls; pool workers pass 1 so
        # that N worker processes do not each spawn N threads.
        self.num_threads = num_threads
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load sentencepiece model {path!r}: {exc}") from exc
        self.vocab_size = int(self._sp.GetPieceSize())
        eos, bos, pad = self._sp.eos_id(), self._sp.bos_id(), self._sp.pad_id()
        if eos < 0:
            raise TokenizerError(f"sentencepiece model {path!r} has no eos piece (needed as EOD)")
        self.eod_id = int(eos)
        self.bos_id = int(bos) if bos >= 0 else None
        self.pad_id = int(pad) if pad >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.Encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.Encode(list(texts), num_threads=self.num_threads)

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self._sp.Encode(list(texts), num_threads=self.num_threads, return_type="numpy")

    def decode(self, ids) -> str:
        return self._sp.Decode([int(i) for i in ids])


def _special_from_config(config: dict, field: str) -> Optional[str]:
    value = config.get(field)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (LLaMA-3, Mistral, Qwen2) loaded with the ``tokenizers`` library.

    Special tokens come from a neighbouring ``tokenizer_config.json`` when there is one (that is
    where HF records eos/bos/pad), otherwise from a list of well-known names. A ``bos_token`` the
    config sets to null (Qwen2's convention: documents start without one) means no BOS, whatever
    the vocabulary holds.
    """

    kind = "huggingface"

    def __init__(self, path: str, eod_token: Optional[str] = None):
        import tokenizers

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self.path = os.path.abspath(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as exc:  # the Rust side raises plain Exception on bad files
            raise TokenizerError(f"cannot load Hugging Face tokenizer {path!r}: {exc}") from exc
        # Ids, not entries: a vocabulary with holes (say ids 0, 1 and 69999) has fewer entries than
        # its largest id, and both the embedding and the dataset dtype must hold that id.
        ids = self._tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(int(self._tok.get_vocab_size(with_added_tokens=True)), max(ids, default=-1) + 1)
        config = {}
        config_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as handle:
                    config = json.load(handle)
            except (OSError, ValueError) as exc:
                logger.warning("ignoring unreadable %s: %s", config_path, exc)
        # A tokenizer.json may carry truncation or padding settings (saved with a fine-tuning
        # setup); applied here they would cut or pad every document, silently.
        if self._tok.truncation is not None or self._tok.padding is not None:
            logger.warning("%s: ignoring the truncation/padding settings stored in it (documents are "
                           "tokenized whole and unpadded)", self.path)
            self._tok.no_truncation()
            self._tok.no_padding()
        if eod_token and self._tok.token_to_id(eod_token) is None:
            raise TokenizerError(f"end-of-document token {eod_token!r} is not in the vocabulary of {path!r}")
        config_eos = _special_from_config(config, "eos_token")
        eod = self._find(eod_token or config_eos, _EOD_CANDIDATES)
        if eod is None:
            raise TokenizerError(
                f"cannot determine the end-of-document token of {path!r}: no eos_token in "
                f"tokenizer_config.json and none of {', '.join(_EOD_CANDIDATES)} in the vocabulary"
            )
        if not eod_token and config_eos and self._tok.token_to_id(config_eos) is None:
            logger.warning("%s: eos_token %r of tokenizer_config.json is not in the vocabulary; using %r "
                           "(id %d) as the end-of-document token", path, config_eos, self._tok.id_to_token(eod), eod)
        self.eod_id = eod
        no_bos = "bos_token" in config and config["bos_token"] is None
        self.bos_id = None if no_bos else self._find(_special_from_config(config, "bos_token"), _BOS_CANDIDATES)
        self.pad_id = self._find(_special_from_config(config, "pad_token"), _PAD_CANDIDATES)
        self._batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch

    def _find(self, preferred: Optional[str], candidates: Sequence[str]) -> Optional[int]:
        for token in ([preferred] if preferred else []) + list(candidates):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._batch(list(texts), add_special_tokens=False)]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(enc.ids, dtype=np.int32) for enc in self._batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(kind: Optional[str], path: str, **options) -> Tokenizer:
    """Load a tokenizer. ``kind`` is "sentencepiece" / "huggingface" (or the Megatron-LM names
    SentencePieceTokenizer / HuggingFaceTokenizer); ``None`` or "auto" detects it from ``path``.

    Extra keyword options go to the backend (``num_threads`` for sentencepiece, ``eod_token`` for
    Hugging Face). Raises :class:`TokenizerError` with a readable message on any failure.
    """
    if not path or not os.path.exists(path):
        raise TokenizerError(f"tokenizer file {path!r} does not exist")
    kind = detect_tokenizer_kind(path) if kind in (None, "", "auto") else normalize_tokenizer_kind(kind)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, **options)
    return HuggingFaceTokenizer(path, **options)
