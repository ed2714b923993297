"""Issue #18: one bad request or file never hurts anyone else (server, prompt files, batcher)."""

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from test_serve import TASKS, TEXTS, served  # noqa: F401 (a fixture)

from softprompt.bank import PromptBank
from softprompt.errors import SoftPromptError
from softprompt.prompt import FORMAT, SoftPrompt
from softprompt.serve import create_app
from softprompt.serve.batcher import Batcher, QueueFull


def test_a_failing_batch_fails_only_the_request_that_broke_it():
    """The batcher splits a failing batch until the culprit runs alone: every other job gets its answer."""
    runs = []

    def run(items):
        runs.append(list(items))
        if "poison" in items:
            raise ValueError("this input breaks the model")
        return [item.upper() for item in items]

    async def main():
        batcher = Batcher(run, max_batch=16, max_wait_ms=200)
        jobs = [batcher.submit(["poison" if i == 5 else f"ok{i}"]) for i in range(9)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        batcher.close()
        return results

    results = asyncio.run(main())
    assert isinstance(results[5], ValueError)
    assert [r for i, r in enumerate(results) if i != 5] == [[f"OK{i}"] for i in range(9) if i != 5]
    assert len(runs[0]) == 9  # they did share a batch first
    assert ["poison"] in runs  # and the culprit ran alone in the end


def test_a_full_queue_answers_busy_instead_of_growing():
    release = threading.Event()

    def run(items):
        release.wait(5)
        return items

    async def main():
        batcher = Batcher(run, max_batch=1, max_wait_ms=0, max_queued=2)
        first = asyncio.ensure_future(batcher.submit(["a"]))
        second = asyncio.ensure_future(batcher.submit(["b"]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="2 inputs are waiting"):
            await batcher.submit(["c"])
        release.set()
        answers = await asyncio.gather(first, second)
        assert await batcher.submit(["d"]) == ["d"]  # room again once the queue drained
        batcher.close()
        return answers

    assert asyncio.run(main()) == [["a"], ["b"]]


def test_a_poisoned_input_among_concurrent_good_ones(served):  # noqa: F811
    bank, _, _ = served
    good = {"prompt": "sentiment", "inputs": [TEXTS[0]]}
    with TestClient(create_app(bank, max_batch=32, max_wait_ms=200)) as client:
        expected = client.post("/v1/classify", json=good).json()
        bodies = [good] * 12 + [{"prompt": "sentiment", "inputs": ["bad \ud800 x"]}] * 3
        with ThreadPoolExecutor(15) as pool:  # the body as JSON escapes: the client library would refuse "\ud800"
            answers = list(pool.map(lambda body: client.post("/v1/classify", content=json.dumps(body),
                                                             headers={"content-type": "application/json"}), bodies))
    assert [a.status_code for a in answers] == [200] * 12 + [422] * 3
    assert all(a.json() == expected for a in answers[:12])
    assert "field 'text' is not valid Unicode text" in answers[-1].json()["detail"]


@pytest.mark.parametrize("body", [
    '{"prompt": "qa", "inputs": ["x"], "max_new_tokens": 1e400}',
    '{"prompt": "qa", "inputs": ["x"], "max_new_tokens": NaN}',
    '{"prompt": "sentiment", "inputs": [{"text": 5}]}',
    '{"prompt": "\\ud800", "inputs": ["x"]}',
])
def test_unencodable_or_wrong_json_values_are_a_422_that_echoes_nothing(served, body):  # noqa: F811
    bank, _, _ = served
    with TestClient(create_app(bank)) as client:
        answer = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code in (404, 422)
    detail = answer.json()["detail"]
    assert isinstance(detail, str) or all(set(problem) == {"loc", "msg", "type"} for problem in detail)


def test_a_non_ascii_api_key_is_a_401(served):  # noqa: F811
    bank, _, _ = served
    with TestClient(create_app(bank, api_key="secret")) as client:
        answer = client.post("/v1/classify", json={"prompt": "sentiment", "inputs": ["x"]},
                             headers={"X-API-Key": "clé".encode()})
        assert answer.status_code == 401


def test_metrics_label_routes_not_raw_paths(served):  # noqa: F811
    bank, _, _ = served
    with TestClient(create_app(bank)) as client:
        for number in range(50):
            client.get(f"/x%22%7Dfake_metric%201%0A%23{number}")  # /x"}fake_metric 1\n#N once decoded
        client.post("/v1/classify", json={"prompt": "sentiment", "inputs": ["x"]})
        metrics = client.get("/metrics").text
        assert client.get("/docs").status_code == client.get("/openapi.json").status_code == 404
    assert "fake_metric" not in metrics
    assert 'softprompt_requests_total{path="unmatched",status="404"} 50' in metrics
    assert 'softprompt_requests_total{path="/v1/classify",status="200"} 1' in metrics
    assert len(metrics.splitlines()) < 60  # bounded whatever the clients send


def prompt_file(path, tensors, meta):
    save_file(tensors, str(path), metadata={"format": FORMAT, "softprompt": meta})


def good_meta(backbone, **changes):
    meta = {"base_model": backbone.name, "fingerprint": backbone.fingerprint,
            "task": TASKS["sentiment"][0].to_dict(), **changes}
    return json.dumps(meta)


@pytest.mark.parametrize("name, tensors, meta, reason", [
    ("json", {"prompt": torch.zeros(2, 32)}, "{not json", "metadata is not valid JSON"),
    ("missing", {"prompt": torch.zeros(2, 32)}, '{"task": {}}', "metadata field 'base_model' must be a str"),
    ("task-string", {"prompt": torch.zeros(2, 32)}, None, "metadata field 'task' must be a dict"),
    ("k0", {"prompt": torch.zeros(0, 32)}, "good", "K=0 virtual tokens; K must be at least 1"),
    ("int", {"prompt": torch.zeros(2, 32, dtype=torch.int64)}, "good", "must be floating point"),
    ("nan", {"prompt": torch.full((2, 32), float("nan"))}, "good", "NaN or infinite"),
    ("long", {"prompt": torch.zeros(2000, 32)}, "good", "K=2000 virtual tokens; K must be at least 1 (this server "
                                                        "takes at most 1024)"),
    ("labels", {"prompt": torch.zeros(2, 32)}, "bad-labels", "task field 'labels' must be a list of strings"),
])
def test_a_malformed_prompt_file_is_skipped_with_its_reason(tmp_path, llama_backbone, name, tensors, meta, reason):
    SoftPrompt(torch.zeros(3, 32), llama_backbone.name, llama_backbone.fingerprint,
               TASKS["sentiment"][0]).save(tmp_path / "fine.safetensors")
    if meta == "good":
        meta = good_meta(llama_backbone)
    elif meta == "bad-labels":
        meta = good_meta(llama_backbone, task={"template": "{text}", "labels": "ab"})
    elif meta is None:
        meta = json.dumps({"base_model": "m", "fingerprint": "f", "task": "sentiment"})
    prompt_file(tmp_path / f"{name}.safetensors", tensors, meta)
    bank = PromptBank.from_directory(llama_backbone, tmp_path)
    assert list(bank.snapshot.entries) == ["fine"]
    assert reason in bank.snapshot.rejected[f"{name}.safetensors"]
    with pytest.raises(SoftPromptError, match="virtual tokens|metadata|floating|NaN|task field"):
        SoftPrompt.load(tmp_path / f"{name}.safetensors", max_length=1024)


def test_a_bad_new_version_keeps_the_last_good_one_served(served):  # noqa: F811
    bank, prompts, directory = served
    before = bank.classify([("sentiment", {"text": TEXTS[0]})])[0]
    (directory / "sentiment.safetensors").write_bytes(b"half-writ")  # overwritten in place, then cut short
    changed = bank.reload()
    assert "sentiment" in bank.snapshot.entries and "sentiment.safetensors" in changed["rejected"]
    assert "the last good version stays served" in bank.snapshot.rejected["sentiment.safetensors"]
    assert bank.classify([("sentiment", {"text": TEXTS[0]})])[0] == before
    prompts["sentiment"].save(directory / "sentiment.safetensors")  # mended: served again, rejection gone
    bank.reload()
    assert "sentiment.safetensors" not in bank.snapshot.rejected


def test_a_request_runs_on_the_snapshot_it_was_checked_against(served):  # noqa: F811
    """A reload that removes a prompt between a request's check and its batch does not fail that request."""
    bank, _, directory = served
    checked = bank.snapshot
    (directory / "topic.safetensors").unlink()
    bank.reload()
    assert "topic" not in bank.snapshot.entries
    from softprompt.bank import by_snapshot

    answers = by_snapshot(bank.classify, [(checked, ("topic", {"text": TEXTS[2]})),
                                          (bank.snapshot, ("sentiment", {"text": TEXTS[0]}))])
    assert answers[0].label in TASKS["topic"][0].labels and answers[1].label in ("negative", "positive")


@pytest.fixture
def live_server(served):  # noqa: F811
    """The real app under uvicorn on a loopback port, with short header and body timeouts."""
    import socket

    import uvicorn

    from softprompt.serve.connections import guarded_protocol

    bank, _, _ = served
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(bank, body_timeout_s=0.5), host="127.0.0.1", port=port, log_level="error",
                            http=guarded_protocol(0.5), limit_concurrency=64)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        threading.Event().wait(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def read_all(connection) -> bytes:
    connection.settimeout(10)  # far past the server's 0.5 s: the server must act first
    chunks = []
    while chunk := connection.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_connection_that_never_finishes_its_headers_is_closed(live_server):
    import socket

    with socket.create_connection(("127.0.0.1", live_server)) as stalled:
        stalled.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        assert read_all(stalled) == b""  # closed by the server, no answer
    with socket.create_connection(("127.0.0.1", live_server)) as fine:  # others are served meanwhile
        fine.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(fine).startswith(b"HTTP/1.1 200")


def test_a_stalled_body_gets_408(live_server):
    import socket

    with socket.create_connection(("127.0.0.1", live_server)) as stalled:
        stalled.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # 11 of 100 bytes
        assert read_all(stalled).startswith(b"HTTP/1.1 408")


# ---------- training: bad settings, files and resumes fail early and clearly ----------


def test_a_non_utf8_data_file_names_its_line(tmp_path):
    from softprompt.data import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "fine", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(SoftPromptError, match=r"rows\.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        read_rows(path)
    csv_path = tmp_path / "rows.csv"
    csv_path.write_bytes(b"text,label\nfine,a\n\nbad \xff,b\n")
    with pytest.raises(SoftPromptError, match=r"rows\.csv:4: not UTF-8 text"):
        read_rows(csv_path)


def test_a_broken_jsonl_line_names_the_column_where_it_breaks(tmp_path):
    from softprompt.data import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a great movie", "label": 1\n', encoding="utf-8")
    with pytest.raises(SoftPromptError, match=r"rows\.jsonl:1: invalid JSON \(Expecting ',' delimiter at column 37\)"):
        read_rows(path)


def test_a_one_row_file_says_it_is_too_small_to_split(tmp_path):
    from softprompt.data import load_dataset

    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n', encoding="utf-8")
    with pytest.raises(SoftPromptError, match=r"1 row\(s\) are too few to hold 1 out for validation.*--valid FILE"):
        load_dataset(str(path), labels=["x", "y"])


def test_a_prompt_longer_than_the_model_takes_is_refused_before_training(tmp_path, llama_backbone):
    from test_train import TASK, examples

    from softprompt.train import TrainConfig, train

    with pytest.raises(SoftPromptError, match=r"--prompt-length 100000 does not fit 'tiny-llama', which takes 512 "
                                              r"positions in all, input included"):
        train(llama_backbone, TASK, examples(8), examples(4), tmp_path / "p.safetensors",
              TrainConfig(prompt_length=100000), show_progress=False)
    assert not list(tmp_path.iterdir())


def test_saving_where_nothing_can_be_written_is_an_error_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    prompt = SoftPrompt(torch.zeros(2, 8), "m", "f", TASKS["sentiment"][0])
    with pytest.raises(SoftPromptError, match=r"cannot write .*file/p\.safetensors: .*nothing was written"):
        prompt.save(blocker / "p.safetensors")


def test_resume_refuses_other_settings_or_data_and_names_them(tmp_path, llama_backbone, monkeypatch):
    import sys

    from test_train import TASK, examples

    from softprompt.train import TrainConfig, train

    training = sys.modules["softprompt.train"]  # the module: `softprompt.train` the attribute is the function

    config = TrainConfig(batch_size=4, steps=8, eval_every=2, patience=0, valid_limit=None, lr=0.05)
    out = tmp_path / "p.safetensors"

    original = training.TrainingRun.evaluate
    calls = []

    def evaluate_once(self, loss):  # stop after the first checkpoint, as a kill -9 would
        original(self, loss)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.TrainingRun, "evaluate", evaluate_once)
    with pytest.raises(KeyboardInterrupt):
        train(llama_backbone, TASK, examples(8), examples(4, 50), out, config, show_progress=False)
    monkeypatch.setattr(training.TrainingRun, "evaluate", original)
    changed = dataclasses_replace(config, seed=3, lr=0.01)
    with pytest.raises(SoftPromptError, match=r"lr: 0\.05 then, 0\.01 now; seed: 0 then, 3 now \(--resume-anyway"):
        train(llama_backbone, TASK, examples(8), examples(4, 50), out, changed, resume=True, show_progress=False)
    with pytest.raises(SoftPromptError, match=r"data: '[0-9a-f]{16}' then, '[0-9a-f]{16}' now"):
        train(llama_backbone, TASK, examples(9), examples(4, 50), out, config, resume=True, show_progress=False)
    with pytest.raises(SoftPromptError, match=r"prompt_length: 20 then, 5 now$"):  # a shape: never
        train(llama_backbone, TASK, examples(8), examples(4, 50), out, dataclasses_replace(config, prompt_length=5),
              resume=True, resume_anyway=True, show_progress=False)
    result = train(llama_backbone, TASK, examples(8), examples(4, 50), out, changed, resume=True,
                   resume_anyway=True, show_progress=False)
    assert result.steps_run == 8


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_files_damaged_under_traffic_and_reloads_never_fail_an_untouched_prompt(served):  # noqa: F811
    """Overwritten, truncated, deleted and restored prompt files while requests and reloads run: every request
    for an untouched prompt answers as before, and the damaged prompt keeps its last good version."""
    bank, prompts, directory = served
    body = {"prompt": "sentiment", "inputs": [TEXTS[0]]}
    topic_body = {"prompt": "topic", "inputs": [TEXTS[2]]}
    good_topic = (directory / "topic.safetensors").read_bytes()
    with TestClient(create_app(bank, max_batch=8, max_wait_ms=2)) as client:
        expected, expected_topic = client.post("/v1/classify", json=body).json(), \
            client.post("/v1/classify", json=topic_body).json()
        answers, topic_answers, stop = [], [], threading.Event()

        def traffic():
            while not stop.is_set():
                answers.append(client.post("/v1/classify", json=body))

        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for worker in workers:
            worker.start()
        for round_number in range(12):
            path = directory / "topic.safetensors"
            damage = round_number % 3
            if damage == 0:
                path.write_bytes(good_topic[: len(good_topic) // 2])  # truncated in place
            elif damage == 1:
                path.write_bytes(b"\x00" * 64)  # overwritten with junk
            else:
                path.unlink()  # deleted
            assert client.post("/v1/prompts/reload").status_code == 200
            topic_answers.append(client.post("/v1/classify", json=topic_body))
            path.write_bytes(good_topic)  # restored
            assert client.post("/v1/prompts/reload").status_code == 200
        stop.set()
        for worker in workers:
            worker.join()
    assert len(answers) > 12 and [a.status_code for a in answers] == [200] * len(answers)
    def same(answer, reference):  # batch company changes the arithmetic order: equal up to float rounding
        (got,), (want,) = answer["results"], reference["results"]
        close = all(abs(got["scores"][label] - value) < 1e-5 for label, value in want["scores"].items())
        return got["label"] == want["label"] and close

    assert all(same(a.json(), expected) for a in answers)
    # truncated or junk: the last good version answers; deleted: the prompt is gone (404), nothing else
    assert [a.status_code for a in topic_answers] == [200, 200, 404] * 4
    assert all(same(a.json(), expected_topic) for a in topic_answers if a.status_code == 200)


def test_a_prompt_whose_verbalizer_cannot_be_scored_is_refused_by_add_and_skipped_by_reload(tmp_path,
                                                                                           llama_backbone):
    from softprompt.tasks import TaskSpec

    task = TaskSpec(name="empty", template="{text}", labels=["a", "b"], verbalizer=["", " b"])
    prompt = SoftPrompt(torch.zeros(2, 32), llama_backbone.name, llama_backbone.fingerprint, task)
    bank = PromptBank(llama_backbone)
    with pytest.raises(SoftPromptError, match="a verbalizer entry tokenizes to nothing"):
        bank.add("empty", prompt)
    prompt.save(tmp_path / "empty.safetensors")
    SoftPrompt(torch.zeros(2, 32), llama_backbone.name, llama_backbone.fingerprint,
               TASKS["sentiment"][0]).save(tmp_path / "fine.safetensors")
    directory_bank = PromptBank.from_directory(llama_backbone, tmp_path)
    assert list(directory_bank.snapshot.entries) == ["fine"]
    assert "a verbalizer entry tokenizes to nothing" in directory_bank.snapshot.rejected["empty.safetensors"]
