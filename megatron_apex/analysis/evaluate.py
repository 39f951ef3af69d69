"""Loss and perplexity of a model on held-out datasets, measured the same way for every model.

Models: a megatron-apex checkpoint (a root or an ``iter_*`` directory, saved under any TP/PP layout; read
into one TP=1 process, a mid-stage APEX checkpoint with its operators fused as the export does), or a
Hugging Face model directory (``config.json`` and safetensors), which transformers runs in a child
process (megatron-core's CPU set-up in this one must not touch it, see ``convert.verify.hf_logits``).

Data: Megatron indexed dataset prefixes. Each is read as the trainer's validation reads
``data.valid_data_path=[prefix]`` with ``train.seed`` = the evaluation seed
(:func:`megatron_apex.data.datasets.build_eval_dataset`): with the default seed 0 every model, whatever
seed it was trained with, is measured on the same tokens, and a run whose own seed is the evaluation
seed gets its trainer's validation loss back. The loss is the mean next-token cross-entropy over all
tokens of the samples (the trainer's, without ``data.eod_mask_loss``). A checkpoint trained with
``data.reset_attention_mask`` is evaluated with the same document masks (attention does not cross an
end-of-document token); a Hugging Face model attends causally over the whole sample.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from megatron_apex.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class DatasetLoss:
    prefix: str
    samples: int
    tokens: int
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def is_hf_model_dir(path: str) -> bool:
    """A Hugging Face model directory: config.json beside safetensors weights."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(path))


def eval_batches(prefix: str, seq_length: int, num_samples: int, seed: int, vocab_size: int, eod_id: int,
                 micro_batch_size: int, cache_path: Optional[str] = None, reset_attention_mask: bool = False):
    """(number of samples, iterator of ``(tokens, labels, position_ids, attention_mask)`` batches of one
    dataset): ``[b, s]`` each, the mask ``[b, 1, s, s]`` (True where attention is barred) with
    ``reset_attention_mask``, else None."""
    from megatron_apex.data.datasets import build_eval_dataset

    dataset, n = build_eval_dataset(prefix, seq_length, num_samples, seed, vocab_size, eod_id, cache_path,
                                    reset_attention_mask)

    def batches():
        for start in range(0, n, micro_batch_size):
            items = [dataset[i] for i in range(start, min(start + micro_batch_size, n))]
            tokens, labels = (torch.stack([torch.as_tensor(it[key]) for it in items]) for key in ("tokens", "labels"))
            top = int(max(tokens.max(), labels.max()))
            if top >= vocab_size:
                raise ConfigError(f"{prefix}: token id {top} does not fit the model's vocabulary of {vocab_size}: "
                                  "the dataset was made with another tokenizer")
            mask = torch.stack([torch.as_tensor(it["attention_mask"]) for it in items]) if reset_attention_mask else None
            yield tokens.long(), labels.long(), torch.arange(tokens.shape[1]).expand_as(tokens), mask
    return n, batches()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, s, V] logits, [b, s] labels -> [b, s] float64 cross-entropies."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                             reduction="none").view_as(labels).double()


def _mean_loss(prefix: str, n: int, batches, token_losses) -> DatasetLoss:
    total, count = 0.0, 0
    for tokens, labels, position_ids, mask in batches:
        losses = token_losses(tokens, labels, position_ids, mask)  # [b, s]
        total += float(losses.sum())
        count += losses.numel()
    return DatasetLoss(prefix, n, count, total / count)


def _eod_id(path: str, cfg) -> int:
    """The end-of-document id a run's document masks split at (0 where nothing depends on it)."""
    if cfg.data.eod_id is not None or not cfg.data.reset_attention_mask:
        return cfg.data.eod_id or 0
    from megatron_apex.data.datasets import resolve_vocab

    try:
        return resolve_vocab(cfg)[1]
    except Exception as exc:  # the run's tokenizer may not exist on this machine
        raise ConfigError(f"{path}: trained with data.reset_attention_mask, whose document masks split at the "
                          f"end-of-document id, and the run's tokenizer ({cfg.data.tokenizer_model}) that gives it "
                          f"cannot be read here ({exc})") from None


