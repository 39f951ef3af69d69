"""Logit parity between a megatron_apex checkpoint and a Hugging Face model directory.

Both sides run in fp32 on the same random token sequences; we report the largest absolute logit
difference and the mean per-token KL(HF || ours) over the real (unpadded) vocabulary. Uses
``transformers`` for the HF side; without it, :class:`VerifyUnavailable` says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_apex.convert.mapping import ConversionError

logger = logging.getLogger(__name__)


class VerifyUnavailable(ConversionError):
    """--verify needs ``transformers``, which is not installed."""


class VerifyFailed(ConversionError):
    """The two models disagree beyond the tolerance."""


@dataclass
class VerifyResult:
    max_abs_diff: float
    kl: float
    num_tokens: int

    def check(self, atol: float, kl_tol: float) -> "VerifyResult":
        if not (self.max_abs_diff <= atol and self.kl <= kl_tol):
            raise VerifyFailed(f"logits differ: max |diff| = {self.max_abs_diff:.3e} (tolerance {atol:.1e}), "
                               f"KL = {self.kl:.3e} (tolerance {kl_tol:.1e})")
        return self


def logit_stats(ours: torch.Tensor, theirs: torch.Tensor) -> VerifyResult:
    """Max |diff| and mean KL(theirs || ours) of [b, s, V] logits."""
    ours, theirs = ours.double(), theirs.double()
    log_p = torch.log_softmax(theirs, dim=-1)
    log_q = torch.log_softmax(ours, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return VerifyResult(float((ours - theirs).abs().max()), float(kl), int(ours.shape[0] * ours.shape[1]))


def random_tokens(vocab: int, num_sequences: int, seq_length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_sequences, seq_length), generator=g)  # [b, s]


def mcore_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s, Vp] logits of a TP=1/PP=1 GPTModel."""
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        return model(tokens, position_ids, None).float()


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s, V] logits of the HF model, computed in a fresh (spawned) process.

    Why a child process: once megatron-core's CPU patches and parallel state have been set up in a
    process (any conversion does that), transformers 5.x ``from_pretrained`` there was measured to
    leave the non-persistent RoPE buffer ``rotary_emb.inv_freq`` uninitialised (garbage or NaN
    logits). A clean interpreter keeps the reference side independent of ours."""
    import concurrent.futures
    import importlib.util
    import multiprocessing

    if importlib.util.find_spec("transformers") is None:
        raise VerifyUnavailable("--verify needs the 'transformers' package to run the Hugging Face model; "
                                "install it (pip install transformers) or drop --verify")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(hf_logits_here, hf_dir, tokens).result()


def hf_logits_here(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`hf_logits` in this process (only safe before any megatron-core set-up here)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def compare_checkpoint_with_hf(checkpoint: str, hf_dir: str, num_sequences: int = 4, seq_length: int = 64,
                               seed: int = 0, vocab_size: Optional[int] = None) -> VerifyResult:
    """Load both sides (ours at TP=1/PP=1, fp32) and compare logits on random sequences. ``vocab_size``:
    the true vocabulary size, for a checkpoint whose config lacks it (as for the export)."""
    from megatron_apex.convert.exporter import load_model, resolve_export_config
    from megatron_apex.convert.runtime import single_process

    path, common, cfg, vocab, padded = resolve_export_config(checkpoint, vocab_size)
    seq_length = min(seq_length, cfg.model.max_position_embeddings)
    tokens = random_tokens(vocab, num_sequences, seq_length, seed)
    theirs = hf_logits(hf_dir, tokens)  # first: the HF model is freed before ours is built
    with single_process(cfg) as ctx:
        model = load_model(path, common, cfg, padded, torch.float32, ctx)
        ours = mcore_logits(model, tokens)[..., :vocab]
        del model
    result = logit_stats(ours, theirs)
    logger.info("verify: %d tokens, max |logit diff| %.3e, KL(HF || ours) %.3e", result.num_tokens,
                result.max_abs_diff, result.kl)
    return result
