import importlib
import json

import pytest
import torch

from softprompt.data import Example
from softprompt.errors import SoftPromptError
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec
from softprompt.train import TrainConfig, batch_order, train

TASK = TaskSpec(name="toy", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
WORDS = ["great", "dull", "wit", "boring", "life", "long", "lazy", "quick"]


def examples(count, offset=0):
    # Label depends on the words, so the task is learnable by a prompt.
    rows = []
    for i in range(offset, offset + count):
        word = WORDS[i % len(WORDS)]
        rows.append(Example({"text": f"a {word} movie {i % 3}"}, int(word in {"great", "wit", "life", "quick"}),
                            None, f"row {i}"))
    return rows


def config(**overrides):
    base = dict(prompt_length=4, batch_size=4, steps=8, eval_every=4, patience=0, valid_limit=None, lr=0.3, seed=1)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("objective", ["rank", "lm"])
def test_training_lowers_loss_and_saves_best_prompt(tmp_path, llama_backbone, objective):
    out = tmp_path / "p.safetensors"
    # One batch holding the whole training set: every step sees the same data, so the loss must fall.
    result = train(llama_backbone, TASK, examples(8), examples(8, 100), out,
                   config(steps=12, batch_size=8, objective=objective, optimizer="adamw", lr=0.05),
                   show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "p.safetensors.log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [0, 4, 8, 12]
    assert log[-1]["loss"] < log[1]["loss"]
    saved = SoftPrompt.load(out)
    assert saved.embeddings.shape == (4, llama_backbone.d_model)
    assert saved.training["best_valid_accuracy"] == result.best_metric == max(e["valid_accuracy"] for e in log)
    assert not (tmp_path / "p.safetensors.ckpt.safetensors").exists()  # finished runs leave no checkpoint


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_autocast_trains_an_fp32_prompt(tmp_path, llama_backbone, precision):
    """bf16/fp16 matmuls score close to fp32 (not equal: they really run); the prompt stays fp32 and learns; fp16
    scales its loss so that small prompt gradients do not underflow."""
    from conftest import make_backbone
    from test_backbone import training_batch

    half = make_backbone("llama")
    half.precision = precision
    batch, prompts = training_batch(half), torch.randn(1, 4, half.d_model) * 0.5
    reference, scores = (b.target_logprobs(batch, prompts).detach() for b in (llama_backbone, half))
    torch.testing.assert_close(scores, reference, atol=0.1, rtol=0.02)
    assert not torch.equal(scores, reference)
    assert half.loss_scaler().is_enabled() == (precision == "fp16")
    out = tmp_path / "p.safetensors"
    result = train(half, TASK, examples(8), examples(8, 100), out,
                   config(steps=12, batch_size=8, optimizer="adamw", lr=0.05), show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "p.safetensors.log.jsonl").read_text().splitlines()]
    assert result.prompt.embeddings.dtype == torch.float32
    assert log[-1]["loss"] < log[1]["loss"]


def test_only_the_prompt_changes(tmp_path, llama_backbone):
    before = {name: p.clone() for name, p in llama_backbone.model.named_parameters()}
    train(llama_backbone, TASK, examples(16), examples(4, 50), tmp_path / "p.safetensors", config(steps=2),
          show_progress=False)
    for name, parameter in llama_backbone.model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_seeded_training_is_deterministic(tmp_path, llama_backbone):
    runs = [train(llama_backbone, TASK, examples(16), examples(4, 50), tmp_path / f"{i}.safetensors", config(),
                  show_progress=False).prompt.embeddings for i in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def losses(result):
    """The training loss logged at each evaluation: the returned prompt is the best one, which may come from before
    an interruption, so the later losses are what show that a resumed run continued the same way."""
    return [record["loss"] for record in result.history if "loss" in record]


def interrupt_and_resume(backbone, cfg, out, monkeypatch):
    """Train with `cfg` into `out`, killed during step 7, then resumed from the checkpoint."""
    train_module = importlib.import_module("softprompt.train")  # the package re-exports a function named train
    real_loss, calls = train_module.prompt_loss, {"n": 0}

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "prompt_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train(backbone, TASK, examples(24), examples(4, 50), out, cfg, show_progress=False)
    assert out.with_name(out.name + ".ckpt.safetensors").exists() and not out.exists()
    monkeypatch.setattr(train_module, "prompt_loss", real_loss)
    return train(backbone, TASK, examples(24), examples(4, 50), out, cfg, resume=True, show_progress=False)


@pytest.mark.parametrize("optimizer, method, reparameterize",
                         [("adafactor", "prompt", 0), ("adamw", "prompt", 0), ("adamw", "prefix", 16)])
def test_resume_continues_an_interrupted_run_exactly(tmp_path, llama_backbone, monkeypatch, optimizer, method,
                                                     reparameterize):
    """A run killed after step 6 and resumed ends with the same prompt as an uninterrupted run (for the MLP
    reparameterization too: its weights and their optimizer state are in the checkpoint)."""
    cfg = config(steps=10, eval_every=2, optimizer=optimizer, lr=None, method=method, reparameterize=reparameterize)
    full = train(llama_backbone, TASK, examples(24), examples(4, 50), tmp_path / "full.safetensors", cfg,
                 show_progress=False)
    resumed = interrupt_and_resume(llama_backbone, cfg, tmp_path / "resumed.safetensors", monkeypatch)
    assert resumed.steps_run == 10
    assert losses(resumed) == pytest.approx(losses(full), rel=0, abs=1e-6)
    torch.testing.assert_close(resumed.prompt.tensor, full.prompt.tensor, rtol=0, atol=1e-6)
    assert not torch.equal(full.prompt.tensor, resumed.prompt.tensor * 0)  # it trained: not all zeros
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed.safetensors.log.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6, 8, 10]


def test_fp16_resume_keeps_the_loss_scale(tmp_path, monkeypatch):
    """fp16 skips the steps whose scaled gradients overflow, so where the scale stood decides which steps count:
    a resumed run continues with the saved scale and growth counter. The scale here doubles after every good step
    (growth_interval=1) from 2^16, so on this model it overflows and backs off every few steps."""
    from conftest import make_backbone

    half = make_backbone("llama")
    half.precision = "fp16"
    scalers = []

    def eager_scaler():
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(half, "loss_scaler", eager_scaler)
    cfg = config(steps=10, eval_every=2, optimizer="adamw", lr=None)
    full = train(half, TASK, examples(24), examples(4, 50), tmp_path / "full.safetensors", cfg, show_progress=False)
    assert scalers[0].get_scale() < 2.0**16 * 2**10  # some steps overflowed and were skipped
    resumed = interrupt_and_resume(half, cfg, tmp_path / "resumed.safetensors", monkeypatch)
    assert losses(resumed) == losses(full)
    torch.testing.assert_close(resumed.prompt.tensor, full.prompt.tensor, rtol=0, atol=0)


def test_early_stopping(tmp_path, llama_backbone):
    result = train(llama_backbone, TASK, examples(16), examples(4, 50), tmp_path / "p.safetensors",
                   config(steps=40, eval_every=1, patience=2, lr=1e-9, optimizer="adamw"), show_progress=False)
    assert result.stopped_early and result.steps_run == 2


def test_resume_without_checkpoint_is_an_error(tmp_path, llama_backbone):
    with pytest.raises(SoftPromptError, match="no checkpoint"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "p.safetensors", config(), resume=True,
              show_progress=False)


def test_batches_group_similar_lengths_and_cover_the_data(llama_backbone):
    from softprompt.data import TaskTokenizer

    items = TaskTokenizer(llama_backbone, TASK).encode_all(examples(64))
    batches = batch_order(items, 8, seed=0, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(64))
    assert batch_order(items, 8, seed=0, epoch=0) == batches != batch_order(items, 8, seed=0, epoch=1)


def test_bad_optimizer_objective_and_compile_mode(tmp_path, llama_backbone):
    with pytest.raises(SoftPromptError, match="unknown optimizer 'sgd'"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "p.safetensors", config(optimizer="sgd"),
              show_progress=False)
    with pytest.raises(SoftPromptError, match="unknown objective 'mse'"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "q.safetensors", config(objective="mse"),
              show_progress=False)
    with pytest.raises(SoftPromptError, match="unknown compile mode 'fastest'; choose .*reduce-overhead"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "r.safetensors",
              config(compile_mode="fastest"), show_progress=False)
    assert not llama_backbone.compiled


def test_a_compile_mode_compiles_the_layers(tmp_path, llama_backbone):
    result = train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "p.safetensors",
                   config(compile_mode="default", steps=2, eval_every=2), show_progress=False)
    assert llama_backbone.compiled
    logged = losses(result)
    assert logged and all(torch.isfinite(torch.tensor(logged)))


