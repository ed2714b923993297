"""TrainConfig checks every value once, when it is built, and names the field as the command line spells it."""

import dataclasses
import re

import pytest

from softprompt.config import DEFAULT_LR, MODEL_TUNING_LR, TrainConfig
from softprompt.errors import SoftPromptError


def test_defaults_build():
    config = TrainConfig()
    assert (config.prompt_length, config.optimizer, config.route, config.valid_limit) == (20, "adamw", "auto", 300)
    assert config.learning_rate == DEFAULT_LR["adamw"] == 0.01


def test_a_valid_non_default_config_builds():
    config = TrainConfig(prompt_length=1, init="text:hello", optimizer="adafactor", lr=None, weight_decay=0.0,
                         batch_size=1, steps=1, eval_every=1, patience=0, valid_limit=None, max_input_tokens=1,
                         seed=7, route="auto", schedule="constant", method="prefix", objective="lm",
                         reparameterize=16, activation_checkpointing=True, compile=True,
                         compile_mode="max-autotune-no-cudagraphs")
    assert config.learning_rate == DEFAULT_LR["adafactor"] == 0.3
    assert TrainConfig(method="model-tuning", optimizer="adafactor").learning_rate == MODEL_TUNING_LR["adafactor"]
    assert TrainConfig(lr=0.5, valid_limit=1).learning_rate == 0.5
    assert TrainConfig(valid_limit=0).valid_limit is None  # 0: all, as on the command line
    assert TrainConfig(route="concat", method="model-tuning").route == "concat"
    assert TrainConfig(method="model-tuning", prompt_length=0, init="-").prompt_length == 0  # no prompt: sweep.py


def test_every_field_has_help():
    assert all(option.metadata.get("help") for option in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer": "sgd"}, "--optimizer: unknown optimizer 'sgd'; choose adamw, adafactor"),
    ({"schedule": "cosine"}, "--schedule: unknown schedule 'cosine'; choose linear, constant"),
    ({"method": "lora"}, "--method: unknown method 'lora'; choose prompt, prefix, model-tuning"),
    ({"objective": "mse"}, "--objective: unknown objective 'mse'; choose rank, lm"),
    ({"route": "cached"}, "--route: unknown route 'cached'; choose auto, concat"),
    ({"compile_mode": "fastest"}, "--compile-mode: unknown compile mode 'fastest'; choose default, reduce-overhead, "
                                  "max-autotune, max-autotune-no-cudagraphs (or None)"),
    ({"prompt_length": 0}, "--prompt-length must be >= 1, got 0"),
    ({"prompt_length": -1, "method": "model-tuning"}, "--prompt-length must be >= 0, got -1"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"steps": 0}, "--steps must be >= 1, got 0"),
    ({"eval_every": -3}, "--eval-every must be >= 1, got -3"),
    ({"max_input_tokens": 0}, "--max-length must be >= 1, got 0"),
    ({"patience": -1}, "--patience must be >= 0, got -1"),
    ({"valid_limit": -2}, "--valid-limit must be >= 1, or 0 for all, got -2"),
    ({"method": "model-tuning", "compile": True}, "--compile compiles the frozen layers for the packed prompt pass; "
                                                  "--method model-tuning trains every weight and does not use it"),
    ({"method": "model-tuning", "compile_mode": "default"}, "--compile compiles the frozen layers for the packed "
     "prompt pass; --method model-tuning trains every weight and does not use it"),
    ({"method": "prefix", "route": "concat"}, "--route concat puts prompt embeddings in front of the tokens; deep "
                                              "prompts (--method prefix) are keys/values at every layer"),
    ({"lr": 0.0}, "--lr must be finite and > 0, got 0.0"),
    ({"lr": -0.1}, "--lr must be finite and > 0, got -0.1"),
    ({"lr": float("nan")}, "--lr must be finite and > 0, got nan"),
    ({"lr": float("inf")}, "--lr must be finite and > 0, got inf"),
    ({"weight_decay": -1e-5}, "--weight-decay must be finite and >= 0, got -1e-05"),
    ({"weight_decay": float("nan")}, "--weight-decay must be finite and >= 0, got nan"),
    ({"reparameterize": -1, "method": "prefix"}, "--reparameterize must be >= 0, got -1"),
    ({"reparameterize": 8}, "--reparameterize applies to deep prompts (--method prefix) only, not --method prompt"),
    ({"reparameterize": 8, "method": "model-tuning"},
     "--reparameterize applies to deep prompts (--method prefix) only, not --method model-tuning"),
    ({"init": ""}, "--init must be a non-empty string, got ''"),
    ({"init": "  "}, "--init must be a non-empty string, got '  '"),
    ({"init": None}, "--init must be a non-empty string, got None"),
])
def test_invalid_values_name_the_option(overrides, message):
    with pytest.raises(SoftPromptError, match=f"^{re.escape(message)}$"):
        TrainConfig(**overrides)


def test_replace_checks_again():
    with pytest.raises(SoftPromptError, match="^--steps must be >= 1, got 0$"):
        dataclasses.replace(TrainConfig(), steps=0)


def test_a_built_config_cannot_change_unchecked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().steps = 0
