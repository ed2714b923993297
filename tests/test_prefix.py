"""Deep prompts (method "prefix"): learned keys/values at every layer, usable wherever a prompt is."""

import pytest
import torch

from softprompt.bank import PromptBank
from softprompt.data import Example
from softprompt.errors import SoftPromptError
from softprompt.evaluate import evaluate, predict
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec
from softprompt.train import TrainConfig, train

TASK = TaskSpec(name="s", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
EXAMPLES = [Example({"text": t}, i % 2, None, "r") for i, t in
            enumerate(["a great movie", "dull, boring and far too long", "wit", "the lazy dog sleeps"])]


def shallow_and_deep(backbone, length=4):
    torch.manual_seed(0)
    embeddings = torch.randn(length, backbone.d_model)
    shallow = SoftPrompt(embeddings, backbone.name, backbone.fingerprint, TASK)
    deep = SoftPrompt(None, backbone.name, backbone.fingerprint, TASK,
                      key_values=backbone.deep_prompt_from_embeddings(embeddings).cpu())
    return shallow, deep


def test_prefix_from_a_prompt_scores_like_the_prompt(tiny_backbone):
    shallow, deep = shallow_and_deep(tiny_backbone)
    layers, heads, head_dim = tiny_backbone.deep_prompt_shape(1)[::2]
    assert deep.method == "prefix" and list(deep.key_values.shape) == [layers, 2, heads, 4, head_dim]
    for a, b in zip(predict(tiny_backbone, shallow, EXAMPLES), predict(tiny_backbone, deep, EXAMPLES)):
        for label in a.scores:
            assert abs(a.scores[label] - b.scores[label]) < 1e-5


def test_prefix_trains_saves_and_reloads(tmp_path, llama_backbone):
    out = tmp_path / "deep.safetensors"
    config = TrainConfig(prompt_length=3, batch_size=4, steps=8, eval_every=4, patience=0, valid_limit=None,
                         lr=0.05, method="prefix", seed=1)
    result = train(llama_backbone, TASK, EXAMPLES, EXAMPLES, out, config, show_progress=False)
    log = result.history
    assert log[-1]["loss"] < log[1]["loss"]  # one batch = the whole set, so the loss must fall
    loaded = SoftPrompt.load(out)
    assert loaded.method == "prefix" and loaded.embeddings is None and loaded.length == 3
    assert evaluate(llama_backbone, EXAMPLES, loaded).accuracy == result.best_metric


def test_reparameterized_prefix_starts_where_the_plain_one_does_and_saves_only_the_prefix(tmp_path,
                                                                                            llama_backbone):
    common = dict(prompt_length=3, batch_size=4, steps=8, eval_every=4, patience=0, valid_limit=None, lr=0.01,
                  method="prefix", seed=1)
    plain = train(llama_backbone, TASK, EXAMPLES, EXAMPLES, tmp_path / "plain.safetensors", TrainConfig(**common),
                  show_progress=False)
    mlp = train(llama_backbone, TASK, EXAMPLES, EXAMPLES, tmp_path / "mlp.safetensors",
                TrainConfig(**common, reparameterize=32), show_progress=False)
    # The MLP's output layer starts at zero: step 0 is the same prefix, so the same validation accuracy.
    assert mlp.history[0]["valid_accuracy"] == plain.history[0]["valid_accuracy"]
    assert mlp.history[-1]["loss"] < mlp.history[1]["loss"]
    loaded = SoftPrompt.load(tmp_path / "mlp.safetensors")
    assert loaded.method == "prefix" and loaded.key_values.shape == plain.prompt.key_values.shape
    layers, heads, head_dim = llama_backbone.deep_prompt_shape(1)[::2]
    d = llama_backbone.d_model
    # E [3, d] + Linear(d, 32) + Linear(32, layers * 2 * heads * head_dim): far more than the prefix itself.
    assert loaded.training["trainable_parameters"] == 3 * d + (d * 32 + 32) + (32 + 1) * layers * 2 * heads * head_dim
    with pytest.raises(SoftPromptError, match="--reparameterize applies to deep prompts"):
        train(llama_backbone, TASK, EXAMPLES, EXAMPLES, tmp_path / "x.safetensors",
              TrainConfig(**{**common, "method": "prompt"}, reparameterize=8), show_progress=False)


def test_bank_mixes_deep_and_shallow_prompts(llama_backbone):
    shallow, deep = shallow_and_deep(llama_backbone, length=2)
    torch.manual_seed(5)
    deep.key_values = deep.key_values + 0.1 * torch.randn_like(deep.key_values)  # not the shallow one any more
    bank = PromptBank(llama_backbone)
    bank.add("shallow", shallow)
    bank.add("deep", deep)
    requests = [("deep", EXAMPLES[0].fields), ("shallow", EXAMPLES[1].fields), ("deep", EXAMPLES[2].fields)]
    for (name, fields), mixed in zip(requests, bank.classify(requests)):
        (alone,) = predict(llama_backbone, {"deep": deep, "shallow": shallow}[name],
                           [Example(fields, None, None, "r")])
        assert all(abs(mixed.scores[k] - alone.scores[k]) < 1e-5 for k in mixed.scores)


def test_prefix_shape_is_checked(llama_backbone):
    _, deep = shallow_and_deep(llama_backbone)
    deep.key_values = deep.key_values[:, :, :1]  # one kv head instead of two
    with pytest.raises(SoftPromptError, match=r"has shape \[2, 2, 1, 4, 8\]; 'tiny-llama' needs \[2, 2, 2, 4, 8\]"):
        deep.check_backbone(llama_backbone)


def test_deep_prompts_cannot_become_embeddings(tmp_path, llama_backbone):
    from softprompt.interop import export_peft

    _, deep = shallow_and_deep(llama_backbone)
    with pytest.raises(SoftPromptError, match="this is a prefix"):
        export_peft(deep, tmp_path / "adapter")
