"""How a causal LM runs one batch under prompts: the choice of forward route (`plan`) and each route.

Every route returns the same [B, T, d] hidden states of the right-padded token rows (tests check they agree on
log-probs and prompt gradients); they differ in how the prompt reaches attention:
- PACKED: prompts and tokens flattened into one row and run in one pass (training: the prompt changes every step).
- PLAIN: precomputed prompt keys/values handed to attention as plain tensors (prompt_attention.py).
- RAGGED: as PLAIN, with the rows' padding dropped before the linear layers (CPU, where padding costs compute).
- CACHE_OBJECT: precomputed keys/values in a transformers `DynamicCache`: any family, any sliding window.
- CONCAT: the reference: prompt embeddings concatenated in front of the token embeddings.
See docs/ARCHITECTURE.md for why each exists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from transformers import DynamicCache

from . import prompt_attention
from .backbone import PromptCache
from .errors import SoftPromptError
from .prompt_attention import gather_rows

if TYPE_CHECKING:  # for type hints only: causal.py imports this module
    from .causal import CausalLM


class Route(enum.Enum):
    PACKED = "packed"
    PLAIN = "plain"
    RAGGED = "ragged"
    CACHE_OBJECT = "cache object"
    CONCAT = "concat"


@dataclass(frozen=True)
class BatchFacts:
    """What the choice of route depends on, about one batch and the model running it."""

    prompts_to_run: bool  # prompt tensors given and no precomputed keys/values (training)
    prompt_slots: int  # BOS + prompt positions in front of every row (0: nothing in front)
    plain_tensors_fit: bool  # the family takes prompt keys/values as plain tensors for prompt_slots + tokens
    checkpointing: bool  # activation checkpointing is on (it drops a cache object)
    drops_padding: bool  # the model runs precomputed-prompt batches without their padding (CPU)
    rows_padded: bool  # some row of the batch is padded


def plan(facts: BatchFacts) -> Route:
    """The one place the forward route is chosen (`CausalLM.target_logprobs(route=...)` runs a given one instead:
    the concat reference, tests, benchmarks)."""
    if facts.prompts_to_run and facts.plain_tensors_fit:
        return Route.PACKED
    if facts.prompts_to_run and facts.checkpointing:
        return Route.CONCAT  # the cache-object route would run the tokens unchecked
    if not (facts.prompt_slots and facts.plain_tensors_fit):
        return Route.CACHE_OBJECT
    if facts.drops_padding and facts.rows_padded:
        return Route.RAGGED
    return Route.PLAIN


@dataclass
class Rows:
    """One batch's token rows and the prompt each row runs after."""

    input_ids: Tensor  # [B, T], right-padded
    mask: Tensor  # [B, T]
    prompt_index: Tensor  # [B]
    prompts: Tensor | None = None  # [P, K, d] prompt embeddings (PACKED, CONCAT, or to compute a cache from)
    cache: PromptCache | None = None  # precomputed keys/values

    def prompt_cache(self, lm: CausalLM) -> PromptCache:
        return self.cache if self.cache is not None else lm.prompt_cache(self.prompts)


def packed(lm: CausalLM, rows: Rows) -> Tensor:
    """Prompts and tokens in one flattened row; attention splits it per layer (no mask needed, see
    `prompt_attention.packed_attention`)."""
    count_rows, length = rows.input_ids.shape
    in_front = lm.prompt_embeddings(rows.prompts)
    count, width = in_front.shape[0], in_front.shape[1]
    # No views go into the compiled layers (the row is a cat, the index a copy): a view's base size becomes a
    # guard that the next call fails (another compile), e.g. the first layer's input vs every later layer's.
    embeds = torch.cat([in_front.view(1, -1, lm.d_model),
                        lm.embed(rows.input_ids).view(1, -1, lm.d_model).to(in_front.dtype)], dim=1)
    positions = torch.cat([torch.arange(width, device=lm.device).repeat(count),
                           torch.arange(width, width + length, device=lm.device).repeat(count_rows)])
    packing = prompt_attention.PackedPrompts(count, width, count_rows, length, rows.prompt_index.clone(),
                                             causal_lower_right(length, width + length))
    hidden = lm.run_decoder(inputs_embeds=embeds, position_ids=positions.unsqueeze(0),
                            attention_mask=prompt_attention.unused_mask(lm.device), packed_prompts=packing,
                            use_cache=False).last_hidden_state
    return hidden[0, count * width :].view(count_rows, length, -1)


