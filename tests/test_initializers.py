import pytest
import torch

from softprompt.errors import SoftPromptError
from softprompt.initializers import FREQUENT_TOKENS, frequent_token_ids, initialize
from softprompt.tasks import TaskSpec

TASK = TaskSpec(template="{text} =", labels=["negative", "positive"])


@pytest.mark.parametrize("spec", ["class-label", "vocab", "uniform", "text:a great movie"])
def test_shapes_and_determinism(tiny_backbone, spec):
    first = initialize(spec, tiny_backbone, 7, TASK, seed=3)
    assert first.shape == (7, tiny_backbone.d_model) and first.dtype == torch.float32
    torch.testing.assert_close(first, initialize(spec, tiny_backbone, 7, TASK, seed=3))


def test_class_label_starts_with_label_word_embeddings(tiny_backbone):
    prompt = initialize("class-label", tiny_backbone, 5, TASK, seed=0)
    for row, word in enumerate(TASK.verbalizer):
        ids = torch.tensor(tiny_backbone.tokenize(word))
        # Through the embedding module (Gemma scales inside it), averaged over a multi-token word.
        torch.testing.assert_close(prompt[row], tiny_backbone.embed(ids).mean(0))


def test_vocab_rows_are_real_token_embeddings(llama_backbone):
    prompt = initialize("vocab", llama_backbone, 6, TASK, seed=0)
    table = llama_backbone.embed(frequent_token_ids(llama_backbone))
    assert all((table - row).abs().sum(1).min() < 1e-6 for row in prompt)
    special = set(llama_backbone.tokenizer.all_special_ids)
    assert not special & set(frequent_token_ids(llama_backbone).tolist())
    assert len(frequent_token_ids(llama_backbone)) <= FREQUENT_TOKENS


def test_uniform_matches_embedding_scale(llama_backbone):
    prompt = initialize("uniform", llama_backbone, 200, TASK, seed=0)
    reference_rms = llama_backbone.embed(frequent_token_ids(llama_backbone)).pow(2).mean().sqrt()
    assert abs(prompt.pow(2).mean().sqrt() / reference_rms - 1) < 0.1


def test_text_init_repeats_tokens(llama_backbone):
    ids = llama_backbone.tokenize("great movie")
    prompt = initialize("text:great movie", llama_backbone, len(ids) * 2 + 1, TASK, seed=0)
    expected = llama_backbone.embed(torch.tensor((ids * 3)[: len(ids) * 2 + 1]))
    torch.testing.assert_close(prompt, expected)


def test_bad_specs(llama_backbone):
    with pytest.raises(SoftPromptError, match="unknown init 'random'"):
        initialize("random", llama_backbone, 4, TASK, seed=0)
    with pytest.raises(SoftPromptError, match="at least 1"):
        initialize("vocab", llama_backbone, 0, TASK, seed=0)
