"""Random-weight Llama shapes for the GPU benchmarks: speed does not depend on weight values, and real weights
cannot travel to the device machine (64 MiB per call). Shared by train_step.py and serve.py."""

from __future__ import annotations

from pathlib import Path

import torch

# Llama-3.2-shaped; "llama-tiny" only checks the plumbing on a CPU.
LLAMA_SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=128256),
    # llama-1b's depth and head layout at a width where compute is negligible: a step is all operator dispatch,
    # the host-side cost that bounds a GPU step (train_step.py's cpu-overhead-k20)
    "llama-1b-narrow": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=16, num_attention_heads=8,
                            num_key_value_heads=2, vocab_size=4096),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=4096),
}


def random_llama(shape: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, **overrides):
    """`overrides`: config fields to change, e.g. `num_hidden_layers=2` (bench/saved_activations.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA_SHAPES[shape], **overrides}, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def stub_tokenizer(vocab_size: int, words: list[str] = ()):
    """A word-level fast tokenizer with no BOS: real texts become one token per known word (else <unk>), so
    request lengths are realistic without any real vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3}
    for word in words:
        if len(vocabulary) >= vocab_size:
            break
        vocabulary.setdefault(word, len(vocabulary))
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def save_random_llama(directory: Path, shape: str, words: list[str]) -> Path:
    """A loadable model directory (`--model DIR`): random weights in the shape's size, a word-level tokenizer."""
    model = random_llama(shape)
    model.save_pretrained(directory)
    stub_tokenizer(model.config.vocab_size, words).save_pretrained(directory)
    return directory