def _plain_inputs(lm: CausalLM, cache: PromptCache, rows: Rows) -> dict:
    """Per-row prompt keys/values and, only where some prompt slot is padding, a mask; else lower-right causal."""
    length = rows.input_ids.shape[1]
    inputs = dict(prompt_kv_layers=[(gather_rows(k, rows.prompt_index), gather_rows(v, rows.prompt_index))
                                     for k, v in cache.layers], use_cache=False)
    if cache.padded:
        inputs.update(attention_mask=prompt_attention.prompt_causal_mask(
            gather_rows(cache.mask, rows.prompt_index), rows.mask))
    else:
        inputs.update(attention_mask=prompt_attention.unused_mask(lm.device),
                      token_bias=causal_lower_right(length, cache.width + length))
    return inputs


def _positions(lm: CausalLM, cache: PromptCache, rows: Rows) -> Tensor:
    """Each row's token positions: after its own prompt's slots."""
    return cache.lengths[rows.prompt_index].unsqueeze(1) + torch.arange(rows.input_ids.shape[1], device=lm.device)


def plain(lm: CausalLM, rows: Rows) -> Tensor:
    cache = rows.prompt_cache(lm)
    return lm.run_decoder(inputs_embeds=lm.embed(rows.input_ids), position_ids=_positions(lm, cache, rows),
                          **_plain_inputs(lm, cache, rows)).last_hidden_state


def ragged(lm: CausalLM, rows: Rows) -> Tensor:
    """The linear layers (most of the FLOPs) see only the real tokens, as one row; attention pads them again."""
    cache = rows.prompt_cache(lm)
    count, length = rows.input_ids.shape
    real = rows.mask.reshape(-1).nonzero().squeeze(1)
    hidden = lm.run_decoder(inputs_embeds=lm.embed(rows.input_ids.reshape(-1)[real]).unsqueeze(0),
                            position_ids=_positions(lm, cache, rows).reshape(-1)[real].unsqueeze(0),
                            ragged_rows=prompt_attention.RaggedRows(count, length, real),
                            **_plain_inputs(lm, cache, rows)).last_hidden_state[0]
    return hidden.new_zeros(count * length, hidden.shape[-1]).index_copy_(0, real, hidden).view(count, length, -1)


def cache_object(lm: CausalLM, rows: Rows) -> Tensor:
    cache = rows.prompt_cache(lm)
    layers = [(gather_rows(k, rows.prompt_index), gather_rows(v, rows.prompt_index)) for k, v in cache.layers]
    past = DynamicCache(ddp_cache_data=layers, config=lm.model.config) if layers else None
    return lm.run_decoder(inputs_embeds=lm.embed(rows.input_ids), position_ids=_positions(lm, cache, rows),
                          attention_mask=torch.cat([gather_rows(cache.mask, rows.prompt_index), rows.mask], dim=1),
                          past_key_values=past, use_cache=past is not None).last_hidden_state


def concat(lm: CausalLM, rows: Rows) -> Tensor:
    if rows.prompts is None and rows.cache is not None:
        raise SoftPromptError("the concat route puts prompt embeddings in front of the tokens; this batch has only "
                              "precomputed keys/values (a deep prompt, or a bank's cache)")
    count, length = rows.input_ids.shape
    in_front = lm.prompt_embeddings(rows.prompts)
    width = in_front.shape[1]
    embeds = torch.cat([in_front[rows.prompt_index], lm.embed(rows.input_ids)], dim=1)
    mask = torch.cat([rows.mask.new_ones(count, width), rows.mask], dim=1)
    positions = torch.arange(width + length, device=lm.device).unsqueeze(0).expand(count, -1)
    hidden = lm.run_decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    return hidden.last_hidden_state[:, width:]


RUN = {Route.PACKED: packed, Route.PLAIN: plain, Route.RAGGED: ragged, Route.CACHE_OBJECT: cache_object,
       Route.CONCAT: concat}
