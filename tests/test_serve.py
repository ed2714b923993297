"""PromptBank and the HTTP server on a tiny model: mixed batches equal single answers; every bad input."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from softprompt.bank import PromptBank
from softprompt.data import Example
from softprompt.ensemble import ensemble
from softprompt.evaluate import Prediction, predict
from softprompt.prompt import SoftPrompt
from softprompt.serve import create_app
from softprompt.tasks import TaskSpec

TASKS = {
    "sentiment": (TaskSpec(name="sentiment", template="Review: {text}\nSentiment:", labels=["negative", "positive"]),
                  4),
    "topic": (TaskSpec(name="topic", template="Post: {text}\nNewsgroup:",
                       labels=["comp.graphics", "lazy dog", "fox"]), 7),
    "nli": (TaskSpec(name="nli", template="{premise}\nQuestion: {hypothesis}?", labels=["no", "yes"]), 2),
}
TEXTS = ["a great movie", "dull, boring and far too long for what it is", "the graphics card driver crashed"]


@pytest.fixture
def served(tmp_path, llama_backbone):
    from conftest import make_backbone

    torch.manual_seed(0)
    prompts = {}
    for name, (task, length) in TASKS.items():
        prompts[name] = SoftPrompt(torch.randn(length, llama_backbone.d_model), llama_backbone.name,
                                   llama_backbone.fingerprint, task)
        prompts[name].save(tmp_path / f"{name}.safetensors")
    other = make_backbone("llama", seed=1)
    SoftPrompt(torch.randn(3, other.d_model), "other-model", other.fingerprint, TASKS["sentiment"][0]).save(
        tmp_path / "foreign.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a prompt")
    bank = PromptBank.from_directory(llama_backbone, tmp_path)
    return bank, prompts, tmp_path


def test_bank_rejects_foreign_and_broken_files(served):
    bank, _, _ = served
    assert sorted(bank.snapshot.entries) == ["nli", "sentiment", "topic"]
    assert "other-model" in bank.snapshot.rejected["foreign.safetensors"]
    assert "not a readable safetensors file" in bank.snapshot.rejected["broken.safetensors"]


@pytest.mark.parametrize("names", [["sentiment", "topic", "nli", "sentiment"], ["sentiment", "nli", "sentiment"]])
def test_mixed_batch_equals_one_prompt_at_a_time(served, llama_backbone, names):
    """Prompts of 4, 7 and 2 slots: a batch attends over the slots its own prompts fill (7, or 4 without "topic"),
    padded where they differ; one prompt alone has no padded slot at all."""
    bank, prompts, _ = served
    fields = {"sentiment": [{"text": TEXTS[0]}, {"text": TEXTS[1]}], "topic": [{"text": TEXTS[2]}],
              "nli": [{"premise": TEXTS[1], "hypothesis": "it is long"}]}
    requests = [(name, fields[name][names[:i].count(name)]) for i, name in enumerate(names)]
    mixed = bank.classify(requests)
    for (name, fields), answer in zip(requests, mixed):
        (alone,) = bank.classify([(name, fields)])
        (reference,) = predict(llama_backbone, prompts[name], [Example(fields, None, None, "r")])
        assert answer.label == alone.label == reference.label
        for label in answer.scores:
            assert abs(answer.scores[label] - alone.scores[label]) < 1e-5
            assert abs(answer.scores[label] - reference.scores[label]) < 1e-5


def test_padding_bounded_batches():
    from softprompt.evaluate import padding_bounded_batches

    assert padding_bounded_batches([10, 10, 40, 12, 41], 0.25) == [[0, 1, 3], [2, 4]]
    assert padding_bounded_batches([10, 10, 40, 12, 41], 1.0) == [[0, 1, 3, 2, 4]]
    assert padding_bounded_batches([], 0.25) == []


def test_a_ragged_batch_runs_as_length_sorted_parts_on_a_cpu(served, llama_backbone, monkeypatch):
    """On a CPU whose backbone computes padding, rows of very different lengths run as separate forward passes
    (padding costs compute there); the answers are the same as one pass."""
    bank, _, _ = served
    requests = [("sentiment", {"text": "wit"}), ("sentiment", {"text": " ".join(TEXTS * 4)}),
                ("sentiment", {"text": "dull"})]
    calls = []
    forward = llama_backbone.target_logprobs
    monkeypatch.setattr(llama_backbone, "target_logprobs", lambda batch, **kw: calls.append(batch) or forward(
        batch, **kw))
    assert PromptBank(llama_backbone).max_padding == 1.0  # the default where the backbone drops padding itself
    llama_backbone.drops_padding = False
    assert PromptBank(llama_backbone).max_padding == 0.25  # the default on a CPU that computes padding
    bank.max_padding = 0.25
    split = bank.classify(requests)
    bank.max_padding = 1.0
    whole = bank.classify(requests)
    assert [len(batch.input_ids) for batch in calls] == [2, 1, 3]
    for a, b in zip(split, whole):
        assert a.label == b.label and all(abs(a.scores[k] - b.scores[k]) < 1e-5 for k in a.scores)


def test_ensemble_vote_and_mean():
    a = Prediction("x", {"x": 0.6, "y": 0.4})
    b = Prediction("y", {"x": 0.1, "y": 0.9})
    c = Prediction("x", {"x": 0.55, "y": 0.45})
    answer = ensemble([a, b, c])
    assert answer.label == "x" and answer.votes == {"x": 2, "y": 1}
    assert answer.mean_label == "y" and abs(answer.scores["y"] - (0.4 + 0.9 + 0.45) / 3) < 1e-12


@pytest.fixture
def client(served):
    bank, _, _ = served
    with TestClient(create_app(bank, api_key="secret", max_batch=8, max_wait_ms=500)) as test_client:
        test_client.headers["Authorization"] = "Bearer secret"
        yield test_client


def test_concurrent_requests_are_batched_and_match_single_answers(client, served):
    bank, _, _ = served
    bodies = [{"prompt": ["sentiment", "topic"][i % 2], "inputs": [TEXTS[i % 3]]} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: client.post("/v1/classify", json=body), bodies))
    assert all(a.status_code == 200 for a in answers)
    for body, answer in zip(bodies, answers):
        (alone,) = bank.classify([(body["prompt"], {"text": body["inputs"][0]})])
        for label, score in answer.json()["results"][0]["scores"].items():
            assert abs(score - alone.scores[label]) < 1e-5
    metrics = client.get("/metrics").text
    batches = int(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("softprompt_batches")))
    assert batches < 8  # at least two requests shared a forward pass
    assert 'softprompt_requests_total{path="/v1/classify",status="200"} 8' in metrics
    model_seconds = float(next(line.split()[-1] for line in metrics.splitlines()
                               if line.startswith("softprompt_batch_seconds_sum")))
    assert model_seconds > 0 and f"softprompt_batch_seconds_count {batches}" in metrics


def test_concurrent_generate_requests_share_batches_across_prompts(client, served, llama_backbone):
    """Generation requests for two prompts (3 and 6 slots) with their own max_new_tokens decode in shared batches,
    each answer the one its request gets alone and the one `evaluate.generate` gives."""
    from softprompt.evaluate import generate

    bank, _, directory = served
    task = TaskSpec(name="qa", template="Question: {question}\nAnswer:", labels=None, label_field="answer")
    prompts = {name: SoftPrompt(torch.randn(length, llama_backbone.d_model) * 4, llama_backbone.name,
                                llama_backbone.fingerprint, task) for name, length in [("qa", 3), ("qa6", 6)]}
    for name, prompt in prompts.items():
        prompt.save(directory / f"{name}.safetensors")
    assert client.post("/v1/prompts/reload").json()["added"] == ["qa", "qa6"]
    questions = ["what is two plus two?", "who wrote it", "why", "is the sky blue on a dull day"]
    bodies = [{"prompt": ["qa", "qa6"][i % 2], "inputs": [questions[i % 4]], "max_new_tokens": 3 + i % 3}
              for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: client.post("/v1/generate", json=body), bodies))
    assert all(a.status_code == 200 for a in answers)
    texts = [a.json()["results"][0]["text"] for a in answers]
    assert len(set(texts)) > 1
    for body, text in zip(bodies, texts):
        fields = {"question": body["inputs"][0]}
        assert text == bank.generate(body["prompt"], [fields], body["max_new_tokens"])[0]
        task_tokenizer = bank.entry(body["prompt"]).task_tokenizer
        items = task_tokenizer.encode_all([Example(fields, None, None, "r")])
        prompt = prompts[body["prompt"]]
        assert text == generate(llama_backbone, task_tokenizer, items, prompt, body["max_new_tokens"])[0]
    metrics = client.get("/metrics").text
    batches = int(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("softprompt_generate_batches_total")))
    assert 0 < batches < 8  # requests shared decoding batches
    assert "softprompt_batches_total 0" in metrics  # the classify batcher saw none of them


def test_list_prompts_shows_served_and_rejected(client):
    body = client.get("/v1/prompts").json()
    assert [p["name"] for p in body["prompts"]] == ["nli", "sentiment", "topic"]
    topic = next(p for p in body["prompts"] if p["name"] == "topic")
    assert topic["labels"] == ["comp.graphics", "lazy dog", "fox"] and topic["length"] == 7
    assert {r["file"] for r in body["rejected"]} == {"broken.safetensors", "foreign.safetensors"}


def test_ensemble_endpoint(client):
    answer = client.post("/v1/ensemble", json={"prompts": ["sentiment", "sentiment"], "inputs": [TEXTS[0]]})
    assert answer.status_code == 200
    result = answer.json()["results"][0]
    assert result["votes"][result["label"]] == 2
    mismatched = client.post("/v1/ensemble", json={"prompts": ["sentiment", "topic"], "inputs": ["x"]})
    assert mismatched.status_code == 422 and "share labels" in mismatched.json()["detail"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompt": "nope", "inputs": ["x"]}, 404, "unknown prompt 'nope'"),
        ({"prompt": "sentiment"}, 422, "inputs"),
        ({"prompt": "sentiment", "inputs": []}, 422, "inputs"),
        ({"prompt": "nli", "inputs": ["just text"]}, 422, "has fields ['premise', 'hypothesis']"),
        ({"prompt": "nli", "inputs": [{"premise": "a"}]}, 422, "template field 'hypothesis' is not in the row"),
        ({"prompt": "sentiment", "inputs": ["x"] * 9}, 413, "the limit is 8"),
        ({"prompt": "sentiment", "inputs": ["x" * 20_001]}, 413, "the limit is 20000"),
    ],
)
def test_bad_requests(client, body, status, message):
    answer = client.post("/v1/classify", json=body)
    assert answer.status_code == status
    assert message in json.dumps(answer.json()["detail"])


def test_api_key(client):
    assert client.get("/v1/prompts", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/prompts", headers={"Authorization": "", "X-API-Key": "secret"}).status_code == 200
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200


def test_hot_reload_under_traffic_loses_no_request(client, served, llama_backbone):
    bank, _, directory = served
    statuses, stop = [], threading.Event()

    def traffic():
        while not stop.is_set() and len(statuses) < 200:
            statuses.append(client.post("/v1/classify", json={"prompt": "sentiment", "inputs": [TEXTS[0]]})
                            .status_code)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    SoftPrompt(torch.randn(5, llama_backbone.d_model), llama_backbone.name, llama_backbone.fingerprint,
               TASKS["sentiment"][0]).save(directory / "sentiment-v2.safetensors")
    (directory / "topic.safetensors").unlink()
    changes = client.post("/v1/prompts/reload").json()
    stop.set()
    for worker in workers:
        worker.join()
    assert changes["added"] == ["sentiment-v2"] and changes["removed"] == ["topic"]
    assert statuses and all(status == 200 for status in statuses)
    assert client.post("/v1/classify", json={"prompt": "sentiment-v2", "inputs": ["x"]}).status_code == 200
    assert client.post("/v1/classify", json={"prompt": "topic", "inputs": ["x"]}).status_code == 404


def test_per_prompt_batching_never_mixes_prompts(served):
    """The baseline mode: every forward pass holds one prompt only (and answers stay the same)."""
    bank, _, _ = served
    seen = []
    original = bank.classify

    def recording(requests, snapshot=None):
        seen.append({name for name, _ in requests})
        return original(requests, snapshot)

    bank.classify = recording
    with TestClient(create_app(bank, max_batch=8, max_wait_ms=500, batching="per-prompt")) as test_client:
        bodies = [{"prompt": ["sentiment", "topic"][i % 2], "inputs": [TEXTS[i % 3]]} for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda body: test_client.post("/v1/classify", json=body), bodies))
    assert all(a.status_code == 200 for a in answers)
    assert seen and all(len(names) == 1 for names in seen)
    assert sum(1 for names in seen) < 8  # same-prompt requests still share a pass


def test_generate_endpoint(client, served, llama_backbone):
    from softprompt.evaluate import generate

    bank, _, directory = served
    task = TaskSpec(name="qa", template="Question: {question}\nAnswer:", labels=None, label_field="answer")
    prompt = SoftPrompt(torch.randn(3, llama_backbone.d_model), llama_backbone.name, llama_backbone.fingerprint, task)
    prompt.save(directory / "qa.safetensors")
    assert client.post("/v1/prompts/reload").json()["added"] == ["qa"]
    answer = client.post("/v1/generate", json={"prompt": "qa", "inputs": ["what is two plus two?"],
                                               "max_new_tokens": 5})
    assert answer.status_code == 200
    task_tokenizer = bank.entry("qa").task_tokenizer
    items = task_tokenizer.encode_all([Example({"question": "what is two plus two?"}, None, None, "r")])
    assert answer.json()["results"][0]["text"] == generate(llama_backbone, task_tokenizer, items, prompt, 5)[0]
    wrong = client.post("/v1/classify", json={"prompt": "qa", "inputs": ["x"]})
    assert wrong.status_code == 422 and "/v1/generate" in wrong.json()["detail"]
    wrong = client.post("/v1/generate", json={"prompt": "sentiment", "inputs": ["x"]})
    assert wrong.status_code == 422 and "classifier" in wrong.json()["detail"]
    wrong = client.post("/v1/ensemble", json={"prompts": ["sentiment", "qa"], "inputs": ["x"]})
    assert wrong.status_code == 422 and "'qa' generates text: use POST /v1/generate" in wrong.json()["detail"]
