"""PEFT adapters and paper .npy prompts, checked against the real `peft` package."""

import numpy as np
import pytest
import torch
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

from softprompt.data import Encoder, Example
from softprompt.errors import SoftPromptError
from softprompt.evaluate import predict
from softprompt.interop import export_peft, import_npy, import_peft
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec

TASK = TaskSpec(name="s", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
EXAMPLES = [Example({"text": t}, None, None, "r") for t in ["a great movie", "dull, boring and far too long"]]


def peft_probabilities(backbone, peft_model, k):
    """PEFT's own forward: label-token probabilities at the last input position."""
    encoder = Encoder(backbone, TASK)
    labels = torch.tensor([ids[0] for ids in encoder.label_ids])
    rows = []
    with torch.no_grad():
        for item in encoder.encode_all(EXAMPLES):
            logits = peft_model(input_ids=torch.tensor([item.input_ids])).logits[0, -1]
            rows.append(logits.log_softmax(-1)[labels].softmax(0))
    return torch.stack(rows)


def ours_probabilities(backbone, prompt):
    return torch.tensor([[p.scores[label] for label in TASK.labels] for p in predict(backbone, prompt, EXAMPLES)])


def test_export_loads_in_peft_with_the_same_scores(tmp_path, llama_backbone):
    prompt = SoftPrompt(torch.randn(5, llama_backbone.d_model), llama_backbone.name, llama_backbone.fingerprint,
                        TASK)
    export_peft(prompt, tmp_path / "adapter", llama_backbone)
    peft_model = PeftModel.from_pretrained(llama_backbone.model, tmp_path / "adapter")
    expected = ours_probabilities(llama_backbone, prompt)
    torch.testing.assert_close(peft_probabilities(llama_backbone, peft_model, 5), expected, atol=1e-5, rtol=1e-4)


def test_peft_adapter_imports_with_the_same_scores(tmp_path, llama_backbone):
    torch.manual_seed(3)
    peft_model = get_peft_model(llama_backbone.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                         num_virtual_tokens=6))
    peft_model.save_pretrained(tmp_path / "trained-by-peft")
    expected = peft_probabilities(llama_backbone, peft_model, 6)
    prompt = import_peft(tmp_path / "trained-by-peft", llama_backbone, TASK)
    assert prompt.length == 6 and prompt.fingerprint == llama_backbone.fingerprint
    torch.testing.assert_close(ours_probabilities(llama_backbone, prompt), expected, atol=1e-5, rtol=1e-4)


def test_other_adapter_types_are_refused(tmp_path, llama_backbone):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(SoftPromptError, match="holds a PEFT LORA adapter"):
        import_peft(tmp_path / "lora", llama_backbone, TASK)
    with pytest.raises(SoftPromptError, match="not a PEFT adapter directory"):
        import_peft(tmp_path, llama_backbone, TASK)


def test_npy_shapes_are_checked(tmp_path, llama_backbone):
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.ones((7, llama_backbone.d_model), dtype=np.float32))
    np.save(bad, np.ones((7, 4096), dtype=np.float32))
    assert import_npy(good, llama_backbone, TASK).length == 7
    with pytest.raises(SoftPromptError, match=r"shape \[7, 4096\], but 'tiny-llama' needs \[K, 32\]"):
        import_npy(bad, llama_backbone, TASK)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SoftPromptError, match="not a readable .npy"):
        import_npy(tmp_path / "objects.npy", llama_backbone, TASK)
