import json

import pytest
import torch
from test_train import TASK, examples

from softprompt.data import TaskTokenizer
from softprompt.errors import SoftPromptError
from softprompt.evaluate import label_scores
from softprompt.loader import load_model
from softprompt.model_tuning import TRAINING_FILE
from softprompt.train import TrainConfig, train


def config(**overrides):
    base = dict(batch_size=8, steps=12, eval_every=4, patience=0, valid_limit=None, lr=3e-3, seed=1,
                method="model-tuning")
    return TrainConfig(**{**base, **overrides})


def test_model_tuning_trains_a_copy_and_saves_the_best_checkpoint(tmp_path, llama_backbone):
    before = {name: p.clone() for name, p in llama_backbone.model.named_parameters()}
    out = tmp_path / "tuned"
    result = train(llama_backbone, TASK, examples(8), examples(8, 100), out, config(), show_progress=False)
    assert result.prompt is None  # the result is a model

    log = [json.loads(line) for line in (tmp_path / "tuned.log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [0, 4, 8, 12]
    assert log[-1]["loss"] < log[1]["loss"]  # one batch = the whole training set: the loss must fall
    assert result.best_metric == max(entry["valid_accuracy"] for entry in log)
    for name, parameter in llama_backbone.model.named_parameters():  # the caller's frozen model is untouched
        assert torch.equal(parameter, before[name]), name
        assert not parameter.requires_grad

    assert {"config.json", "model.safetensors", "tokenizer.json", TRAINING_FILE} <= {p.name for p in out.iterdir()}
    record = json.loads((out / TRAINING_FILE).read_text())
    assert record["best_step"] == result.best_step and record["config"]["method"] == "model-tuning"
    # The directory is a model like any other: loading it gives the returned model's scores.
    reloaded = load_model(str(out), precision="fp32")
    items = TaskTokenizer(reloaded, TASK).encode_all(examples(6, 200))
    torch.testing.assert_close(label_scores(reloaded, TaskTokenizer(reloaded, TASK), items),
                               label_scores(result.backbone, TaskTokenizer(result.backbone, TASK), items))
    assert result.best_step > 0  # validation improved at some step, so the saved weights are tuned ones
    assert any(not torch.equal(p, before[n]) for n, p in result.backbone.model.named_parameters())
    assert not list(tmp_path.glob(".tuned.*"))  # no temp directories left behind


def test_model_tuning_a_half_precision_load_trains_fp32_weights_with_the_head_tied(tmp_path):
    """A bf16 load stores the frozen linear weights in bf16; the training copy gets fp32 weights back, and a head
    tied to the input embeddings (Gemma3) is tied again, so the saved checkpoint is a normal fp32 one."""
    from conftest import make_backbone
    from safetensors import safe_open

    saved = make_backbone("gemma3")
    saved.model.save_pretrained(tmp_path / "base")
    saved.tokenizer.save_pretrained(tmp_path / "base")
    half = load_model(str(tmp_path / "base"), precision="bf16")
    assert half.lm_head.weight.dtype == torch.bfloat16
    out = tmp_path / "tuned"
    train(half, TASK, examples(8), examples(8, 100), out, config(steps=4), show_progress=False)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
        assert not any(key.startswith("lm_head") for key in handle.keys())  # tied: saved once, as the embeddings
    assert dtypes == {"F32"}


def test_model_tuning_defaults_and_errors(tmp_path, llama_backbone):
    assert TrainConfig(method="model-tuning").learning_rate == 2e-5
    assert TrainConfig(method="prompt").learning_rate == 0.01
    with pytest.raises(SoftPromptError, match="model-tuning runs cannot be resumed"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "tuned", config(), resume=True,
              show_progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SoftPromptError, match="is a file"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "file", config(), show_progress=False)


def test_model_tuning_refuses_up_front_when_memory_is_short(tmp_path, llama_backbone, monkeypatch):
    import softprompt.model_tuning as model_tuning

    monkeypatch.setattr(model_tuning, "available_memory", lambda: 1024)
    with pytest.raises(SoftPromptError, match=r"model tuning tiny-llama \(0M parameters\) needs about .* GiB .* free"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "m", config(), show_progress=False)
    assert not (tmp_path / "m").exists()


def test_a_diverging_run_stops_with_a_clear_error(tmp_path, llama_backbone):
    # lr 1e30: the first update throws the weights to ~1e30, the next forward overflows to inf/nan.
    with pytest.raises(SoftPromptError, match=r"the training loss is (nan|inf) at step [2-9]: try a lower --lr"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "m", config(lr=1e30),
                   show_progress=False)
