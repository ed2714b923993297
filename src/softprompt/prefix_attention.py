"""Prompt keys/values as plain tensors inside attention, instead of a transformers `DynamicCache`.

The cached path (backbone.py) used to hand each layer its prompt keys/values through a `DynamicCache`. That works
everywhere, but the cache object is hostile to `torch.compile` (its per-layer state becomes a guard that differs
per layer, so dynamo recompiles and gives up), and transformers rebuilds a mask around the past for every call.
Here the keys/values travel as a keyword argument (`prefix_key_values`, one (keys, values) pair per layer) that
transformers forwards to the attention function, which puts them in front of the tokens' own keys/values and runs
the usual SDPA; the mask (prompt slots, then causal over the real tokens) is built once per batch.

It is used for the model families whose attention layers are known to forward keyword arguments and that run
SDPA (`supports`); everything else keeps the `DynamicCache` path, which gives the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "softprompt_sdpa"
# Decoder families checked (tests/test_backbone.py) to pass extra keyword arguments down to the attention function.
MODEL_TYPES = {"llama", "qwen2", "gemma3_text"}


def prefix_sdpa_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, prefix_key_values: list[tuple[Tensor, Tensor]] | None = None,
                          **kwargs) -> tuple[Tensor, None]:
    """SDPA with this layer's prompt keys/values [B, kv_heads, W, head_dim] in front of the tokens' own."""
    if prefix_key_values is not None:
        prefix_keys, prefix_values = prefix_key_values[module.layer_idx]
        key = torch.cat([prefix_keys.to(key.dtype), key], dim=2)
        value = torch.cat([prefix_values.to(value.dtype), value], dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, prefix_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # without a prefix it is plain SDPA, masks included


def supports(model: PreTrainedModel) -> bool:
    return model.config.model_type in MODEL_TYPES and model.config._attn_implementation == "sdpa"


def enable(model: PreTrainedModel) -> None:
    """Route the model's attention through `prefix_sdpa_attention` (identical to SDPA when no prefix is given)."""
    model.set_attn_implementation(NAME)


def fits(model: PreTrainedModel, total_length: int) -> bool:
    """The prefix mask is a full causal mask: exact for sliding-window layers only while everything fits the window."""
    window = getattr(model.config, "sliding_window", None)
    return window is None or total_length <= window


def prefix_causal_mask(prefix_mask: Tensor, token_mask: Tensor) -> Tensor:
    """[B, 1, T, W + T] bool, True where a query may look: its prompt's real slots, then the real tokens up to
    itself. `prefix_mask` [B, W] (per row, already gathered), `token_mask` [B, T] (right padding)."""
    length = token_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=token_mask.device).tril()
    tokens = causal.unsqueeze(0) & token_mask.bool().unsqueeze(1)
    prompt = prefix_mask.bool().unsqueeze(1).expand(-1, length, -1)
    return torch.cat([prompt, tokens], dim=2).unsqueeze(1)
