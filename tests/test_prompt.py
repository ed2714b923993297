import pytest
import safetensors.torch
import torch

from softprompt.errors import SoftPromptError
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec

TASK = TaskSpec(name="sentiment", template="Review: {text}\nSentiment:", labels=["negative", "positive"])


def make_prompt(backbone, length=4):
    return SoftPrompt(torch.randn(length, backbone.d_model), backbone.name, backbone.fingerprint, TASK,
                      init="vocab", training={"best_valid_accuracy": 0.9})


def test_round_trip_keeps_tensor_and_metadata(tmp_path, llama_backbone):
    prompt = make_prompt(llama_backbone)
    prompt.save(tmp_path / "p.safetensors")
    loaded = SoftPrompt.load(tmp_path / "p.safetensors")
    torch.testing.assert_close(loaded.embeddings, prompt.embeddings, rtol=0, atol=0)
    assert loaded.task == TASK and loaded.init == "vocab" and loaded.training == {"best_valid_accuracy": 0.9}
    assert loaded.base_model == "tiny-llama" and loaded.fingerprint == llama_backbone.fingerprint
    assert (tmp_path / "p.safetensors").stat().st_size < 10_000  # a few KB


def test_truncated_file_is_reported(tmp_path, llama_backbone):
    path = make_prompt(llama_backbone).save(tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(SoftPromptError, match="not a readable safetensors file"):
        SoftPrompt.load(path)


def test_other_safetensors_file_is_not_a_prompt(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(SoftPromptError, match="not a softprompt prompt file"):
        SoftPrompt.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(SoftPromptError, match="does not exist"):
        SoftPrompt.load(tmp_path / "nope.safetensors")


def test_prompt_for_another_model_names_both():
    from conftest import make_backbone

    trained_on, other = make_backbone("llama", seed=0), make_backbone("llama", seed=1)
    other.name = "other-model"
    with pytest.raises(SoftPromptError, match="trained on 'tiny-llama'.*loaded model is 'other-model'"):
        make_prompt(trained_on).check_backbone(other)


def test_interrupted_save_keeps_previous_file(tmp_path, llama_backbone, monkeypatch):
    path = tmp_path / "p.safetensors"
    first = make_prompt(llama_backbone)
    first.save(path)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("softprompt.prompt.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        make_prompt(llama_backbone).save(path)
    torch.testing.assert_close(SoftPrompt.load(path).embeddings, first.embeddings)
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left behind


def test_saved_file_has_ordinary_permissions(tmp_path, llama_backbone):
    import os

    mask = os.umask(0o022)
    try:
        path = make_prompt(llama_backbone).save(tmp_path / "p.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_read_metadata_reads_the_header_only_and_tolerates_junk(tmp_path):
    prompt = SoftPrompt(torch.randn(3, 8), "some-model", "abc", TaskSpec(labels=["a", "b"]))
    prompt.save(tmp_path / "p.safetensors")
    assert SoftPrompt.read_metadata(tmp_path / "p.safetensors")["base_model"] == "some-model"
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert SoftPrompt.read_metadata(tmp_path / "junk.safetensors") is None
