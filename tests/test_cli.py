"""The CLI end to end on a tiny model saved to a local directory (fast), plus its error messages."""

import json
import re

import pytest
import torch

from softprompt import cli
from softprompt.data import Example
from softprompt.prompt import SoftPrompt


def run(args, capsys):
    """Run `softprompt ARGS`; returns (exit code, stdout, stderr)."""
    import sys

    saved = sys.argv
    sys.argv = ["softprompt", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import make_backbone

    directory = tmp_path_factory.mktemp("tiny-llama")
    backbone = make_backbone("llama")
    backbone.model.save_pretrained(directory)
    backbone.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def data_files(tmp_path):
    words = {"great": "positive", "wit": "positive", "dull": "negative", "boring": "negative"}
    lines = [json.dumps({"review": f"a {w} movie {i}", "label": label})
             for i in range(6) for w, label in words.items()]
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")
    (tmp_path / "valid.jsonl").write_text("\n".join(lines[16:20]) + "\n")
    (tmp_path / "test.csv").write_text("review,label\n" + "\n".join(
        f"{json.loads(line)['review']},{json.loads(line)['label']}" for line in lines[20:]) + "\n")
    return tmp_path


def test_train_eval_predict_round_trip(tiny_model_dir, data_files, capsys):
    out = data_files / "prompt.safetensors"
    code, stdout, stderr = run(
        ["train", "--model", tiny_model_dir, "--data", data_files / "train.jsonl", "--valid",
         data_files / "valid.jsonl", "--test", data_files / "test.csv", "--template", r"Review: {review}\nSentiment:",
         "--labels", "negative,positive", "--prompt-length", 4, "--steps", 4, "--eval-every", 2, "--batch-size", 4,
         "--out", out], capsys)
    assert code == 0, stderr
    assert "hand-written prompt" in stdout and "trained prompt on test" in stdout and str(out) in stdout
    prompt = SoftPrompt.load(out)
    assert prompt.task.template == "Review: {review}\nSentiment:" and prompt.length == 4
    assert 0 <= prompt.training["test_accuracy"] <= 1 and prompt.training["steps_run"] == 4
    assert (data_files / "prompt.safetensors.log.jsonl").exists()

    # --model defaults to the prompt's base model; here that is the tiny directory it was trained on.
    code, stdout, _ = run(["eval", "--data", data_files / "test.csv", "--prompt", out, "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["accuracy"] == prompt.training["test_accuracy"] and "macro_f1" in report
    assert sum(map(sum, report["confusion"])) == report["n"] == 4

    code, stdout, _ = run(["predict", "--prompt", out, "--json", "a great movie", "so boring"], capsys)
    assert code == 0
    answers = [json.loads(line) for line in stdout.splitlines()]
    assert [a["input"]["review"] for a in answers] == ["a great movie", "so boring"]
    assert all(a["label"] in {"negative", "positive"} and set(a["scores"]) == {"negative", "positive"}
               for a in answers)


def test_model_tuning_baseline_writes_a_model_directory_that_eval_loads(tiny_model_dir, data_files, capsys):
    out = data_files / "tuned"
    code, stdout, stderr = run(
        ["train", "--method", "model-tuning", "--model", tiny_model_dir, "--data", data_files / "train.jsonl",
         "--valid", data_files / "valid.jsonl", "--test", data_files / "test.csv", "--text-field", "review",
         "--labels", "negative,positive", "--steps", 2, "--eval-every", 1, "--batch-size", 4, "--lr", 1e-3,
         "--out", out], capsys)
    assert code == 0, stderr
    assert "tuned model on test" in stdout and (out / "model.safetensors").exists()
    code, stdout, _ = run(["eval", "--model", out, "--data", data_files / "test.csv", "--text-field", "review",
                           "--labels", "negative,positive", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["n"] == 4


def test_eval_with_a_device_map_offloading_a_layer_gives_the_same_report(tiny_model_dir, data_files, capsys):
    args = ["eval", "--model", tiny_model_dir, "--data", data_files / "test.csv", "--text-field", "review", "--json",
            "--precision", "fp32"]
    code, plain, _ = run(args, capsys)
    device_map = ('{"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", '
                  '"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}')
    code_mapped, mapped, stderr = run([*args, "--device-map", device_map], capsys)
    assert code == code_mapped == 0, stderr
    assert json.loads(mapped) == json.loads(plain)
    code, _, stderr = run([*args, "--device-map", "everywhere"], capsys)
    assert code == 2 and "--device-map 'everywhere': use auto, balanced, sequential or a JSON map" in stderr


def test_eval_without_prompt_scores_the_template(tiny_model_dir, data_files, capsys):
    code, stdout, _ = run(["eval", "--model", tiny_model_dir, "--data", data_files / "test.csv",
                           "--text-field", "review", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["n"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "gpt-17", "--data", "rotten-tomatoes"], "unknown model 'gpt-17'"),
        (["eval", "--model", "{model}", "--data", "sst9"], "unknown dataset 'sst9'; built-in: rotten-tomatoes"),
        (["predict", "--prompt", "missing.safetensors", "x"], "prompt file missing.safetensors does not exist"),
        (["train", "--model", "{model}", "--data", "{bad}", "--out", "p.safetensors"], "bad.jsonl:2: invalid JSON"),
        (["train", "--model", "{model}", "--data", "{data}", "--init", "zeros", "--out", "p.safetensors"],
         "unknown init 'zeros'"),
    ],
)
def test_errors_are_one_clear_line(args, message, tiny_model_dir, data_files, capsys, monkeypatch):
    monkeypatch.chdir(data_files)
    (data_files / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{oops\n')
    filled = [str(a).format(model=tiny_model_dir, bad=data_files / "bad.jsonl", data=data_files / "train.jsonl")
              for a in args]
    if "--data" in filled and filled[filled.index("--data") + 1].endswith("train.jsonl"):
        filled += ["--text-field", "review"]
    code, _, stderr = run(filled, capsys)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr


def test_models_and_tasks_listings(capsys, monkeypatch, tmp_path):
    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(width=300))  # tables wrap at 80 columns otherwise
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    code, stdout, _ = run(["models"], capsys)
    assert code == 0 and "smollm2-135m" in stdout and "qwen2.5-coder-1.5b" in stdout
    code, stdout, _ = run(["tasks"], capsys)
    assert code == 0 and "rotten-tomatoes" in stdout and "10752" in stdout and "7528" in stdout


def test_serve_and_predict_through_the_server(tiny_model_dir, tmp_path, capsys):
    """`softprompt serve` as a real process on loopback, asked by `softprompt predict --server`."""
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import torch

    from softprompt.evaluate import predict
    from softprompt.loader import load_model
    from softprompt.tasks import TaskSpec

    backbone = load_model(str(tiny_model_dir), precision="fp32")
    task = TaskSpec(name="sentiment", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
    prompt = SoftPrompt(torch.randn(3, backbone.d_model), str(tiny_model_dir), backbone.fingerprint, task)
    (tmp_path / "prompts").mkdir()
    prompt.save(tmp_path / "prompts" / "sentiment.safetensors")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--prompts", tmp_path / "prompts",
                               "--port", str(port), "--precision", "fp32", "--max-wait-ms", "1"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # bounded wait for start-up
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        code, stdout, stderr = run(["predict", "--server", url, "--prompt", "sentiment", "--json", "a great movie"],
                                   capsys)
        assert code == 0, stderr
        answer = json.loads(stdout)
        (local,) = predict(backbone, prompt, [Example({"text": "a great movie"}, None, None, "r")])
        assert answer["label"] == local.label
        assert abs(answer["scores"]["positive"] - local.scores["positive"]) < 1e-5
        code, _, stderr = run(["predict", "--server", url, "--prompt", "nope", "x"], capsys)
        assert code == 2 and "404" in stderr and "unknown prompt 'nope'" in stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_prompt_as_one(tiny_model_dir, data_files, capsys):
    """`--devices 2` (torchrun, gloo, each process half of every batch, prompt gradient all-reduced) ends with
    the prompt one process trains on the same global batches: equal up to float summation order (atol 1e-5)."""
    common = ["train", "--model", tiny_model_dir, "--data", data_files / "train.jsonl", "--valid",
              data_files / "valid.jsonl", "--text-field", "review", "--labels", "negative,positive",
              "--prompt-length", 3, "--steps", 6, "--eval-every", 3, "--batch-size", 4, "--lr", 0.05,
              "--precision", "fp32", "--no-baseline", "--patience", 0]
    code, _, stderr = run([*common, "--out", data_files / "one.safetensors"], capsys)
    assert code == 0, stderr
    code, _, stderr = run([*common, "--devices", 2, "--out", data_files / "two.safetensors"], capsys)
    assert code == 0, stderr
    one, two = SoftPrompt.load(data_files / "one.safetensors"), SoftPrompt.load(data_files / "two.safetensors")
    torch.testing.assert_close(two.embeddings, one.embeddings, atol=1e-5, rtol=1e-4)
    assert two.training["best_valid_accuracy"] == one.training["best_valid_accuracy"]
    assert two.training["steps_run"] == one.training["steps_run"] == 6


def test_more_devices_than_the_machine_has_is_an_error(tiny_model_dir, data_files, capsys):
    code, _, stderr = run(["train", "--model", tiny_model_dir, "--data", data_files / "train.jsonl",
                           "--devices", 4096, "--out", data_files / "p.safetensors"], capsys)
    assert code == 2 and "--devices 4096: this machine has" in stderr


def test_train_options_are_the_train_config_fields_with_their_defaults_and_help(capsys, monkeypatch):
    import dataclasses

    import typer

    from softprompt.config import TrainConfig, cli_flag

    command = typer.main.get_command(cli.app).commands["train"]
    options = {param.name: param for param in command.params}
    for field in dataclasses.fields(TrainConfig):
        option = options.pop(field.name)
        assert option.help == field.metadata["help"] and option.default == field.default
    assert set(options) == {"out", "model", "data", "valid", "test", "template", "labels", "text_field",
                            "label_field", "resume", "resume_anyway", "precision", "baseline", "generate",
                            "device_map", "devices"}
    flags = {param.name: param.opts + param.secondary_opts for param in command.params}
    assert flags["max_input_tokens"] == ["--max-length"] and flags["route"] == ["--route"]
    assert flags["compile"] == ["--compile", "--no-compile"] and flags["valid_limit"] == ["--valid-limit"]
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 300)  # one line per option
    code, stdout, _ = run(["train", "--help"], capsys)
    assert code == 0
    lines = {line.split()[1]: line for line in stdout.splitlines() if line.startswith("│    --")}
    for field in dataclasses.fields(TrainConfig):
        shown = f"no-{cli_flag(field)[2:]}" if field.default is False else field.default
        assert field.metadata["help"] in lines[cli_flag(field)]
        assert (f"[default: {shown}]" in lines[cli_flag(field)]) == (field.default is not None)


def test_config_options_turn_command_line_values_into_a_config():
    import typer
    from typer.testing import CliRunner

    from softprompt.config import TrainConfig

    seen = {}
    app = typer.Typer()

    @app.command()
    @cli.config_options(TrainConfig)
    def command(name: str = "x", *, config: TrainConfig, after: int = 1) -> None:
        seen.update(name=name, config=config, after=after)

    result = CliRunner().invoke(app, ["--valid-limit", "0", "--max-length", "64", "--route", "concat", "--compile",
                                      "--lr", "0.5", "--compile-mode", "default", "--after", "2"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == TrainConfig(valid_limit=None, max_input_tokens=64, route="concat", compile=True, lr=0.5,
                                         compile_mode="default")
    assert (seen["name"], seen["after"]) == ("x", 2)
    CliRunner().invoke(app, [])
    assert seen["config"] == TrainConfig()
    with pytest.raises(TypeError, match="needs a `config` parameter"):
        cli.config_options(TrainConfig)(lambda steps=1: None)


def test_bad_train_options_fail_before_any_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_dataset", lambda *args, **kwargs: pytest.fail("loaded data"))
    code, _, stderr = run(["train", "--out", "p.safetensors", "--steps", 0], capsys)
    assert code == 2 and "error: --steps must be >= 1, got 0" in stderr
    code, _, stderr = run(["train", "--out", "p.safetensors", "--route", "cached"], capsys)
    assert code == 2 and "--route: unknown route 'cached'; choose auto, concat" in stderr


def test_devices_option_is_dropped_from_the_command_each_process_runs(monkeypatch):
    from softprompt import distributed

    argv = ["train", "--devices", "2", "--out", "p", "--devices=3", "--steps", "4"]
    assert distributed.without_devices_option(argv) == ["train", "--out", "p", "--steps", "4"]
    assert argv[1] == "--devices"  # the caller's list is left alone
    assert distributed.without_devices_option(["eval", "--limit", "2"]) == ["eval", "--limit", "2"]
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda devices, argv: launched.append((devices, argv)) or 7)
    assert distributed.launch_command(2, argv) == 7 and launched == [(2, ["train", "--out", "p", "--steps", "4"])]


def tiny_prompt(base_model="tiny", length=3, d=8, seed=0):
    from softprompt.tasks import TaskSpec

    task = TaskSpec(name="sentiment", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
    return SoftPrompt(torch.randn(length, d, generator=torch.Generator().manual_seed(seed)), base_model, "fp", task)


def test_export_npy_writes_the_prompt_array(tmp_path, capsys):
    import numpy as np

    prompt = tiny_prompt()
    prompt.save(tmp_path / "p.safetensors")
    code, stdout, stderr = run(["export", tmp_path / "p.safetensors", "--format", "npy", "--out",
                                tmp_path / "p.array"], capsys)
    assert code == 0, stderr
    array = np.load(tmp_path / "p.array", allow_pickle=False)  # no ".npy" appended to the name given
    assert array.dtype == np.float32 and np.array_equal(array, prompt.embeddings.numpy())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.array", "p.safetensors"]  # no temp file left


def test_unknown_export_format_is_an_error(tmp_path, capsys):
    tiny_prompt().save(tmp_path / "p.safetensors")
    code, _, stderr = run(["export", tmp_path / "p.safetensors", "--format", "onnx", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "unknown export format 'onnx'; choose peft, npy or prompt-embeds" in stderr
    assert not (tmp_path / "x").exists()


def test_prompt_files_skip_checkpoints_and_base_model_of_wants_one_model(tmp_path):
    from softprompt.errors import SoftPromptError
    from softprompt.prompt import base_model_of, prompt_files

    tiny_prompt("model-a").save(tmp_path / "b.safetensors")
    tiny_prompt("model-a").save(tmp_path / "a.safetensors")
    tiny_prompt("model-b").save(tmp_path / "a.safetensors.ckpt.safetensors")
    (tmp_path / "notes.txt").write_text("not a prompt")
    assert prompt_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    assert base_model_of(tmp_path) == "model-a"  # the checkpoint's model does not count
    tiny_prompt("model-b").save(tmp_path / "c.safetensors")
    with pytest.raises(SoftPromptError, match=re.escape(
            f"give --model: the prompts in {tmp_path} name base models ['model-a', 'model-b']")):
        base_model_of(tmp_path)
    with pytest.raises(SoftPromptError, match="name base models none"):
        base_model_of(tmp_path / "empty")


@pytest.mark.parametrize("flag, value", [("--max-queued", "0"), ("--header-timeout", "-1"), ("--body-timeout", "nan"),
                                         ("--max-connections", "0"), ("--max-prompt-length", "-5")])
def test_serve_limits_must_be_positive_and_are_checked_before_anything_loads(tmp_path, capsys, flag, value):
    code, _, err = run(["serve", "--prompts", tmp_path / "no-such-dir", flag, value], capsys)
    assert code == 2 and f"error: {flag} must be > 0, got {float(value) if '.' in value or value == 'nan' else value}" \
        in err.replace("\n", "")
