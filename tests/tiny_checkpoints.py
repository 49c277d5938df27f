"""Tiny checkpoint folders in the published layout, built on the fly for engine tests.

A byte-level BPE tokenizer is trained on a few sentences, and HF transformers writes a random
Llama of matching vocabulary (initializer_range 0.2, so greedy choices are not near-ties).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        "Émile a mangé 3 crêpes 🍓 à Montréal; 東京は日本の首都です. ") * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_tiny_llama(folder: Path, vocab_size: int = 320, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, vocab_size)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
               initializer_range=0.2, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(folder, safe_serialization=True)
    return folder
