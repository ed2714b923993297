"""Decoder-only language models (Llama, Qwen2, Gemma 3, ...): the kind prompts were made for.

Under a causal mask the prompt never sees the input, so its keys/values are computed once per distinct prompt and
reused (`prompt_cache`); deep prompts are such keys/values learned directly. How a batch runs is chosen by
`routes.plan` and carried out by one of the route functions in routes.py. The LM head is applied only at the
positions that predict a target token, never to [B, T, V].
"""

from __future__ import annotations

import contextlib
from functools import cached_property

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import lean_backward, prompt_attention, routes
from .backbone import COMPILE_MODES, Backbone, PromptCache, TokenBatch, generation_rows, right_pad
from .errors import SoftPromptError
from .prompt_attention import gather_rows


class CausalLM(Backbone):
    """A frozen decoder-only LM plus its tokenizer."""

    kind = "a causal LM"
    can_cache_prompts = True
    can_concat_prompts = True
    can_run_deep_prompts = True
    can_generate = True
    can_mix_prompts = True

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 precision: str = "fp32"):
        super().__init__(model, tokenizer, name, precision)
        self.body = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.logit_softcap = getattr(model.config, "final_logit_softcapping", None)
        self.bos_ids = self._leading_special_ids()
        # Prompt keys/values as plain tensors in attention (compilable, no cache object) where the family allows.
        self.takes_plain_prompt_tensors = prompt_attention.supports(model)
        self.compiled = False  # see compile()
        # On a CPU a padded position costs what a real token costs, so precomputed-prompt batches drop it (RAGGED);
        # GPUs keep padded batches, where dropping adds kernel launches (docs/benchmarks.md, "padding").
        self.drops_padding = self.takes_plain_prompt_tensors and self.device.type == "cpu"
        if self.takes_plain_prompt_tensors:
            prompt_attention.enable(model)
        lean_backward.install(model)  # fewer activations kept for the backward pass, same values

    def _leading_special_ids(self) -> list[int]:
        """The BOS the tokenizer would add (Gemma, Llama-2 style); the prompt goes after it."""
        with_special = self.tokenizer("a")["input_ids"]
        without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        return with_special[: len(with_special) - len(without)] if with_special[-len(without) :] == without else []

    # ---- running the decoder stack ----

    def compile(self, mode: str | None = None) -> None:
        """torch.compile each decoder layer in place (regional compilation, dynamic shapes). The layers are alike,
        so they share one compiled graph: compiling takes about as long for 30 layers as for one. Only the packed
        training pass runs compiled (`run_decoder`). `mode`: torch.compile's, e.g. "reduce-overhead" (CUDA
        graphs: fewer kernel launches from the host)."""
        if mode not in COMPILE_MODES:
            raise SoftPromptError(f"unknown compile mode {mode!r}; choose one of "
                                  f"{', '.join(name for name in COMPILE_MODES if name)}")
        self.require("plain_prompt_tensors", "--compile")
        if self.compiled:
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        # inductor decides what the backward keeps (and recomputes elementwise chains) on its own; the lean
        # autograd functions would only split each layer's graph
        lean_backward.remove(self.model)
        for layer in self.body.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.compile(dynamic=True, mode=mode)
        self.compiled = True

    def run_decoder(self, **inputs) -> BaseModelOutputWithPast:
        """The decoder stack under autocast. Compiled layers serve the packed pass only: the other passes index
        per-layer state (a cache object, a layer's prompt keys/values) that would make every layer a recompile.
        A pass with a cache object runs without activation checkpointing, which would drop the cache."""
        eager = self.compiled and "packed_prompts" not in inputs
        uses_cache = inputs.get("use_cache") or inputs.get("past_key_values") is not None
        with (self.autocast(), torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext(),
              self._layers_training(False) if uses_cache else contextlib.nullcontext()):
            return self.body(**inputs)

    # ---- prompts ----

    def prompt_embeddings(self, prompts: Tensor | None) -> Tensor:
        """[P, L, d]: BOS (if the tokenizer uses one) followed by each prompt; L may be 0."""
        bos = self.embed(torch.tensor([self.bos_ids], dtype=torch.long, device=self.device))
        if prompts is None:
            return bos
        prompts = prompts.to(bos.dtype)
        return torch.cat([bos.expand(prompts.shape[0], -1, -1), prompts], dim=1)

    def prompt_cache(self, prompts: Tensor | None, label_heads: Tensor | None = None) -> PromptCache:
        """Keys/values of BOS + each prompt, computed once: reusable for every example with that prompt."""
        if label_heads is not None:
            raise SoftPromptError(f"{self.name!r} scores labels with its LM head; a label head is for encoders")
        in_front = self.prompt_embeddings(prompts)
        count, length = in_front.shape[0], in_front.shape[1]
        mask = torch.ones(count, length, dtype=torch.long, device=self.device)
        lengths = torch.full((count,), length, dtype=torch.long, device=self.device)
        if length == 0:
            return PromptCache([], mask, lengths)
        positions = torch.arange(length, device=self.device).unsqueeze(0).expand(count, -1)
        output = self.run_decoder(inputs_embeds=in_front, position_ids=positions, use_cache=True)
        return PromptCache([(layer.keys, layer.values) for layer in output.past_key_values.layers], mask, lengths)

    def deep_prompt_cache(self, key_values: Tensor) -> PromptCache:
        """A PromptCache from learned per-layer keys/values [P, layers, 2, kv_heads, K, head_dim] (deep prompts),
        after BOS's own keys/values when the tokenizer uses a BOS."""
        count, length = key_values.shape[0], key_values.shape[4]
        bos = self.prompt_cache(None)
        layers = []
        for index in range(key_values.shape[1]):
            keys, values = key_values[:, index, 0], key_values[:, index, 1]
            if bos.width:
                bos_keys, bos_values = bos.layers[index]
                keys = torch.cat([bos_keys.expand(count, -1, -1, -1).to(keys.dtype), keys], dim=2)
                values = torch.cat([bos_values.expand(count, -1, -1, -1).to(values.dtype), values], dim=2)
            layers.append((keys, values))
        width = bos.width + length
        mask = torch.ones(count, width, dtype=torch.long, device=self.device)
        return PromptCache(layers, mask, torch.full((count,), width, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def deep_prompt_from_embeddings(self, embeddings: Tensor) -> Tensor:
        """[layers, 2, kv_heads, K, head_dim]: the keys/values an input-embedding prompt [K, d] produces at every
        layer, so a deep prompt starts exactly where the shallow one would."""
        cache = self.prompt_cache(embeddings.to(self.device).unsqueeze(0))
        skip = len(self.bos_ids)
        return torch.stack([torch.stack([k[0, :, skip:], v[0, :, skip:]]) for k, v in cache.layers]).float()

    def deep_prompt_shape(self, length: int) -> list[int]:
        """[layers, 2, kv_heads, K, head_dim] of a deep prompt of `length` positions for this model."""
        layers, two, kv_heads, _, head_dim = self._one_position_deep_prompt_shape
        return [layers, two, kv_heads, length, head_dim]

    @cached_property
    def _one_position_deep_prompt_shape(self) -> tuple[int, ...]:
        return tuple(self.deep_prompt_from_embeddings(torch.zeros(1, self.d_model)).shape)

    # ---- scoring and generation ----

    def target_logprobs(self, batch: TokenBatch, prompts: Tensor | None = None, prompt_index: Tensor | None = None,
                        cache: PromptCache | None = None, route: routes.Route | None = None) -> Tensor:
        """Log-prob of each target token, [N]. `prompts` is [P, K, d]; `prompt_index` [B] picks one per row;
        `cache`: keys/values computed earlier (`prompt_cache`, a PromptBank) instead of `prompts`. `route`: run
        this route instead of the planned one (`Route.CONCAT`: the reference; tests and benchmarks: any)."""
        input_ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        if prompt_index is None:
            prompt_index = torch.zeros(input_ids.shape[0], dtype=torch.long)
        rows = routes.Rows(input_ids, mask, prompt_index.to(self.device), prompts, cache)
        hidden = routes.RUN[route or routes.plan(self.batch_facts(rows))](self, rows)
        selected = hidden[batch.target_rows.to(self.device), batch.target_positions.to(self.device)]
        with self.autocast():
            logits = self.lm_head(selected).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.log_softmax(-1).gather(1, batch.target_ids.to(self.device).unsqueeze(1)).squeeze(1)

    def batch_facts(self, rows: routes.Rows) -> routes.BatchFacts:
        """What `routes.plan` needs to know about this batch on this model."""
        if rows.cache is not None:
            slots = rows.cache.width
        else:
            slots = len(self.bos_ids) + (rows.prompts.shape[1] if rows.prompts is not None else 0)
        return routes.BatchFacts(
            prompts_to_run=rows.cache is None and rows.prompts is not None, prompt_slots=slots,
            plain_tensors_fit=self.takes_plain_prompt_tensors and self.fits_window(slots + rows.input_ids.shape[1]),
            checkpointing=bool(self.checkpointed_layers), drops_padding=self.drops_padding,
            rows_padded=self.drops_padding and not bool(rows.mask.all()))  # a host sync: only where it matters

    def fits_window(self, total_length: int) -> bool:
        """Everything fits a sliding window (if any): prompt masks and stacked caches are exact only then."""
        return prompt_attention.fits(self.model, total_length)

    @torch.no_grad()
    def generate(self, rows: list[list[int]], cache: PromptCache, max_new_tokens: int | list[int],
                 stop_ids: set[int], prompt_index: list[int] | None = None) -> list[list[int]]:
        """Greedy decoding of several rows as one batch, each after its prompt in `cache` (`prompt_index`, default
        the first), for at most its own `max_new_tokens`; each row stops at any of `stop_ids`. Rows are
        right-padded and prompts left-padded: the mask hides the padding from every later token and each row's
        positions count its own real slots and tokens, so a row decodes as it would alone."""
        budgets, prompt_index = generation_rows(len(rows), max_new_tokens, prompt_index)
        if len(rows) > 1 and not self.fits_window(cache.width + max(map(len, rows)) + max(budgets)):
            # a sliding window counts cache slots, padding included: rows that outgrow it decode alone, exactly
            return [self.generate([row], cache, [budget], stop_ids, [index])[0]
                    for row, budget, index in zip(rows, budgets, prompt_index)]
        ids, token_mask = (tensor.to(self.device) for tensor in right_pad(rows, self.pad_id))
        prompts = torch.tensor(prompt_index, device=self.device)
        past = DynamicCache(ddp_cache_data=[(gather_rows(k, prompts), gather_rows(v, prompts))
                                            for k, v in cache.layers] or None, config=self.model.config)
        mask = torch.cat([gather_rows(cache.mask, prompts), token_mask], dim=1)
        start, lengths = cache.lengths.to(self.device)[prompts], token_mask.sum(1)  # tokens start after the prompt
        positions = start.unsqueeze(1) + torch.arange(ids.shape[1], device=self.device)
        hidden = self.run_decoder(inputs_embeds=self.embed(ids), attention_mask=mask, position_ids=positions,
                                  past_key_values=past, use_cache=True).last_hidden_state
        last = hidden[torch.arange(len(rows), device=self.device), lengths - 1]
        return self._decode(last, past, mask, start + lengths, budgets, stop_ids)

    def _decode(self, last: Tensor, past: DynamicCache, mask: Tensor, next_positions: Tensor, budgets: list[int],
                stop_ids: set[int]) -> list[list[int]]:
        """The greedy loop after the rows' first pass: `last` [rows, d] hidden states predict each next token."""
        generated: list[list[int]] = [[] for _ in budgets]
        running = {row for row, budget in enumerate(budgets) if budget > 0}
        for step in range(max(budgets)):
            with self.autocast():
                tokens = self.lm_head(last).argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                if row in running:
                    if token in stop_ids:
                        running.discard(row)
                    else:
                        generated[row].append(token)
                        if len(generated[row]) == budgets[row]:
                            running.discard(row)
            if not running:
                break
            mask = torch.cat([mask, mask.new_ones(len(budgets), 1)], dim=1)  # finished rows run on, unread
            hidden = self.run_decoder(inputs_embeds=self.embed(tokens.unsqueeze(1)), attention_mask=mask,
                                      position_ids=(next_positions + step).unsqueeze(1),
                                      past_key_values=past, use_cache=True).last_hidden_state
            last = hidden[:, -1]
        return generated
