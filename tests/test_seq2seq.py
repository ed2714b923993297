"""Encoder-decoder (T5) models on tiny random-weight configs: the prompt in front of the encoder input, labels
scored by the decoder, through the same TaskTokenizer / train / evaluate code as causal models."""

import pytest
import torch
from conftest import TOY_EXAMPLES as EXAMPLES
from conftest import make_tokenizer
from transformers import T5Config, T5ForConditionalGeneration

from softprompt.bank import PromptBank
from softprompt.data import Example, TaskTokenizer
from softprompt.errors import SoftPromptError
from softprompt.evaluate import cache_of, evaluate, generate_texts, label_scores
from softprompt.loader import load_model
from softprompt.prompt import SoftPrompt
from softprompt.seq2seq import EncoderDecoderLM
from softprompt.tasks import TaskSpec
from softprompt.train import TrainConfig, train

# Verbalizers of different token lengths: several decoder rows per item, targets at different positions.
TASK = TaskSpec(name="toy", template="Review: {text}\nSentiment:", labels=["negative", "positive"],
                verbalizer=[" dull, boring and far too long", " positive"])


def make_t5(seed: int = 0) -> EncoderDecoderLM:
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return EncoderDecoderLM(T5ForConditionalGeneration(config).float(), tokenizer, name="tiny-t5")


def reference_scores(backbone, prompt, examples):
    """Plain transformers calls, one (item, label) pair at a time."""
    task_tokenizer = TaskTokenizer(backbone, TASK)
    rows = []
    with torch.no_grad():
        for item in task_tokenizer.encode_all(examples):
            ids = torch.tensor([item.input_ids + [backbone.tokenizer.eos_token_id]])
            embeds = torch.cat([prompt[None], backbone.model.get_input_embeddings()(ids)], dim=1)
            scores = []
            for label_ids in task_tokenizer.label_ids:
                decoder = torch.tensor([[0] + label_ids[:-1]])
                logits = backbone.model(inputs_embeds=embeds, decoder_input_ids=decoder).logits[0]
                scores.append(logits.log_softmax(-1)[torch.arange(len(label_ids)), label_ids].sum())
            rows.append(torch.stack(scores))
    return torch.stack(rows)


def test_label_scores_match_plain_transformers_calls():
    backbone = make_t5()
    prompt = torch.randn(3, backbone.d_model)
    task_tokenizer = TaskTokenizer(backbone, TASK)
    assert len(task_tokenizer.label_ids[0]) > 1  # the multi-token path is exercised
    items = task_tokenizer.encode_all(EXAMPLES)
    ours = label_scores(backbone, task_tokenizer, items, prompts=prompt[None], batch_size=5)
    torch.testing.assert_close(ours, reference_scores(backbone, prompt, EXAMPLES), atol=1e-5, rtol=1e-5)


def test_prompt_tuning_trains_saves_and_evaluates(tmp_path):
    backbone = make_t5()
    config = TrainConfig(prompt_length=4, batch_size=16, steps=12, eval_every=4, patience=0, valid_limit=None,
                         lr=0.05, seed=1, init="vocab")
    result = train(backbone, TASK, EXAMPLES, EXAMPLES, tmp_path / "t5.safetensors", config, show_progress=False)
    assert result.history[-1]["loss"] < result.history[1]["loss"]  # one batch = all the data: the loss falls
    loaded = SoftPrompt.load(tmp_path / "t5.safetensors")
    assert evaluate(backbone, EXAMPLES, loaded).accuracy == result.best_metric
    for name, parameter in backbone.model.named_parameters():
        assert not parameter.requires_grad, name


def test_saved_t5_directory_loads_as_seq2seq_and_generates_like_transformers(tmp_path):
    backbone = make_t5()
    backbone.model.save_pretrained(tmp_path / "t5")
    backbone.tokenizer.save_pretrained(tmp_path / "t5")
    loaded = load_model(str(tmp_path / "t5"), precision="fp32")
    assert isinstance(loaded, EncoderDecoderLM)

    task = TaskSpec(name="gen", template="Question: {text}\nAnswer:", labels=None, label_field="answer")
    prompt = SoftPrompt(torch.randn(2, loaded.d_model), loaded.name, loaded.fingerprint, task)
    task_tokenizer = TaskTokenizer(loaded, task)
    items = task_tokenizer.encode_all([Example({"text": "two plus two"}, None, " 4", "q")])
    ours = generate_texts(loaded, task_tokenizer, items, cache_of(loaded, prompt), max_new_tokens=5)
    ids = torch.tensor([items[0].input_ids + [loaded.tokenizer.eos_token_id]])
    embeds = torch.cat([prompt.embeddings[None], loaded.model.get_input_embeddings()(ids)], dim=1)
    expected = loaded.model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False, num_beams=1,
                                     eos_token_id=loaded.tokenizer.eos_token_id)
    expected_text = loaded.tokenizer.decode(expected[0, 1:], skip_special_tokens=True).split("\n")[0]
    assert ours[0] == expected_text


def test_deep_prompts_and_prompt_banks_are_refused():
    backbone = make_t5()
    with pytest.raises(SoftPromptError, match="needs a causal LM .*'tiny-t5' is an encoder-decoder LM"):
        train(backbone, TASK, EXAMPLES, EXAMPLES, "unused.safetensors", TrainConfig(method="prefix", steps=1),
              show_progress=False)
    with pytest.raises(SoftPromptError, match="PromptBank .* needs a causal LM or an encoder classifier"):
        PromptBank(backbone)


def test_compile_refuses_an_encoder_decoder_and_names_the_families_it_supports():
    with pytest.raises(SoftPromptError, match="--compile needs .*llama.*'tiny-t5' is an encoder-decoder LM"):
        make_t5().compile()


def test_generation_puts_each_rows_own_prompt_before_its_input():
    from softprompt.backbone import PromptCache

    backbone = make_t5(seed=2)  # a tiny random T5 whose answers depend on the prompt
    task = TaskSpec(name="gen", template="Question: {text}\nAnswer:", labels=None, label_field="answer")
    torch.manual_seed(2)
    caches = [cache_of(backbone, SoftPrompt(torch.randn(k, backbone.d_model) * 4, backbone.name,
                                             backbone.fingerprint, task)) for k in (2, 4)]
    rows = [item.input_ids for item in TaskTokenizer(backbone, task).encode_all(
        [Example({"text": text}, None, None, "q") for text in ["two plus two", "a dull movie", "wit"]])]
    prompt_index, budgets = [1, 0, 1], [5, 3, 4]
    alone = [backbone.generate([row], caches[index], budget, set())[0]
             for row, index, budget in zip(rows, prompt_index, budgets)]
    assert alone[0] != backbone.generate([rows[0]], caches[0], 5, set())[0]  # the prompt changes the answer
    assert backbone.generate(rows, PromptCache.stack(caches), budgets, set(), prompt_index) == alone


def test_prompt_embeds_export_needs_a_causal_lm(tmp_path):
    from softprompt.interop import export_prompt_embeds

    backbone = make_t5()
    prompt = SoftPrompt(torch.randn(3, backbone.d_model), backbone.name, backbone.fingerprint, TASK)
    with pytest.raises(SoftPromptError, match="a prompt-embeds export needs a causal LM .*'tiny-t5' is an "
                                              "encoder-decoder LM"):
        export_prompt_embeds(prompt, backbone, tmp_path / "p.embeds.safetensors")
    assert not (tmp_path / "p.embeds.safetensors").exists()
