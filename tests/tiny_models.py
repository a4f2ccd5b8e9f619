"""Tiny tokenizers and causal language models built in-process for tests.

The tokenizer mirrors SmolLM2-Instruct's special tokens and ChatML chat template, including its
flaw that the pad token equals the end-of-turn token, so loading code must repair it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2-Instruct ships it: a default system message when none is given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Question: Is the treatment effective? Answer: yes",
    "Question: Does the drug reduce mortality in patients? Answer: no",
    "Answer: maybe. The evidence is mixed and the trial was small.",
    "The correct answer is (B). Option A is wrong because the dose is too high.",
    "Context: Patients with chronic kidney disease were randomised to two groups.",
    "Revenue increased from 1,452.4 million to 1,496.5 million, a change of 3.0 percent.",
    "The company reported net income of $12.5 million in 2019 compared with $10.1 million.",
    "Bullish bearish neutral sentiment of financial news about stocks and markets.",
    "A 45-year-old man presents with chest pain radiating to the left arm.",
    "Which of the following is the most likely diagnosis? A B C D E",
    "Let's think step by step. First, the results show a significant reduction.",
    "Therefore, the answer is yes because the study found a clear benefit.",
    "system user assistant You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 % $ ( ) . , : ; - | * ** <think></think>",
]


def make_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with SmolLM2's special tokens and chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
) -> torch.nn.Module:
    """Build a randomly initialised tiny Llama or Qwen2 causal LM for ``tokenizer``."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise ValueError(f"unknown tiny architecture {arch!r}; use llama or qwen2")


def save_tiny_model(folder: Path, arch: str = "llama", layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face folder (safetensors) and return it."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, arch=arch, layers=layers, hidden=hidden, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
