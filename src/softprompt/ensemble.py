"""Prompt ensembles (paper section 7.2): N prompts for one task scored in ONE batched pass over the frozen model
(a PromptBank gathers a prompt per row), combined by majority vote and by mean probability."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .backbone import Backbone
from .bank import PromptBank
from .data import Example
from .errors import SoftPromptError
from .evaluate import Prediction, classification_report
from .prompt import SoftPrompt


def require_shared_labels(labels: list[list[str] | None]) -> None:
    """Votes and mean probabilities are over labels: every prompt must classify into the same ones, in order."""
    distinct = {tuple(each or ()) for each in labels}
    if len(distinct) != 1 or not next(iter(distinct)):
        raise SoftPromptError(f"ensembled prompts must share labels (classifiers with the same labels in the same "
                              f"order); got {sorted(distinct)}")


@dataclass
class EnsembleAnswer:
    label: str  # majority vote; ties go to the label with the higher mean probability
    mean_label: str  # argmax of the mean probabilities
    scores: dict[str, float]  # mean probabilities
    votes: dict[str, int]


def ensemble(per_prompt: list[Prediction]) -> EnsembleAnswer:
    """Combine one input's predictions from several prompts of the same task."""
    labels = list(per_prompt[0].scores)
    require_shared_labels([list(p.scores) for p in per_prompt])
    mean = {label: sum(p.scores[label] for p in per_prompt) / len(per_prompt) for label in labels}
    votes = {label: sum(p.label == label for p in per_prompt) for label in labels}
    vote = max(labels, key=lambda label: (votes[label], mean[label]))
    return EnsembleAnswer(vote, max(labels, key=mean.get), mean, votes)


@dataclass
class EnsembleReport:
    n: int
    per_prompt: dict[str, float]  # accuracy of each prompt alone
    majority_vote: float
    mean_probability: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_ensemble(backbone: Backbone, prompts: dict[str, SoftPrompt], examples: list[Example],
                      batch_size: int = 32) -> EnsembleReport:
    """Accuracy of each prompt, of their majority vote and of their mean probabilities, in one pass per batch."""
    require_shared_labels([prompt.task.labels for prompt in prompts.values()])
    bank = PromptBank(backbone)
    for name, prompt in prompts.items():
        bank.add(name, prompt)
    names = list(prompts)
    fields = [{name: example.fields[name] for name in example.fields} for example in examples]
    requests = [(name, row) for row in fields for name in names]
    predictions: list[Prediction] = []
    per_batch = max(1, batch_size // len(names)) * len(names)  # keep an example's prompts in one batch
    for start in range(0, len(requests), per_batch):
        predictions += bank.classify(requests[start : start + per_batch])
    task = next(iter(prompts.values())).task
    gold = [example.label for example in examples]
    grouped = [predictions[i * len(names) : (i + 1) * len(names)] for i in range(len(examples))]
    per_prompt = {
        name: classification_report(task, gold, [task.labels.index(g[j].label) for g in grouped]).accuracy
        for j, name in enumerate(names)
    }
    answers = [ensemble(group) for group in grouped]
    vote = classification_report(task, gold, [task.labels.index(a.label) for a in answers]).accuracy
    mean = classification_report(task, gold, [task.labels.index(a.mean_label) for a in answers]).accuracy
    return EnsembleReport(len(examples), per_prompt, vote, mean)
