"""Shared fixtures: tiny random-weight models (fast plumbing tests) and the real smollm2-135m (slow tests)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from softprompt.causal import CausalLM
from softprompt.data import Example

torch.set_num_threads(2)

CORPUS = [
    "Review: a great movie, full of life and wit\nSentiment: positive",
    "Review: dull, boring and far too long\nSentiment: negative",
    "Post: the graphics card driver crashed again\nNewsgroup: comp.graphics",
    "Question: what is two plus two?\nAnswer: 4",
    "the quick brown fox jumps over the lazy dog while the cat sleeps",
] * 20


WORDS = ["great", "dull", "wit", "boring", "life", "long", "lazy", "quick"]
# 16 short sentiment rows the tiny encoder-decoder and encoder models train and score on
TOY_EXAMPLES = [Example({"text": f"a {w} movie {i % 3}"}, int(w in {"great", "wit", "life", "quick"}), None,
                        f"row {i}") for i, w in enumerate(WORDS * 2)]


def make_tokenizer(with_bos: bool = False) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained in memory: real tokenization behaviour, no files, no downloads."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if with_bos:
        from tokenizers.processors import TemplateProcessing

        tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


def make_backbone(arch: str = "llama", seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(with_bos=arch == "gemma3")
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=16))
    else:
        raise ValueError(arch)
    return CausalLM(model.float(), tokenizer, name=f"tiny-{arch}")


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def tiny_backbone(request) -> CausalLM:
    return make_backbone(request.param)


@pytest.fixture
def llama_backbone() -> CausalLM:
    return make_backbone("llama")


@pytest.fixture(scope="session")
def smollm2() -> CausalLM:
    from softprompt import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def packed_calls(monkeypatch) -> list:
    """Grows by one per call of `prompt_attention.packed_attention` (one layer's attention over a packed row)."""
    from softprompt import prompt_attention

    calls = []
    packed_attention = prompt_attention.packed_attention
    monkeypatch.setattr(prompt_attention, "packed_attention",
                        lambda *args, **kwargs: calls.append(1) or packed_attention(*args, **kwargs))
    return calls
