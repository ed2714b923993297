"""Prompt keys/values as plain tensors inside attention, instead of a transformers `DynamicCache`.

A transformers `DynamicCache` can hand each layer its prompt keys/values too (routes.py, CACHE_OBJECT), and works
everywhere, but the cache object is hostile to `torch.compile` (its per-layer state becomes a guard that differs
per layer, so dynamo recompiles and gives up), and transformers rebuilds a mask around the past for every call.
Here the keys/values travel as a keyword argument (`prompt_kv_layers`, one (keys, values) pair per layer) that
transformers forwards to the attention function, which puts them in front of the tokens' own keys/values and runs
the usual SDPA. When every prompt slot is real, that attention is plain causal aligned to the lower right (each
token sees its whole prompt, then the tokens up to itself; right padding is never seen by a real token), which
SDPA runs with no mask tensor (`lower_right_attention`); prompts padded to a common width get an explicit mask
(`prompt_causal_mask`), built once per batch.

In training the prompt changes every step, so its keys/values must be recomputed each step. Instead of a separate
batch-1 pass for them (which doubles the kernel launches that bound a GPU step), `PackedPrompts` runs prompts and
tokens in ONE pass: both are flattened into a single row (prompt rows, then the right-padded token rows), every
linear layer sees exactly those positions, and the attention function splits the row again: the prompts attend
causally to themselves, each token row to its prompt's keys/values of the same layer and then causally to itself.

On a CPU, where a padded position costs what a real token costs, batches with precomputed prompt keys/values run
without their padding (`RaggedRows`): the real tokens of all rows form one row, so every linear layer skips the
padding, and attention alone puts them back into the padded [rows, length] grid (a few copies per layer).

It is used for the model families whose attention layers are known to forward keyword arguments and that run
SDPA (`supports`); everything else keeps the `DynamicCache` path, which gives the same numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "softprompt_sdpa"
# Decoder families checked (tests/test_backbone.py) to pass extra keyword arguments down to the attention function.
MODEL_TYPES = {"llama", "qwen2", "gemma3_text"}


@functools.cache
def unused_mask(device: torch.device) -> Tensor:
    """Any 4-D mask makes transformers' mask builders hand it over untouched; a packed row brings its own masks
    instead. On the model's device, so a compiled (or CUDA-graphed) layer sees no CPU tensor."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


@dataclass
class PackedPrompts:
    """How one flattened row splits: `count` prompts of `width` positions, then `rows` token rows of `length`."""

    count: int
    width: int
    rows: int
    length: int
    prompt_index: Tensor  # [rows]: the prompt each token row uses
    token_bias: CausalBias  # lower-right causal over width + length keys (built outside compiled code)


@dataclass
class RaggedRows:
    """Token rows run without their padding: the caller flattens the real tokens of `rows` right-padded rows of
    `length` into one row of N, and `index` [N] gives each one's place in the padded [rows * length] grid."""

    rows: int
    length: int
    index: Tensor

    def pad(self, tensor: Tensor) -> Tensor:
        """[1, heads, N, dim] -> [rows, heads, length, dim], zeros where the padding was."""
        heads, dim = tensor.shape[1], tensor.shape[3]
        index = self.index.to(tensor.device)  # with a device_map, layers live on several devices
        grid = tensor.new_zeros(heads, self.rows * self.length, dim).index_copy_(1, index, tensor[0])
        return grid.view(heads, self.rows, self.length, dim).transpose(0, 1)

    def unpad(self, tensor: Tensor) -> Tensor:
        """[rows, length, heads, dim] -> [1, N, heads, dim]."""
        return tensor.flatten(0, 1).index_select(0, self.index.to(tensor.device)).unsqueeze(0)


