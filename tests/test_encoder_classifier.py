"""Encoder-only (BERT family) models: prompt + label head, on a tiny random-weight BERT (fast) and on the real
all-MiniLM-L6-v2 (slow)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOY_EXAMPLES as EXAMPLES
from conftest import make_tokenizer
from transformers import BertConfig, BertModel

from softprompt.bank import PromptBank
from softprompt.data import Example, TaskTokenizer
from softprompt.encoder_classifier import HEAD_SCALE, EncoderClassifier
from softprompt.errors import SoftPromptError
from softprompt.evaluate import evaluate, predict
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec
from softprompt.train import TrainConfig, train

TASK = TaskSpec(name="toy", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
TOPIC = TaskSpec(name="topic", template="Post: {text}\nTopic:", labels=["graphics", "movie", "math"])


def make_bert(seed: int = 0) -> EncoderClassifier:
    torch.manual_seed(seed)
    base = make_tokenizer()
    tokenizer = type(base)(tokenizer_object=base.backend_tokenizer, pad_token="<pad>", cls_token="<bos>",
                           sep_token="<eos>")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
    return EncoderClassifier(BertModel(config).float(), tokenizer, name="tiny-bert")


def reference_probabilities(backbone, prompt, head, examples, task):
    """Plain BertModel calls, one example at a time: [CLS] prompt input [SEP], mean pool, cosine head."""
    tokenizer, rows = backbone.tokenizer, []
    with torch.no_grad():
        for example in examples:
            ids = tokenizer(task.template.format(**example.fields), add_special_tokens=False)["input_ids"]
            word = backbone.model.get_input_embeddings()
            embeds = torch.cat([word(torch.tensor([tokenizer.cls_token_id])), prompt,
                                word(torch.tensor(ids + [tokenizer.sep_token_id]))])
            pooled = F.normalize(backbone.model(inputs_embeds=embeds[None]).last_hidden_state[0].mean(0), dim=0)
            rows.append((HEAD_SCALE * head @ pooled).softmax(0))
    return torch.stack(rows)


def test_scores_match_plain_bert_calls_and_zero_shot_uses_the_label_words():
    backbone = make_bert()
    prompt = SoftPrompt(torch.randn(3, 32), backbone.name, backbone.fingerprint, TOPIC, label_head=torch.randn(3, 32))
    examples = [Example({"text": t}, None, None, "r") for t in ["the graphics card", "a dull movie", "x"]]
    ours = torch.tensor([[p.scores[label] for label in TOPIC.labels] for p in predict(backbone, prompt, examples)])
    torch.testing.assert_close(ours, reference_probabilities(backbone, prompt.embeddings, prompt.label_head, examples,
                                                             TOPIC), atol=1e-5, rtol=1e-4)
    # Without a prompt: no prompt vectors, the head = the label words' own pooled embeddings.
    zero_shot = torch.tensor([[p.scores[label] for label in TOPIC.labels]
                              for p in predict(backbone, None, examples, task=TOPIC)])
    expected = reference_probabilities(backbone, torch.zeros(0, 32), backbone.label_head(TOPIC), examples, TOPIC)
    torch.testing.assert_close(zero_shot, expected, atol=1e-5, rtol=1e-4)


def test_prompt_and_head_train_together_and_save_in_one_file(tmp_path):
    backbone = make_bert()
    config = TrainConfig(prompt_length=4, batch_size=16, steps=20, eval_every=4, patience=0, valid_limit=None,
                         lr=0.3, seed=1, init="vocab")
    result = train(backbone, TASK, EXAMPLES, EXAMPLES, tmp_path / "bert.safetensors", config, show_progress=False)
    assert result.history[-1]["loss"] < result.history[1]["loss"]
    assert result.best_metric > result.history[0]["valid_accuracy"] and result.best_step > 0
    loaded = SoftPrompt.load(tmp_path / "bert.safetensors")
    assert loaded.length == 4 and list(loaded.label_head.shape) == [2, 32]
    assert not torch.allclose(loaded.label_head, backbone.label_head(TASK))  # the head trained
    assert evaluate(backbone, EXAMPLES, loaded).accuracy == result.best_metric
    assert evaluate(backbone, EXAMPLES, None, task=TASK).n == len(EXAMPLES)  # the zero-shot baseline runs


def test_a_bank_mixes_encoder_prompts_with_different_label_counts():
    backbone = make_bert()
    sentiment = SoftPrompt(torch.randn(2, 32), backbone.name, backbone.fingerprint, TASK, label_head=torch.randn(2, 32))
    topic = SoftPrompt(torch.randn(5, 32), backbone.name, backbone.fingerprint, TOPIC, label_head=torch.randn(3, 32))
    bank = PromptBank(backbone)
    bank.add("sentiment", sentiment)
    bank.add("topic", topic)
    requests = [("topic", {"text": "a graphics card"}), ("sentiment", {"text": "dull"}),
                ("topic", {"text": "some math"}), ("sentiment", {"text": "a great movie"})]
    mixed = bank.classify(requests)
    for (name, fields), answer in zip(requests, mixed):
        prompt = topic if name == "topic" else sentiment
        alone = predict(backbone, prompt, [Example(fields, None, None, "r")])[0]
        assert answer.label == alone.label
        for label, probability in alone.scores.items():
            assert abs(answer.scores[label] - probability) < 1e-5


def test_what_an_encoder_cannot_do_is_refused(tmp_path, llama_backbone):
    backbone = make_bert()
    with pytest.raises(SoftPromptError, match="needs a causal LM .*'tiny-bert' is an encoder classifier"):
        train(backbone, TASK, EXAMPLES, EXAMPLES, tmp_path / "x.safetensors", TrainConfig(method="prefix"),
              show_progress=False)
    generation = TaskSpec(name="gen", template="Q: {text}\nA:", labels=None, label_field="answer")
    with pytest.raises(SoftPromptError, match="an encoder classifier can only classify"):
        TaskTokenizer(backbone, generation)
    encoder_prompt = SoftPrompt(torch.randn(2, llama_backbone.d_model), "tiny-bert", llama_backbone.fingerprint,
                                TASK, label_head=torch.randn(2, llama_backbone.d_model))
    with pytest.raises(SoftPromptError, match="an encoder classifier, with a label head"):
        encoder_prompt.check_backbone(llama_backbone)


@pytest.mark.slow
def test_real_minilm_prompt_tuning_beats_its_zero_shot_start(tmp_path):
    from softprompt import load_model
    from softprompt.data import load_dataset

    backbone = load_model("all-minilm-l6-v2")
    assert isinstance(backbone, EncoderClassifier) and backbone.d_model == 384
    data = load_dataset("rotten-tomatoes")
    config = TrainConfig(prompt_length=10, steps=40, eval_every=20, valid_limit=200, seed=0)
    result = train(backbone, data.task, data.train, data.validation, tmp_path / "minilm.safetensors", config,
                   show_progress=False)
    zero_shot = evaluate(backbone, data.test[:300], task=data.task)
    tuned = evaluate(backbone, data.test[:300], SoftPrompt.load(tmp_path / "minilm.safetensors"))
    assert result.history[0]["valid_accuracy"] < result.best_metric
    assert tuned.accuracy > zero_shot.accuracy + 0.05, (zero_shot.accuracy, tuned.accuracy)
