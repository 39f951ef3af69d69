"""Tiny random models and tokenizers of the Hugging Face families the converter reads (LLaMA, Mistral,
Qwen2/Qwen2.5), built with transformers' own config classes and the ``tokenizers`` library: no downloads."""

from __future__ import annotations

import json
import os
import random

import torch

VOCAB = 1000  # not a multiple of 128: the vocabulary padding is exercised
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Qwen2.5's own settings at a tiny size (Qwen2.5-0.5B/1.5B: tied embeddings, theta 1e6, RMSNorm eps 1e-6,
# no sliding window although config.json names one, bos = eos = <|endoftext|>).
QWEN25 = dict(tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768,
              max_window_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
              bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


def make_family(path, family: str, tie: bool = False, vocab: int = VOCAB, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, hidden: int = 64, ffn: int = 160, max_positions: int = 128, seed: int = 0,
                **extra) -> str:
    """save_pretrained a random ``family`` model; norms and the Q/K/V biases (Qwen2) get random values, so a
    swapped or dropped one shows in the logits."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                  max_position_embeddings=max_positions, rms_norm_eps=1e-5)
    kwargs.update(extra)
    cfg = getattr(transformers, CONFIG_CLASSES[family])(**kwargs)
    model = getattr(transformers, MODEL_CLASSES[family])(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith("_proj.bias"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(path)
    return str(path)


def hf_state(path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        state.update(load_file(os.path.join(path, f)))
    return state


# ---------------------------------------------------------------------- tokenizers
SPECIALS = {  # (special tokens, first ids) and tokenizer_config.json of each family's convention
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}),
    "mistral": (["<unk>", "<s>", "</s>"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True}),
}
WORDS = ("the model reads tokens and learns which come next while the operator mixes advantageous units into "
         "the least used ones at every stage boundary then folds them back").split()


def corpus(n: int = 200, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "." for _ in range(n)]


def make_tokenizer(directory, family: str, vocab_size: int = 320) -> str:
    """A byte-level BPE ``tokenizer.json`` trained on a tiny corpus, with the family's special tokens first
    (Qwen2: <|endoftext|> and no BOS; Mistral: <unk> <s> </s> at ids 0, 1, 2) and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials, config = SPECIALS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def write_jsonl(path, n: int = 200, seed: int = 1) -> str:
    with open(path, "w") as f:
        for text in corpus(n, seed):
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)