def test_generation_task_trains_on_the_target_text(tmp_path, llama_backbone):
    task = TaskSpec(name="qa", template="Question: {question}\nAnswer:", labels=None, label_field="answer")
    rows = [Example({"question": f"what is {i} plus {i}?"}, None, f" {2 * i}", f"row {i}") for i in range(8)]
    result = train(llama_backbone, task, rows, rows[:4], tmp_path / "qa.safetensors",
                   config(steps=4, eval_every=2, batch_size=4, optimizer="adamw", lr=0.05), show_progress=False)
    saved = SoftPrompt.load(tmp_path / "qa.safetensors")
    assert saved.task.labels is None and saved.training["config"]["objective"] == "lm"
    assert 0.0 <= result.best_metric <= 1.0 and result.steps_run == 4


@pytest.mark.parametrize("route", ["auto", "concat"])
def test_activation_checkpointing_recomputes_layers_and_trains_the_same_prompt(tmp_path, llama_backbone, route,
                                                                              packed_calls):
    """The default path stays packed under checkpointing (prompt and tokens in one pass); concat is the reference."""
    attention = llama_backbone.model.model.layers[0].self_attn
    calls = []
    handle = attention.register_forward_hook(lambda *_: calls.append(1))
    runs = {}
    for checkpointing in (False, True):
        calls.clear()
        packed_calls.clear()
        cfg = config(steps=3, eval_every=3, route=route, activation_checkpointing=checkpointing)
        runs[checkpointing] = train(llama_backbone, TASK, examples(16), examples(4, 50),
                                    tmp_path / f"{checkpointing}.safetensors", cfg, show_progress=False)
        runs[checkpointing, "calls"], runs[checkpointing, "packed"] = len(calls), len(packed_calls)
    handle.remove()
    torch.testing.assert_close(runs[True].prompt.embeddings, runs[False].prompt.embeddings, atol=1e-6, rtol=0)
    assert runs[True, "calls"] == runs[False, "calls"] + 3  # each training step ran layer 0's attention twice
    layers = llama_backbone.model.config.num_hidden_layers
    assert runs[False, "packed"] == (3 * layers if route == "auto" else 0)
    assert runs[True, "packed"] == 2 * runs[False, "packed"]
    assert not llama_backbone.model.model.layers[0].training  # switched back off after training


