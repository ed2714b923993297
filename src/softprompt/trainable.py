"""What the optimizer trains when a prompt trains: the prompt tensor itself, or prefix-tuning's MLP
reparameterization of it, and `PromptTuning`, the training method built on them (train.py runs the loop).

Either way `module()` returns the tensor the backbone consumes ([K, d] input embeddings, or deep-prompt keys/values
[layers, 2, kv_heads, K, head_dim]), and only that tensor is saved: the MLP is a training device, not part of
the prompt (as in Li & Liang 2021, where it is dropped after training).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .backbone import Backbone, PromptCache
from .errors import SoftPromptError
from .initializers import initialize
from .prompt import SoftPrompt, prompt_cache, scoring_inputs
from .tasks import TaskSpec


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


class PromptTuning:
    """Methods "prompt" (the paper) and "prefix" (deep prompts): a prompt trains in front of the frozen model, and
    the best one becomes a SoftPrompt file. An encoder classifier's label head trains with it."""

    resumable = True

    def __init__(self, backbone: Backbone, task: TaskSpec, config):
        self.model, self.task, self.config = backbone, task, config
        if config.method == "prefix":
            backbone.require("deep_prompts", "deep prompts (--method prefix)")
        if config.prompt_length + 2 > backbone.max_positions:  # + BOS and at least one input token
            raise SoftPromptError(f"--prompt-length {config.prompt_length} does not fit {backbone.name!r}, which "
                                  f"takes {backbone.max_positions} positions in all, input included")
        embeddings = initialize(config.init, backbone, config.prompt_length, task, config.seed).to(backbone.device)
        initial = embeddings
        if config.method == "prefix":
            if config.activation_checkpointing:  # checkpointed layers drop a cache object, deep prompts' other way in
                backbone.require("plain_prompt_tensors", "--activation-checkpointing with --method prefix")
            initial = backbone.deep_prompt_from_embeddings(embeddings)
        self.trainable = trainable_prompt(initial, embeddings, config.reparameterize).to(backbone.device)
        if backbone.scores_with_label_head:  # saved as the prompt's label_head, checkpointed with what trains
            self.trainable.register_parameter("label_head", nn.Parameter(backbone.label_head(task).clone()))

    def parameters(self) -> list[Tensor]:
        return list(self.trainable.parameters())

    def inputs(self) -> dict:
        """`target_logprobs` keyword arguments under the prompt as it is now (with gradients)."""
        return scoring_inputs(self.model, self.config.method, self.trainable(), self._label_head())

    def current(self) -> dict[str, Tensor]:
        """The trained tensors as they are now, detached: what is kept when validation improves."""
        trained = {"prompt": materialize(self.trainable)}
        if self._label_head() is not None:
            trained["label_head"] = self._label_head().detach().clone()
        return trained

    def cache(self, trained: dict[str, Tensor]) -> PromptCache:
        return prompt_cache(self.model, self.config.method, trained["prompt"], trained.get("label_head"))

    def keep_best(self, trained: dict[str, Tensor], summary: dict) -> None:
        """Nothing to write until the end: the best prompt is a few KB, kept in memory (and in checkpoints)."""

    def result(self, best: dict[str, Tensor], summary: dict, out: Path) -> SoftPrompt:
        tensor = best["prompt"].cpu()
        head = best.get("label_head")
        summary = {**summary, "trainable_parameters": parameter_count(self.trainable)}
        return SoftPrompt(embeddings=tensor if self.config.method == "prompt" else None,
                          key_values=tensor if self.config.method == "prefix" else None,
                          label_head=None if head is None else head.cpu(), base_model=self.model.name,
                          fingerprint=self.model.fingerprint, task=self.task, init=self.config.init, training=summary)

    def _label_head(self) -> Tensor | None:
        return getattr(self.trainable, "label_head", None)
