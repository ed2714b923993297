"""PEFT adapters and paper .npy prompts, checked against the real `peft` package."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

from softprompt.data import Example, TaskTokenizer
from softprompt.errors import SoftPromptError
from softprompt.evaluate import predict
from softprompt.interop import export_peft, export_prompt_embeds, import_npy, import_peft, request_embeddings
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec

TASK = TaskSpec(name="s", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
EXAMPLES = [Example({"text": t}, None, None, "r") for t in ["a great movie", "dull, boring and far too long"]]


def peft_probabilities(backbone, peft_model, k):
    """PEFT's own forward: label-token probabilities at the last input position."""
    task_tokenizer = TaskTokenizer(backbone, TASK)
    labels = torch.tensor([ids[0] for ids in task_tokenizer.label_ids])
    rows = []
    with torch.no_grad():
        for item in task_tokenizer.encode_all(EXAMPLES):
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


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: BOS in front and embeddings scaled by sqrt(d)
def test_request_embeddings_fed_as_inputs_embeds_reproduce_our_scores(tmp_path, arch):
    from conftest import make_backbone
    from safetensors import safe_open

    backbone = make_backbone(arch)
    prompt = SoftPrompt(torch.randn(4, backbone.d_model) * 0.5, backbone.name, backbone.fingerprint, TASK)
    requests = request_embeddings(backbone, prompt, EXAMPLES)
    label_ids = TaskTokenizer(backbone, TASK).label_ids
    rows = []
    with torch.no_grad():
        for embeds in requests:  # a plain full forward, no softprompt code: what an engine does with the tensor
            scores = []
            for ids in label_ids:
                continuation = backbone.model.get_input_embeddings()(torch.tensor(ids[:-1], dtype=torch.long))
                logits = backbone.model(inputs_embeds=torch.cat([embeds, continuation])[None]).logits[0]
                logprobs = logits[len(embeds) - 1:].log_softmax(-1)
                scores.append(sum(logprobs[i, token] for i, token in enumerate(ids)))
            rows.append(torch.stack(scores).softmax(0))
    torch.testing.assert_close(torch.stack(rows), ours_probabilities(backbone, prompt), atol=1e-5, rtol=1e-4)
    first = TaskTokenizer(backbone, TASK).encode(EXAMPLES[0])
    assert len(requests[0]) == len(backbone.bos_ids) + 4 + len(first.input_ids)

    path = export_prompt_embeds(prompt, backbone, tmp_path / "p.embeds.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        prefix, metadata = handle.get_tensor("prefix_embeds"), handle.metadata()
    torch.testing.assert_close(prefix, requests[0][: len(prefix)])
    assert TaskSpec.from_dict(json.loads(metadata["task"])) == TASK
    expected_scale = backbone.d_model ** 0.5 if arch == "gemma3" else 1.0
    assert float(metadata["embedding_scale"]) == pytest.approx(expected_scale, rel=1e-6)


def test_deep_prompts_cannot_become_request_embeddings(llama_backbone):

    deep = SoftPrompt(None, llama_backbone.name, llama_backbone.fingerprint, TASK,
                      key_values=llama_backbone.deep_prompt_from_embeddings(torch.randn(3, llama_backbone.d_model)))
    with pytest.raises(SoftPromptError, match="prompt_embeds input holds input embeddings; this is a prefix"):
        request_embeddings(llama_backbone, deep, EXAMPLES)