def evaluate_checkpoint(path: str, prefixes: list, num_samples: int = 0, seed: int = 0, micro_batch_size: int = 8,
                        seq_length: Optional[int] = None, cache_path: Optional[str] = None) -> dict:
    """Losses of a megatron-apex checkpoint (module docstring); a dict ready for JSON."""
    from megatron_apex.convert.exporter import load_model, resolve_export_config
    from megatron_apex.convert.runtime import single_process

    iter_dir, common, cfg, vocab, padded = resolve_export_config(path)
    seq = seq_length or cfg.data.seq_length
    if seq > cfg.model.max_position_embeddings:
        raise ConfigError(f"--seq-length {seq}: longer than the model's max_position_embeddings "
                          f"{cfg.model.max_position_embeddings}")
    results = []
    with single_process(cfg) as ctx:
        model = load_model(iter_dir, common, cfg, padded, torch.float32, ctx)

        def token_losses(tokens, labels, position_ids, mask):
            with torch.no_grad():
                return model(tokens, position_ids, mask, labels=labels).double()  # [b, s]

        eod = _eod_id(path, cfg)
        for prefix in prefixes:
            n, batches = eval_batches(prefix, seq, num_samples, seed, vocab, eod, micro_batch_size, cache_path,
                                      cfg.data.reset_attention_mask)
            results.append(_mean_loss(prefix, n, batches, token_losses))
            logger.info("%s: loss %.4f over %d tokens", prefix, results[-1].loss, results[-1].tokens)
        del model
    trained = {"step": common.get("step"), "seed": cfg.train.seed,
               "tokens": (common.get("consumed_samples") or 0) * cfg.data.seq_length}
    return _result(path, "megatron-apex", seed, seq, trained, results)


def evaluate_hf(hf_dir: str, prefixes: list, num_samples: int = 0, seed: int = 0, micro_batch_size: int = 8,
                seq_length: Optional[int] = None, cache_path: Optional[str] = None) -> dict:
    """Losses of a Hugging Face model directory, run by transformers in a spawned child process."""
    import concurrent.futures
    import importlib.util
    import json
    import multiprocessing

    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("a Hugging Face model needs the 'transformers' package (pip install transformers)")
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        hf_cfg = json.load(f)
    vocab = int(hf_cfg["vocab_size"])
    seq = seq_length or min(int(hf_cfg.get("max_position_embeddings", 2048)), 2048)
    data = []
    for prefix in prefixes:  # the token batches are made here, the model runs there
        n, batches = eval_batches(prefix, seq, num_samples, seed, vocab, 0, micro_batch_size, cache_path)
        data.append((prefix, n, list(batches)))
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = pool.submit(_hf_losses_here, hf_dir, data).result()
    return _result(hf_dir, "huggingface", seed, seq, None, results)


def _hf_losses_here(hf_dir: str, data: list) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()

    def token_losses(tokens, labels, position_ids, mask):  # no document masks here (module docstring)
        with torch.no_grad():
            return _token_losses(model(input_ids=tokens, position_ids=position_ids).logits, labels)

    return [_mean_loss(prefix, n, batches, token_losses) for prefix, n, batches in data]


def evaluate(model: str, prefixes: list, **kwargs) -> dict:
    """:func:`evaluate_hf` for a Hugging Face model directory, else :func:`evaluate_checkpoint`."""
    if not os.path.exists(model):
        raise ConfigError(f"{model}: no such checkpoint or model directory")
    if os.path.isdir(model) and is_hf_model_dir(model):
        return evaluate_hf(model, prefixes, **kwargs)
    return evaluate_checkpoint(model, prefixes, **kwargs)


def _result(model: str, kind: str, seed: int, seq: int, trained: Optional[dict], results: list) -> dict:
    return {"model": model, "kind": kind, "eval_seed": seed, "seq_length": seq, "trained": trained,
            "datasets": [{**asdict(r), "perplexity": r.perplexity} for r in results]}


def format_table(result: dict) -> str:
    """The per-dataset table of :func:`evaluate`'s result, as text."""
    rows = [("dataset", "samples", "tokens", "loss", "perplexity")]
    rows += [(d["prefix"], str(d["samples"]), str(d["tokens"]), f"{d['loss']:.4f}", f"{d['perplexity']:.3f}")
             for d in result["datasets"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
