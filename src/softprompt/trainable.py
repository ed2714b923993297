"""What the optimizer trains: the prompt tensor itself, or prefix-tuning's MLP reparameterization of it.

Either way `module()` returns the tensor the backbone consumes ([K, d] input embeddings, or deep-prompt keys/values
[layers, 2, kv_heads, K, head_dim]), and only that tensor is saved: the MLP is a training device, not part of
the prompt (as in Li & Liang 2021, where it is dropped after training).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DirectPrompt(nn.Module):
    """The prompt tensor is the parameter (the paper's prompt tuning; plain deep prompts)."""

    def __init__(self, initial: Tensor):
        super().__init__()
        self.prompt = nn.Parameter(initial.clone())

    def forward(self) -> Tensor:
        return self.prompt


class PrefixMLP(nn.Module):
    """Deep prompt = start + MLP(E): E [K, d] trainable, a two-layer tanh MLP maps each row to that position's keys
    and values at every layer. The output layer starts at zero, so training starts exactly at `start` (the
    keys/values the --init prompt produces) and the MLP learns the offset; rows of E share the MLP, which couples
    positions and layers and steadies training (Li & Liang 2021)."""

    def __init__(self, start: Tensor, embeddings: Tensor, hidden: int):
        super().__init__()
        layers, two, kv_heads, length, head_dim = start.shape
        if embeddings.shape[0] != length:
            raise ValueError(f"embeddings have {embeddings.shape[0]} rows, the prefix has {length} positions")
        self.register_buffer("start", start.clone())
        self.embeddings = nn.Parameter(embeddings.clone())
        self.mlp = nn.Sequential(nn.Linear(embeddings.shape[1], hidden), nn.Tanh(),
                                 nn.Linear(hidden, layers * two * kv_heads * head_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self) -> Tensor:
        layers, two, kv_heads, length, head_dim = self.start.shape
        offset = self.mlp(self.embeddings).view(length, layers, two, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
        return self.start + offset


def trainable_prompt(initial: Tensor, embeddings: Tensor | None = None, reparameterize: int = 0) -> nn.Module:
    """`reparameterize` > 0 (deep prompts only): the MLP's hidden width; 0: train the tensor directly."""
    if reparameterize:
        return PrefixMLP(initial, embeddings, reparameterize)
    return DirectPrompt(initial)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def materialize(module: nn.Module) -> Tensor:
    with torch.no_grad():
        return module().detach().clone()
