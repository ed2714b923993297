"""Scoring with a frozen model and (optionally) a soft prompt: rank classification, generation, metrics.

Rank classification: a label's score is the SUM of its verbalizer tokens' log-probs (no length normalisation, so
a longer label word must earn each extra token). Ties go to the label listed first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .backbone import Backbone, PromptCache, generation_rows
from .data import Example, TaskTokenizer, TokenizedExample, scoring_batch
from .prompt import SoftPrompt
from .tasks import TaskSpec


@dataclass
class Report:
    task: str
    n: int
    metric: str
    accuracy: float
    macro_f1: float | None = None
    labels: list[str] | None = None
    confusion: list[list[int]] | None = None  # confusion[gold][predicted]
    per_class: dict[str, dict] | None = None
    truncated: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def length_sorted_batches(items: list[TokenizedExample], batch_size: int) -> list[list[int]]:
    """Index batches of similar input length, so little compute is spent on padding."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def padding_bounded_batches(lengths: list[int], max_padding: float) -> list[list[int]]:
    """Index batches of similar length (sorted), each with at most `max_padding` of its positions padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches, current, total = [], [], 0
    for index in order:  # ascending, so the newcomer sets the batch's padded length
        if current and 1 - (total + lengths[index]) / (lengths[index] * (len(current) + 1)) > max_padding:
            batches.append(current)
            current, total = [], 0
        current.append(index)
        total += lengths[index]
    return batches + [current] if current else batches


@torch.inference_mode()
def label_scores(
    backbone: Backbone,
    task_tokenizer: TaskTokenizer,
    items: list[TokenizedExample],
    prompts: torch.Tensor | None = None,
    prompt_index: torch.Tensor | None = None,
    batch_size: int = 32,
    cache: PromptCache | None = None,
) -> torch.Tensor:
    """[n, num_labels] summed log-probs. `prompts` is [P, K, d] (or give their `cache`); `prompt_index` [n]
    picks one per item."""
    num_labels = len(task_tokenizer.label_ids)
    scores = torch.empty(len(items), num_labels)
    # The prompt's keys/values are the same for every item: compute them once for the whole run.
    cache = cache if cache is not None else backbone.prompt_cache(prompts)
    for indices in length_sorted_batches(items, batch_size):
        batch, groups, owners = scoring_batch([(task_tokenizer.label_ids, items[i]) for i in indices], backbone.pad_id)
        index = None if prompt_index is None else prompt_index[indices][owners]
        logprobs = backbone.target_logprobs(batch, prompt_index=index, cache=cache).cpu()
        scores[indices] = sum_label_tokens(logprobs, groups, len(indices), num_labels)
    return scores


def sum_label_tokens(logprobs: torch.Tensor, groups: torch.Tensor, items: int, num_labels: int) -> torch.Tensor:
    """[items, num_labels] label scores from per-token log-probs and their (item * num_labels + label) groups."""
    summed = logprobs.new_zeros(items * num_labels).index_add(0, groups.to(logprobs.device), logprobs)
    return summed.view(items, num_labels)


def classification_report(task: TaskSpec, gold: list[int], predicted: list[int], truncated: int = 0) -> Report:
    labels = task.labels
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    per_class, f1s = {}, []
    for i, label in enumerate(labels):
        correct = confusion[i][i]
        support = sum(confusion[i])
        predicted_count = sum(row[i] for row in confusion)
        precision = correct / predicted_count if predicted_count else 0.0
        recall = correct / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[label] = {"support": support, "predicted": predicted_count, "correct": correct,
                            "precision": precision, "recall": recall, "f1": f1}
    accuracy = sum(confusion[i][i] for i in range(len(labels))) / max(len(gold), 1)
    return Report(task.name, len(gold), "accuracy", accuracy, sum(f1s) / len(f1s), list(labels), confusion,
                  per_class, truncated)


def _tokenized(backbone: Backbone, prompt: SoftPrompt | None, task: TaskSpec, examples: list[Example],
               max_input_tokens: int) -> tuple[TaskTokenizer, list[TokenizedExample], PromptCache]:
    """What evaluate and predict share: the prompt checked against the model, the examples tokenized, the cache."""
    if prompt is not None:
        prompt.check_backbone(backbone)
    task_tokenizer = TaskTokenizer(backbone, task, max_input_tokens)
    return task_tokenizer, task_tokenizer.encode_all(examples), cache_of(backbone, prompt, task)


def evaluate(
    backbone: Backbone,
    examples: list[Example],
    prompt: SoftPrompt | None = None,
    task: TaskSpec | None = None,
    batch_size: int = 32,
    max_input_tokens: int = 256,
    max_new_tokens: int = 32,
) -> Report:
    """Accuracy (and macro-F1, confusion) of the prompt, or of the hand-written template alone without one."""
    task = task or prompt.task
    task_tokenizer, items, cache = _tokenized(backbone, prompt, task, examples, max_input_tokens)
    truncated = sum(item.truncated for item in items)
    if not task.is_classification:
        outputs = generate_texts(backbone, task_tokenizer, items, cache, max_new_tokens)
        matches = [out.strip() == ex.target.strip() for out, ex in zip(outputs, examples)]
        return Report(task.name, len(items), "exact_match", sum(matches) / len(matches), truncated=truncated)
    scores = label_scores(backbone, task_tokenizer, items, batch_size=batch_size, cache=cache)
    return classification_report(task, [item.label for item in items], scores.argmax(1).tolist(), truncated)


def generate(backbone: Backbone, task_tokenizer: TaskTokenizer, items: list[TokenizedExample],
             prompt: SoftPrompt | None, max_new_tokens: int) -> list[str]:
    """Greedy decoding; stops at EOS or a newline."""
    cache = cache_of(backbone, prompt, task_tokenizer.task)
    return generate_texts(backbone, task_tokenizer, items, cache, max_new_tokens)


@torch.no_grad()
def cache_of(backbone: Backbone, prompt: SoftPrompt | None, task: TaskSpec | None = None) -> PromptCache:
    """What runs start from: BOS alone for the hand-written template (an encoder classifier: its zero-shot label
    head for `task`), else BOS + the prompt."""
    if prompt is None:
        return backbone.zero_shot_cache(task)
    return prompt.cache(backbone)


def generate_texts(backbone: Backbone, task_tokenizer: TaskTokenizer, items: list[TokenizedExample],
                   cache: PromptCache, max_new_tokens: int | list[int], batch_size: int = 16,
                   prompt_index: list[int] | None = None) -> list[str]:
    """Greedy one-line answers, decoded in batches of similar input length. `max_new_tokens`: one budget for all
    items or one each; `prompt_index`: each item's prompt in `cache` (default the first)."""
    stop = set(backbone.eos_ids) | set(backbone.tokenizer.all_special_ids) | backbone.newline_ids
    budgets, prompt_index = generation_rows(len(items), max_new_tokens, prompt_index)
    texts = [""] * len(items)
    for indices in length_sorted_batches(items, batch_size):
        generated = backbone.generate([items[i].input_ids for i in indices], cache, [budgets[i] for i in indices],
                                      stop, [prompt_index[i] for i in indices])
        for index, ids in zip(indices, generated):
            texts[index] = backbone.tokenizer.decode(ids).split("\n")[0]
    return texts


@dataclass
class Prediction:
    label: str
    scores: dict[str, float]  # probability of each label (softmax over the label scores)

    @staticmethod
    def of_scores(labels: list[str], scores: torch.Tensor) -> Prediction:
        """The label with the highest score (ties: the first listed) and every label's softmax probability."""
        probabilities = scores.softmax(0)
        return Prediction(labels[int(probabilities.argmax())], {label: float(p) for label, p in
                                                                zip(labels, probabilities)})


def predict(backbone: Backbone, prompt: SoftPrompt | None, examples: list[Example], task: TaskSpec | None = None,
            batch_size: int = 32, max_input_tokens: int = 256) -> list[Prediction]:
    task = task or prompt.task
    task_tokenizer, items, cache = _tokenized(backbone, prompt, task, examples, max_input_tokens)
    if not task.is_classification:
        return [Prediction(text, {}) for text in generate_texts(backbone, task_tokenizer, items, cache, 64)]
    scores = label_scores(backbone, task_tokenizer, items, batch_size=batch_size, cache=cache)
    return [Prediction.of_scores(task.labels, row) for row in scores]
