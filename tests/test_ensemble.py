import pytest
import torch

from softprompt.data import Example
from softprompt.ensemble import evaluate_ensemble
from softprompt.errors import SoftPromptError
from softprompt.evaluate import evaluate
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec

TASK = TaskSpec(name="s", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
EXAMPLES = [Example({"text": t}, i % 2, None, "r") for i, t in
            enumerate(["great", "dull", "wit", "long", "a lazy dog", "the quick fox", "boring", "life"])]


def prompts(backbone, count):
    torch.manual_seed(0)
    return {f"p{i}": SoftPrompt(torch.randn(3 + i, backbone.d_model) * 2, backbone.name, backbone.fingerprint,
                                TASK) for i in range(count)}


def test_per_prompt_accuracy_matches_evaluating_each_alone(llama_backbone):
    bank_prompts = prompts(llama_backbone, 3)
    report = evaluate_ensemble(llama_backbone, bank_prompts, EXAMPLES, batch_size=6)
    for name, prompt in bank_prompts.items():
        assert report.per_prompt[name] == evaluate(llama_backbone, EXAMPLES, prompt).accuracy
    assert report.n == len(EXAMPLES) and 0 <= report.majority_vote <= 1 and 0 <= report.mean_probability <= 1


def test_one_prompt_ensemble_is_the_prompt(llama_backbone):
    single = prompts(llama_backbone, 1)
    report = evaluate_ensemble(llama_backbone, single, EXAMPLES)
    assert report.majority_vote == report.mean_probability == report.per_prompt["p0"]


def test_prompts_must_share_labels(llama_backbone):
    mixed = prompts(llama_backbone, 2)
    mixed["p1"].task = TaskSpec(template="{text}", labels=["a", "b", "c"])
    with pytest.raises(SoftPromptError, match="same labels"):
        evaluate_ensemble(llama_backbone, mixed, EXAMPLES)
