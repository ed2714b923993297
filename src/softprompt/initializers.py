"""Prompt initializers (Lester et al. 2021, section 3.2): small functions returning a [K, d] tensor.

All read embeddings through the model's embedding module, so models that scale embeddings (Gemma) get prompts on
the same scale as real tokens.
"""

from __future__ import annotations

import torch

from .backbone import Backbone
from .errors import SoftPromptError
from .tasks import TaskSpec

FREQUENT_TOKENS = 5000  # the paper samples from the 5,000 most common tokens


def frequent_token_ids(backbone: Backbone, count: int = FREQUENT_TOKENS) -> torch.Tensor:
    """BPE vocabularies are ordered by merge rank, which tracks corpus frequency: take the first ids,
    skipping special tokens."""
    special = set(backbone.tokenizer.all_special_ids)
    ids = [i for i in range(min(backbone.vocab_size, count + len(special) + 256)) if i not in special]
    return torch.tensor(ids[:count], dtype=torch.long)


@torch.no_grad()
def sampled_vocab(backbone: Backbone, length: int, generator: torch.Generator) -> torch.Tensor:
    pool = frequent_token_ids(backbone)
    picks = pool[torch.randint(len(pool), (length,), generator=generator)]
    return backbone.embed(picks.to(backbone.device)).float().cpu()


@torch.no_grad()
def uniform(backbone: Backbone, length: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise scaled to the embedding matrix: same per-element RMS as real token embeddings (the paper's
    fixed [-0.5, 0.5] suits T5's scale, not models whose embeddings are ~0.1 per element)."""
    reference = backbone.embed(frequent_token_ids(backbone).to(backbone.device)).float()
    half_width = reference.pow(2).mean().sqrt().item() * 3**0.5
    return (torch.rand(length, backbone.d_model, generator=generator) * 2 - 1) * half_width


@torch.no_grad()
def class_label(backbone: Backbone, length: int, generator: torch.Generator, task: TaskSpec) -> torch.Tensor:
    """The label words' embeddings first (a multi-token word: mean of its tokens), the rest sampled vocab."""
    if not task.is_classification:
        return sampled_vocab(backbone, length, generator)
    words = []
    for word in task.verbalizer[:length]:
        ids = torch.tensor(backbone.tokenize(word), dtype=torch.long, device=backbone.device)
        words.append(backbone.embed(ids).float().mean(0).cpu())
    rest = sampled_vocab(backbone, length - len(words), generator)
    return torch.cat([torch.stack(words), rest]) if words else rest


@torch.no_grad()
def from_text(backbone: Backbone, length: int, text: str) -> torch.Tensor:
    """The embeddings of `text`'s tokens, repeated to fill the prompt or cut to its length."""
    ids = backbone.tokenize(text)
    if not ids:
        raise SoftPromptError(f"init text {text!r} has no tokens")
    ids = (ids * (length // len(ids) + 1))[:length]
    return backbone.embed(torch.tensor(ids, dtype=torch.long, device=backbone.device)).float().cpu()


INIT_NAMES = ["class-label", "vocab", "uniform", "text:..."]


def initialize(spec: str, backbone: Backbone, length: int, task: TaskSpec, seed: int) -> torch.Tensor:
    """`spec` is one of class-label, vocab, uniform, or text:<words>."""
    if length < 1:
        raise SoftPromptError(f"prompt length must be at least 1, got {length}")
    generator = torch.Generator().manual_seed(seed)
    if spec == "class-label":
        return class_label(backbone, length, generator, task)
    if spec == "vocab":
        return sampled_vocab(backbone, length, generator)
    if spec == "uniform":
        return uniform(backbone, length, generator)
    if spec.startswith("text:"):
        return from_text(backbone, length, spec[len("text:"):].strip().strip('"'))
    raise SoftPromptError(f"unknown init {spec!r}; choose one of {', '.join(INIT_NAMES)}")
