"""Property-based hostile input (#18): whatever a client sends, the server answers 2xx/4xx and keeps serving;
whatever bytes or metadata a prompt file holds, a reload never fails and never serves a bad file."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_serve import TASKS, TEXTS, served  # noqa: F401 (a fixture)

from softprompt.bank import PromptBank
from softprompt.prompt import FORMAT, SoftPrompt
from softprompt.serve import create_app

FIXTURES_OK = settings(max_examples=150, deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

hostile_text = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "bad \udfff x", "\x00", "é" * 30]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), hostile_text),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=12)
prompt_names = st.one_of(st.sampled_from(["sentiment", "topic", "nli", "../etc/passwd", ""]), hostile_text)
inputs = st.lists(st.one_of(hostile_text, st.dictionaries(st.sampled_from(["text", "premise", "hypothesis", "x"]),
                                                          json_values, max_size=3), json_values), max_size=4)
bodies = st.fixed_dictionaries({}, optional={"prompt": st.one_of(prompt_names, json_values), "inputs": inputs,
                                             "prompts": st.lists(prompt_names, max_size=3),
                                             "max_new_tokens": json_values})


@pytest.fixture
def client(served):  # noqa: F811
    bank, _, _ = served
    with TestClient(create_app(bank, max_batch=8, max_wait_ms=1)) as test_client:
        yield test_client


@FIXTURES_OK
@given(path=st.sampled_from(["/v1/classify", "/v1/generate", "/v1/ensemble"]), body=bodies)
def test_no_request_body_makes_the_server_fail(client, path, body):
    answer = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert answer.status_code < 500, (body, answer.text)


@FIXTURES_OK
@given(path=st.sampled_from(["/v1/classify", "/v1/generate", "/v1/ensemble"]), raw=st.binary(max_size=200))
def test_no_raw_bytes_make_the_server_fail(client, path, raw):
    answer = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert answer.status_code < 500


def test_after_the_fuzzing_good_requests_get_their_normal_answers(client):
    body = {"prompt": "sentiment", "inputs": [TEXTS[0]]}
    first = client.post("/v1/classify", json=body).json()
    client.post("/v1/classify", content=b'{"prompt": "sentiment", "inputs": ["\\ud800"]}',
                headers={"content-type": "application/json"})
    assert client.post("/v1/classify", json=body).json() == first


@pytest.fixture
def directory_bank(tmp_path, llama_backbone):
    good = SoftPrompt(torch.randn(3, 32), llama_backbone.name, llama_backbone.fingerprint, TASKS["sentiment"][0])
    good.save(tmp_path / "good.safetensors")
    return PromptBank.from_directory(llama_backbone, tmp_path), tmp_path, llama_backbone


def reload_and_check(bank, directory):
    bank.reload()
    assert "good" in bank.snapshot.entries  # the other prompt is never hurt
    for entry in bank.snapshot.entries.values():  # what is served is a checked prompt
        assert entry.prompt.tensor.dtype == torch.float32 and bool(torch.isfinite(entry.prompt.tensor).all())
    assert bank.classify([("good", {"text": TEXTS[0]})])[0].label in ("negative", "positive")


@FIXTURES_OK
@given(cut=st.integers(min_value=0, max_value=400), flips=st.lists(st.tuples(st.integers(0, 2000),
                                                                               st.integers(0, 255)), max_size=6))
def test_damaged_prompt_file_bytes_never_break_a_reload(directory_bank, cut, flips):
    bank, directory, backbone = directory_bank
    topic = SoftPrompt(torch.randn(4, 32), backbone.name, backbone.fingerprint, TASKS["topic"][0])
    topic.save(directory / "x.safetensors")
    data = bytearray((directory / "x.safetensors").read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    (directory / "x.safetensors").write_bytes(bytes(data[: len(data) - cut]))
    reload_and_check(bank, directory)


@FIXTURES_OK
@given(meta=st.dictionaries(st.sampled_from(["base_model", "fingerprint", "task", "init", "training"]),
                            json_values, max_size=5),
       task=st.dictionaries(st.sampled_from(["name", "template", "labels", "verbalizer", "extra", "metric"]),
                            json_values, max_size=5),
       shape=st.sampled_from([(0, 32), (3, 32), (3, 31), (3,), (2, 2, 32)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
       fill=st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))
def test_hostile_prompt_metadata_and_tensors_never_break_a_reload(directory_bank, meta, task, shape, dtype, fill):
    bank, directory, backbone = directory_bank
    meta = {"base_model": backbone.name, "fingerprint": backbone.fingerprint, **meta,
            "task": {**TASKS["sentiment"][0].to_dict(), **task}}
    tensor = torch.full(shape, fill).to(dtype)
    save_file({"prompt": tensor}, str(directory / "x.safetensors"),
              metadata={"format": FORMAT, "softprompt": json.dumps(meta)})
    reload_and_check(bank, directory)
