"""Encoder-decoder models (T5 family): the prompt goes in front of the encoder input, the decoder scores labels.

A sibling of `causal.CausalLM` behind the same `Backbone` interface, so tasks, training, evaluation and prediction
work unchanged. What differs: the encoder attends both ways, so the prompt's states depend on the input and
nothing can be cached per prompt — `prompt_cache` just carries the prompt embeddings to `target_logprobs`, which
runs the encoder on [prompt; input; EOS] (T5's convention) and the decoder on [start; label tokens].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backbone import Backbone, PromptCache, TokenBatch, generation_rows, right_pad
from .errors import SoftPromptError


class EncoderDecoderLM(Backbone):
    """A frozen encoder-decoder LM (T5, Flan-T5, mT5, ...)."""

    kind = "an encoder-decoder LM"
    can_generate = True

    @property
    def encoder(self) -> torch.nn.Module:
        return self.model.get_encoder()

    def prompt_cache(self, prompts: Tensor | None, label_heads: Tensor | None = None) -> PromptCache:
        if label_heads is not None:
            raise SoftPromptError(f"{self.name!r} scores labels with its LM head; a label head is for encoders")
        return PromptCache.of_tensors(prompts, self.device)

    def target_logprobs(self, batch: TokenBatch, prompts: Tensor | None = None, prompt_index: Tensor | None = None,
                        cache: PromptCache | None = None) -> Tensor:
        """Log-prob of each target token, [N]. Each row of `batch` is input + label tokens (as for causal models):
        the input goes to the encoder, the targets become the decoder's sequence."""
        if cache is not None:
            prompts = torch.stack(cache.embeddings) if cache.embeddings is not None else None
        rows = batch.input_ids.shape[0]
        encoder_rows, decoder_rows = [], []
        for row in range(rows):
            mine = batch.target_rows == row
            positions, ids = batch.target_positions[mine], batch.target_ids[mine]
            order = positions.argsort()
            start = int(positions.min())  # the input's last position predicts the first target
            encoder_rows.append(batch.input_ids[row, : start + 1].tolist() + self.eos_ids)
            decoder_rows.append(ids[order].tolist())
        encoder_ids, encoder_mask = right_pad(encoder_rows, self.pad_id)
        start_id = self.model.config.decoder_start_token_id
        decoder_ids, decoder_mask = right_pad([[start_id] + ids[:-1] for ids in decoder_rows], self.pad_id)
        embeds = self.embed(encoder_ids.to(self.device))
        mask = encoder_mask.to(self.device)
        if prompts is not None and prompts.shape[1]:
            index = torch.zeros(rows, dtype=torch.long) if prompt_index is None else prompt_index.cpu()
            prompt_rows = prompts.to(embeds.dtype)[index.to(prompts.device)]
            embeds = torch.cat([prompt_rows, embeds], dim=1)
            mask = torch.cat([mask.new_ones(rows, prompts.shape[1]), mask], dim=1)
        with self.autocast():
            logits = self.model(inputs_embeds=embeds, attention_mask=mask,
                                decoder_input_ids=decoder_ids.to(self.device),
                                decoder_attention_mask=decoder_mask.to(self.device)).logits.float()
        # Targets in the order the batch lists them: row by row, by position within the row.
        picked = []
        for row, ids in enumerate(decoder_rows):
            logprobs = logits[row, : len(ids)].log_softmax(-1)
            picked.append(logprobs.gather(1, torch.tensor(ids, device=self.device).unsqueeze(1)).squeeze(1))
        by_row = torch.cat(picked)
        return by_row[_batch_order(batch)]

    def generate(self, rows: list[list[int]], cache: PromptCache, max_new_tokens: int | list[int],
                 stop_ids: set[int], prompt_index: list[int] | None = None) -> list[list[int]]:
        budgets, prompt_index = generation_rows(len(rows), max_new_tokens, prompt_index)
        return [self._generate_one(ids, cache, budget, stop_ids, index)
                for ids, budget, index in zip(rows, budgets, prompt_index)]

    @torch.no_grad()
    def _generate_one(self, ids: list[int], cache: PromptCache, max_new_tokens: int, stop_ids: set[int],
                      prompt: int = 0) -> list[int]:
        """Greedy decoding of one input with prompt number `prompt` of `cache` in front of the encoder input."""
        embeds = self.embed(torch.tensor([ids + self.eos_ids], device=self.device))
        if cache.embeddings is not None and cache.embeddings[prompt].shape[0]:
            embeds = torch.cat([cache.embeddings[prompt][None].to(embeds.dtype), embeds], dim=1)
        with self.autocast():
            encoded = self.encoder(inputs_embeds=embeds)
        generated: list[int] = []
        decoder = [self.model.config.decoder_start_token_id]
        for _ in range(max_new_tokens):
            with self.autocast():
                logits = self.model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([decoder],
                                                                                              device=self.device)).logits
            token = int(logits[0, -1].argmax())
            if token in stop_ids or token == self.tokenizer.eos_token_id:
                break
            generated.append(token)
            decoder.append(token)
        return generated


def _batch_order(batch: TokenBatch) -> Tensor:
    """Where each of the batch's targets sits in the row-by-row, position-sorted order used above."""
    order = torch.argsort(batch.target_rows * (batch.target_positions.max() + 1) + batch.target_positions, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return inverse