def gather_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor[index] along dim 0; a single prompt is broadcast with expand, whose backward is a cheap sum
    (advanced indexing backward is an accumulating scatter, slow on GPUs)."""
    if tensor.shape[0] == 1:
        return tensor.expand(index.shape[0], *tensor.shape[1:])
    return tensor.index_select(0, index.to(tensor.device))  # with a device_map, layers live on several devices


def lower_right_attention(query: Tensor, key: Tensor, value: Tensor, bias: CausalBias, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs) -> Tensor:
    """[B, T, heads, dim]: each token sees its whole prompt, then the tokens up to itself (causal aligned to the
    lower right of [T, W + T]). SDPA runs it without a materialized mask (a flash kernel on CUDA) and without
    repeating grouped key/value heads. Right padding needs no mask: a real token never looks past itself, and no
    real token reads a padded one."""
    if kwargs.get("softcap") is not None:
        raise ValueError("SDPA does not support attention logit soft-capping")
    # A CausalBias takes SDPA's call before autocast does, so cast as autocast would: to the projections' dtype
    # (rotary embedding leaves queries and keys in fp32 under autocast).
    query, key = query.to(value.dtype), key.to(value.dtype)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                            scale=scaling, enable_gqa=True).transpose(1, 2)


def packed_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, packed: PackedPrompts,
                     **kwargs) -> tuple[Tensor, None]:
    """Attention over one flattened row [1, heads, N, head_dim] holding prompts and token rows (`PackedPrompts`)."""
    boundary = packed.count * packed.width

    def split(tensor: Tensor) -> tuple[Tensor, Tensor]:  # [count, heads, width, dim], [rows, heads, length, dim]
        # squeeze + split, not indexing: their backward is a view and one cat, where an index's backward fills a
        # zero tensor of the whole row and copies into it, per tensor and layer
        prompts, tokens = tensor.squeeze(0).split([boundary, tensor.shape[2] - boundary], dim=1)
        return (prompts.unflatten(1, (packed.count, packed.width)).transpose(0, 1),
                tokens.unflatten(1, (packed.rows, packed.length)).transpose(0, 1))

    (prompt_query, token_query), (prompt_key, token_key), (prompt_value, token_value) = map(split, (query, key, value))
    prompt_out, _ = sdpa_attention_forward(module, prompt_query, prompt_key, prompt_value, None, **kwargs)
    token_key = torch.cat([gather_rows(prompt_key, packed.prompt_index), token_key], dim=2)
    token_value = torch.cat([gather_rows(prompt_value, packed.prompt_index), token_value], dim=2)
    token_out = lower_right_attention(token_query, token_key, token_value, packed.token_bias, **kwargs)
    # [rows, length, heads, dim] each -> the one flattened row the caller expects
    return torch.cat([prompt_out.flatten(0, 1), token_out.flatten(0, 1)]).unsqueeze(0), None


def prompt_sdpa_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, prompt_kv_layers: list[tuple[Tensor, Tensor]] | None = None,
                          packed_prompts: PackedPrompts | None = None, token_bias: CausalBias | None = None,
                          ragged_rows: RaggedRows | None = None, **kwargs) -> tuple[Tensor, None]:
    """SDPA with this layer's prompt keys/values [B, kv_heads, W, head_dim] in front of the tokens' own, or, for a
    packed row, computed in this same layer from the prompt positions of the row. `token_bias` (no prompt slot is
    padding): lower-right causal attention instead of `attention_mask`. `ragged_rows`: the tokens came as one row
    without padding; attention alone runs them padded again (the linear layers never see the padding)."""
    if packed_prompts is not None:
        return packed_attention(module, query, key, value, packed_prompts, **kwargs)
    if ragged_rows is not None:
        query, key, value = map(ragged_rows.pad, (query, key, value))
        output, _ = prompt_sdpa_attention(module, query, key, value, attention_mask, prompt_kv_layers,
                                          token_bias=token_bias, **kwargs)
        return ragged_rows.unpad(output), None
    if prompt_kv_layers is not None:
        prompt_keys, prompt_values = prompt_kv_layers[module.layer_idx]
        key = torch.cat([prompt_keys.to(key.dtype), key], dim=2)
        value = torch.cat([prompt_values.to(value.dtype), value], dim=2)
        if token_bias is not None:
            return lower_right_attention(query, key, value, token_bias, **kwargs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, prompt_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # without prompt keys/values it is plain SDPA, masks included


def supports(model: PreTrainedModel) -> bool:
    return model.config.model_type in MODEL_TYPES and model.config._attn_implementation == "sdpa"


def enable(model: PreTrainedModel) -> None:
    """Route the model's attention through `prompt_sdpa_attention` (identical to SDPA without prompt keys/values)."""
    model.set_attn_implementation(NAME)


def fits(model: PreTrainedModel, total_length: int) -> bool:
    """The prompt mask is a full causal mask: exact for sliding-window layers only while everything fits the window."""
    window = getattr(model.config, "sliding_window", None)
    return window is None or total_length <= window


def prompt_causal_mask(prompt_mask: Tensor, token_mask: Tensor) -> Tensor:
    """[B, 1, T, W + T] bool, True where a query may look: its prompt's real slots, then the real tokens up to
    itself. `prompt_mask` [B, W] (per row, already gathered), `token_mask` [B, T] (right padding)."""
    length = token_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=token_mask.device).tril()
    tokens = causal.unsqueeze(0) & token_mask.bool().unsqueeze(1)
    prompt = prompt_mask.bool().unsqueeze(1).expand(-1, length, -1)
    return torch.cat([prompt, tokens], dim=2).unsqueeze(1)
