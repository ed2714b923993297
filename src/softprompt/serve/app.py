"""The FastAPI app: classify / generate / ensemble over a PromptBank, hot reload, health and metrics."""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from ..bank import PromptBank, UnknownPrompt
from ..ensemble import ensemble
from ..errors import SoftPromptError
from .batcher import Batcher
from .metrics import Metrics

Input = str | dict[str, str]


class RequestMetrics:
    """Counts every HTTP request with its status and latency. A plain ASGI middleware: FastAPI's
    `@app.middleware("http")` wraps each response in a stream and a task group, a measurable cost per request."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.metrics.request(scope["path"], status, time.perf_counter() - started)


class ClassifyRequest(BaseModel):
    prompt: str
    inputs: list[Input] = Field(min_length=1)


class GenerateRequest(BaseModel):
    prompt: str
    inputs: list[Input] = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=512)


class EnsembleRequest(BaseModel):
    prompts: list[str] = Field(min_length=1)
    inputs: list[Input] = Field(min_length=1)


def create_app(bank: PromptBank, api_key: str | None = None, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_input_chars: int = 20_000, batching: str = "mixed") -> FastAPI:
    """`batching="per-prompt"` keeps each forward pass to one prompt: the baseline mixed batching is measured
    against (bench/serve.py)."""
    if batching not in ("mixed", "per-prompt"):
        raise SoftPromptError(f"unknown batching {batching!r}; choose mixed or per-prompt")
    metrics = Metrics()
    group_key = (lambda job: job.items[0][0]) if batching == "per-prompt" else None
    classifier = Batcher(bank.classify, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         on_batch=functools.partial(metrics.batch, "classify"), group_key=group_key)
    # generation has its own queue and worker: a batch decodes for up to max_new_tokens steps, which classify
    # requests should not wait behind
    generator = Batcher(bank.generate_mixed, max_batch=max_batch, max_wait_ms=max_wait_ms,
                        on_batch=functools.partial(metrics.batch, "generate"), group_key=group_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        classifier.close()
        generator.close()

    app = FastAPI(title="softprompt", lifespan=lifespan)
    app.add_middleware(RequestMetrics, metrics=metrics)

    async def authorize(authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> None:
        # async: a plain `def` dependency would cost every request a hop to the thread pool
        if api_key is None:
            return
        given = x_api_key or (authorization[7:] if authorization and authorization.startswith("Bearer ") else None)
        if given is None or not secrets.compare_digest(given, api_key):
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key')")

    def rows(prompt_name: str, inputs: list[Input], classify: bool) -> list[dict[str, str]]:
        """Validate the prompt's kind and the inputs against its template before they join a batch (a batch fails
        as a whole)."""
        try:
            entry = bank.entry(prompt_name)
        except UnknownPrompt as error:
            raise HTTPException(404, str(error)) from None
        task = entry.prompt.task
        if task.is_classification != classify:
            raise HTTPException(422, f"prompt {prompt_name!r} generates text: use POST /v1/generate" if classify
                                else f"prompt {prompt_name!r} is a classifier: use POST /v1/classify")
        fields = task.fields
        result = []
        for number, value in enumerate(inputs):
            if isinstance(value, str):
                if len(fields) != 1:
                    raise HTTPException(422, f"inputs[{number}]: prompt {prompt_name!r} has fields {fields}; "
                                             "send an object with each field")
                value = {fields[0]: value}
            missing = task.missing_field(value)
            if missing:
                raise HTTPException(422, f"inputs[{number}]: missing field {missing!r} for prompt {prompt_name!r}")
            size = sum(len(value[name]) for name in fields)
            if size > max_input_chars:
                raise HTTPException(413, f"inputs[{number}] has {size} characters; the limit is {max_input_chars}")
            result.append({name: value[name] for name in fields})
        return result

    def check_batch(count: int) -> None:
        if count > max_batch:
            raise HTTPException(413, f"{count} inputs in one request; the limit is {max_batch} (--max-batch)")

    async def run(batcher: Batcher, items: list[tuple]) -> list:
        try:
            return await batcher.submit(items)
        except SoftPromptError as error:
            raise HTTPException(422, str(error)) from None

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": bank.backbone.name, "prompts": len(bank.snapshot.entries)}

    @app.get("/v1/prompts", dependencies=[Depends(authorize)])
    def list_prompts() -> dict:
        snapshot = bank.snapshot
        served = [
            {
                "name": name,
                "task": entry.prompt.task.name,
                "labels": entry.prompt.task.labels,
                "template": entry.prompt.task.template,
                "length": entry.prompt.length,
                "base_model": entry.prompt.base_model,
                "metrics": {key: entry.prompt.training.get(key)
                            for key in ("best_valid_accuracy", "test_accuracy", "steps_run")},
            }
            for name, entry in sorted(snapshot.entries.items())
        ]
        rejected = [{"file": file, "reason": reason} for file, reason in sorted(snapshot.rejected.items())]
        return {"prompts": served, "rejected": rejected}

    @app.post("/v1/classify", dependencies=[Depends(authorize)])
    async def classify(request: ClassifyRequest) -> dict:
        check_batch(len(request.inputs))
        fields = rows(request.prompt, request.inputs, classify=True)
        predictions = await run(classifier, [(request.prompt, row) for row in fields])
        return {"prompt": request.prompt,
                "results": [{"label": p.label, "scores": p.scores} for p in predictions]}

    @app.post("/v1/generate", dependencies=[Depends(authorize)])
    async def generate(request: GenerateRequest) -> dict:
        check_batch(len(request.inputs))
        fields = rows(request.prompt, request.inputs, classify=False)
        texts = await run(generator, [(request.prompt, row, request.max_new_tokens) for row in fields])
        return {"prompt": request.prompt, "results": [{"text": text} for text in texts]}

    @app.post("/v1/ensemble", dependencies=[Depends(authorize)])
    async def ensemble_endpoint(request: EnsembleRequest) -> dict:
        check_batch(len(request.inputs) * len(request.prompts))
        per_prompt = {name: rows(name, request.inputs, classify=True) for name in request.prompts}
        labels = {tuple(bank.entry(name).prompt.task.labels) for name in request.prompts}
        if len(labels) > 1:
            raise HTTPException(422, f"ensembled prompts must share labels; got {sorted(labels)}")
        items = [(name, per_prompt[name][i]) for i in range(len(request.inputs)) for name in request.prompts]
        predictions = await run(classifier, items)
        width = len(request.prompts)
        results = []
        for i in range(len(request.inputs)):
            group = predictions[i * width : (i + 1) * width]
            answer = ensemble(group)
            results.append({"label": answer.label, "mean_label": answer.mean_label, "scores": answer.scores,
                            "votes": answer.votes,
                            "per_prompt": {name: p.label for name, p in zip(request.prompts, group)}})
        return {"prompts": request.prompts, "results": results}

    @app.post("/v1/prompts/reload", dependencies=[Depends(authorize)])
    async def reload() -> dict:
        if bank.directory is None:
            raise HTTPException(409, "this server was not started from a prompt directory")
        return await asyncio.to_thread(bank.reload)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        snapshot = bank.snapshot
        return metrics.render(len(snapshot.entries), len(snapshot.rejected))

    return app
