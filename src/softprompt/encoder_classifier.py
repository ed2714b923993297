"""Encoder-only models (BERT family, e.g. all-MiniLM-L6-v2): prompt tuning for classification with a label head.

An encoder has no language-model head to score label words, so each task gets a small label head: one learned
vector per label, scored against the mean-pooled, L2-normalised output (a scaled cosine classifier). The head
trains with the prompt and is saved in the same prompt file (`SoftPrompt.label_head`). It starts at the pooled
embeddings of the verbalizer texts, so with no prompt the model is a zero-shot similarity classifier between input
and label words: the encoder's "hand-written prompt" baseline. The input is [CLS] prompt input [SEP]; the encoder
attends both ways, so prompts are not cached (the PromptCache carries prompt and head tensors as they are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbone import Backbone, PromptCache, TokenBatch, right_pad
from .errors import SoftPromptError
from .tasks import TaskSpec

HEAD_SCALE = 20.0  # cosine logits lie in [-1, 1]: too flat for a softmax (the usual contrastive temperature 0.05)


class EncoderClassifier(Backbone):
    """A frozen bidirectional encoder plus its tokenizer; classification tasks only, labels scored by a head."""

    kind = "an encoder classifier"
    can_mix_prompts = True
    scores_with_label_head = True

    def prompt_cache(self, prompts: Tensor | None, label_heads: Tensor | None = None) -> PromptCache:
        return PromptCache.of_tensors(prompts, self.device, label_heads)

    def pooled(self, ids: list[list[int]], prompt: Tensor | None = None) -> Tensor:
        """Mean-pooled, L2-normalised outputs of [CLS] prompt ids [SEP] for each row of `ids`, [rows, d]."""
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        rows = [[cls_id] + row + [sep_id] for row in ids]
        input_ids, mask = (tensor.to(self.device) for tensor in right_pad(rows, self.pad_id))
        embeds = self.embed(input_ids)
        if prompt is not None and prompt.shape[0]:  # after [CLS], as the prompt goes after BOS in causal models
            prompt = prompt.to(embeds.dtype).unsqueeze(0).expand(len(rows), -1, -1)
            embeds = torch.cat([embeds[:, :1], prompt, embeds[:, 1:]], dim=1)
            mask = torch.cat([mask[:, :1], mask.new_ones(len(rows), prompt.shape[1]), mask[:, 1:]], dim=1)
        with self.autocast():
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    @torch.no_grad()
    def label_head(self, task: TaskSpec) -> Tensor:
        """[L, d] starting head: the pooled embedding of each verbalizer text."""
        if not task.is_classification:
            raise SoftPromptError(f"task {task.name!r} generates text; an encoder classifier can only classify")
        return self.pooled([self.tokenize(word.strip()) for word in task.verbalizer])

    def zero_shot_cache(self, task: TaskSpec) -> PromptCache:
        """No prompt vectors, just the starting head."""
        return self.prompt_cache(None, self.label_head(task).unsqueeze(0))

    def target_logprobs(self, batch: TokenBatch, prompts: Tensor | None = None, prompt_index: Tensor | None = None,
                        cache: PromptCache | None = None) -> Tensor:
        """Log-prob of each target label, [N]: targets are (row, last input position, label index)."""
        if cache is None or cache.label_heads is None:
            raise SoftPromptError("an encoder classifier scores labels with a head: give a prompt trained for it "
                                  "(or its zero-shot start, EncoderClassifier.zero_shot_cache)")
        prompts = cache.embeddings if cache.embeddings is not None else [None] * len(cache.label_heads)
        rows = batch.input_ids.shape[0]
        index = torch.zeros(rows, dtype=torch.long) if prompt_index is None else prompt_index.cpu()
        lengths = batch.attention_mask.sum(1).tolist()
        row_logprobs: list[Tensor | None] = [None] * rows
        for prompt_number in index.unique().tolist():  # rows sharing a prompt (and head) run together
            members = (index == prompt_number).nonzero().squeeze(1).tolist()
            prompt = prompts[prompt_number]
            pooled = self.pooled([batch.input_ids[r, : lengths[r]].tolist() for r in members],
                                 None if prompt is None else prompt.to(self.device))
            head = cache.label_heads[prompt_number].to(self.device)
            logprobs = (HEAD_SCALE * pooled @ head.float().T).log_softmax(-1)
            for position, row in enumerate(members):
                row_logprobs[row] = logprobs[position]
        return torch.stack([row_logprobs[int(r)][int(t)] for r, t in zip(batch.target_rows, batch.target_ids)])
