"""Real model, real data: smollm2-135m on the Rotten Tomatoes sentences (slow; run in CI)."""

import pytest
import torch

from softprompt import SoftPrompt, evaluate, load_dataset, train
from softprompt.errors import SoftPromptError
from softprompt.train import TrainConfig

pytestmark = pytest.mark.slow


def test_real_model_is_frozen_and_embeds_through_module(smollm2):
    assert all(not p.requires_grad for p in smollm2.model.parameters())
    assert smollm2.d_model == 576 and smollm2.vocab_size == 49152


def test_short_training_beats_the_hand_written_prompt(smollm2, tmp_path):
    dataset = load_dataset("rotten-tomatoes")
    held_aside = dataset.test[:300]
    zero_shot = evaluate(smollm2, held_aside, task=dataset.task)
    config = TrainConfig(steps=60, eval_every=20, valid_limit=200, patience=0)
    result = train(smollm2, dataset.task, dataset.train, dataset.validation, tmp_path / "rt.safetensors", config,
                   show_progress=False)
    trained = evaluate(smollm2, held_aside, SoftPrompt.load(tmp_path / "rt.safetensors"))
    print(f"zero-shot {zero_shot.accuracy:.3f} -> trained {trained.accuracy:.3f} (best step {result.best_step})")
    assert trained.accuracy > zero_shot.accuracy


def test_prompt_refuses_a_different_model(smollm2):
    from conftest import make_backbone

    prompt = SoftPrompt(torch.zeros(2, smollm2.d_model), smollm2.name, smollm2.fingerprint,
                        load_dataset("rotten-tomatoes").task)
    other = make_backbone("llama")
    with pytest.raises(SoftPromptError, match="trained on 'smollm2-135m'.*'tiny-llama' has d=32"):
        prompt.check_backbone(other)
