import pytest

from softprompt import models
from softprompt.errors import SoftPromptError


def test_unknown_model_lists_known_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SoftPromptError, match="unknown model 'gpt-17'.*smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b"):
        models.resolve("gpt-17")
    with pytest.raises(SoftPromptError, match="unknown built-in model 'gpt-17'"):
        models.pull("gpt-17")


def test_directory_without_config(tmp_path):
    with pytest.raises(SoftPromptError, match="has no config.json"):
        models.resolve(str(tmp_path))


def test_hf_id_not_in_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SoftPromptError, match="not in the local Hugging Face cache"):
        models.resolve("nobody/no-such-model")


def test_cache_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    assert models.cached_model_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"
    rows = {row["name"]: row for row in models.model_table()}
    assert set(rows) == set(models.BUILTIN_MODELS) and not rows["gemma3-270m"]["cached"]


def test_local_directory_loads(tmp_path):
    from conftest import make_backbone

    from softprompt.loader import load_model

    tiny = make_backbone("qwen2")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.fingerprint == tiny.fingerprint
    assert all(not p.requires_grad for p in loaded.model.parameters())