def test_checkpointed_deep_prompts_need_plain_tensor_prefixes(tmp_path, llama_backbone):
    llama_backbone.takes_plain_prompt_tensors = False  # as for a family whose attention only takes a cache object
    with pytest.raises(SoftPromptError, match="--activation-checkpointing with --method prefix needs a causal LM whose "
                                              "attention takes the prompt as plain tensors .*llama.*'llama'"):
        train(llama_backbone, TASK, examples(8), examples(4, 50), tmp_path / "p.safetensors",
              config(method="prefix", activation_checkpointing=True), show_progress=False)


def test_a_non_finite_loss_names_the_step_and_in_fp16_the_precision():
    from softprompt.train import check_finite

    check_finite(torch.tensor(0.5), 0, "fp16")
    with pytest.raises(SoftPromptError, match=r"loss is nan at step 3: try a lower --lr$"):
        check_finite(torch.tensor(float("nan")), 2, "bf16")
    with pytest.raises(SoftPromptError, match=r"step 3: try a lower --lr; fp16 .* try --precision bf16 or fp32"):
        check_finite(torch.tensor(float("inf")), 2, "fp16")


def test_record_test_results_saves_the_accuracies_with_the_prompt(tmp_path):
    from softprompt.train import record_test_results

    prompt = SoftPrompt(torch.randn(3, 8), "tiny", "fp", TASK, training={"steps_run": 4})
    record_test_results(prompt, tmp_path / "p.safetensors", 0.75, 0.5)
    assert SoftPrompt.load(tmp_path / "p.safetensors").training == {
        "steps_run": 4, "test_accuracy": 0.75, "zero_shot_test_accuracy": 0.5}
    alone = SoftPrompt(torch.randn(3, 8), "tiny", "fp", TASK)
    record_test_results(alone, tmp_path / "q.safetensors", 0.25)
    assert SoftPrompt.load(tmp_path / "q.safetensors").training == {"test_accuracy": 0.25}
