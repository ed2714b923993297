"""The FastAPI app: classify / generate / ensemble over a PromptBank, hot reload, health and metrics."""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from ..bank import PromptBank, Snapshot, UnknownPrompt, by_snapshot
from ..ensemble import ensemble, require_shared_labels
from ..errors import SoftPromptError
from .batcher import Batcher, QueueFull
from .connections import BodyTimeout
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
            # the route's template, never the raw path: a client cannot invent label values (or new series)
            route = scope.get("route")
            self.metrics.request(getattr(route, "path", "unmatched"), status, time.perf_counter() - started)


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


class Service:
    """What the endpoints share: the bank, one batcher for classification and one for generation, the limits."""

    def __init__(self, bank: PromptBank, max_batch: int, max_wait_ms: float, max_input_chars: int, batching: str,
                 max_queued: int):
        if batching not in ("mixed", "per-prompt"):
            raise SoftPromptError(f"unknown batching {batching!r}; choose mixed or per-prompt")
        self.bank, self.max_batch, self.max_input_chars = bank, max_batch, max_input_chars
        self.metrics = Metrics()
        # items are (snapshot, request): each runs on the snapshot it was checked against (bank.by_snapshot)
        group_key = (lambda job: job.items[0][1][0]) if batching == "per-prompt" else None
        self.classifier = Batcher(functools.partial(by_snapshot, bank.classify), max_batch=max_batch,
                                  max_wait_ms=max_wait_ms, on_batch=functools.partial(self.metrics.batch, "classify"),
                                  group_key=group_key, max_queued=max_queued)
        # generation has its own queue and worker: a batch decodes for up to max_new_tokens steps, which classify
        # requests should not wait behind
        self.generator = Batcher(functools.partial(by_snapshot, bank.generate_mixed), max_batch=max_batch,
                                 max_wait_ms=max_wait_ms, on_batch=functools.partial(self.metrics.batch, "generate"),
                                 group_key=group_key, max_queued=max_queued)

    def rows(self, prompt_name: str, inputs: list[Input], classify: bool, snapshot: Snapshot) -> list[dict[str, str]]:
        """Validate the prompt's kind and the inputs against its template, in `snapshot`, before they join a batch:
        what fails here fails alone, with a 4xx."""
        try:
            task = self.bank.entry(prompt_name, snapshot).prompt.task
        except UnknownPrompt as error:
            raise HTTPException(404, str(error)) from None
        fields, result = task.fields, []
        try:
            task.require_kind(classify, prompt_name)
            for number, value in enumerate(inputs):
                if isinstance(value, str):
                    if len(fields) != 1:
                        raise SoftPromptError(f"inputs[{number}]: prompt {prompt_name!r} has fields {fields}; "
                                              "send an object with each field")
                    value = {fields[0]: value}
                result.append(task.template_values(value, f"inputs[{number}] for prompt {prompt_name!r}"))
        except SoftPromptError as error:
            raise HTTPException(422, str(error)) from None
        for number, value in enumerate(result):
            size = sum(map(len, value.values()))
            if size > self.max_input_chars:
                raise HTTPException(413, f"inputs[{number}] has {size} characters; the limit is "
                                         f"{self.max_input_chars}")
        return result

    def check_batch(self, count: int) -> None:
        if count > self.max_batch:
            raise HTTPException(413, f"{count} inputs in one request; the limit is {self.max_batch} (--max-batch)")

    async def run(self, batcher: Batcher, snapshot: Snapshot, requests: list[tuple]) -> list:
        try:
            return await batcher.submit([(snapshot, request) for request in requests])
        except QueueFull as error:
            raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from None
        except SoftPromptError as error:
            raise HTTPException(422, str(error)) from None

    async def ensemble(self, request: EnsembleRequest) -> dict:
        self.check_batch(len(request.inputs) * len(request.prompts))
        snapshot = self.bank.snapshot
        per_prompt = {name: self.rows(name, request.inputs, True, snapshot) for name in request.prompts}
        try:
            require_shared_labels([self.bank.entry(name, snapshot).prompt.task.labels for name in request.prompts])
        except SoftPromptError as error:
            raise HTTPException(422, str(error)) from None
        items = [(name, per_prompt[name][i]) for i in range(len(request.inputs)) for name in request.prompts]
        predictions = await self.run(self.classifier, snapshot, items)
        width, results = len(request.prompts), []
        for i in range(len(request.inputs)):
            group = predictions[i * width : (i + 1) * width]
            answer = ensemble(group)
            results.append({"label": answer.label, "mean_label": answer.mean_label, "scores": answer.scores,
                            "votes": answer.votes,
                            "per_prompt": {name: p.label for name, p in zip(request.prompts, group)}})
        return {"prompts": request.prompts, "results": results}


def create_app(bank: PromptBank, api_key: str | None = None, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_input_chars: int = 20_000, batching: str = "mixed", max_queued: int = 1024,
               body_timeout_s: float = 30.0) -> FastAPI:
    """`batching="per-prompt"` keeps each forward pass to one prompt: the baseline mixed batching is measured
    against (bench/serve.py). `max_queued`: inputs waiting per batcher before new requests get 503.
    `body_timeout_s`: a request body that stalls this long gets 408 (connections.py)."""
    service = Service(bank, max_batch, max_wait_ms, max_input_chars, batching, max_queued)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.classifier.close()
        service.generator.close()

    # no /docs, /redoc, /openapi.json: open endpoints are /health and /metrics only (docs/serving.md)
    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyTimeout, seconds=body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    app.add_exception_handler(RequestValidationError, invalid_request)

    async def authorize(authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> None:
        # async: a plain `def` dependency would cost every request a hop to the thread pool
        if api_key is None:
            return
        given = x_api_key or (authorization[7:] if authorization and authorization.startswith("Bearer ") else None)
        # as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, i.e. a 500)
        if given is None or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key')")

    add_task_routes(app, service, Depends(authorize))
    add_operations_routes(app, service, Depends(authorize))
    return app


async def invalid_request(request, error: RequestValidationError) -> JSONResponse:
    """422 naming where the body is wrong, never echoing what was sent: FastAPI's own answer repeats the input,
    and an input JSON cannot encode (NaN, 1e400 -> inf, a lone surrogate) turned a 422 into a 500."""
    problems = [{"loc": [str(part) for part in problem.get("loc", ())], "msg": str(problem.get("msg", "")),
                 "type": str(problem.get("type", ""))} for problem in error.errors()]
    return JSONResponse({"detail": problems}, status_code=422)


def add_task_routes(app: FastAPI, service: Service, authorized) -> None:
    """classify, generate, ensemble."""

    @app.post("/v1/classify", dependencies=[authorized])
    async def classify(request: ClassifyRequest) -> dict:
        service.check_batch(len(request.inputs))
        snapshot = service.bank.snapshot
        fields = service.rows(request.prompt, request.inputs, True, snapshot)
        predictions = await service.run(service.classifier, snapshot, [(request.prompt, row) for row in fields])
        return {"prompt": request.prompt,
                "results": [{"label": p.label, "scores": p.scores} for p in predictions]}

    @app.post("/v1/generate", dependencies=[authorized])
    async def generate(request: GenerateRequest) -> dict:
        service.check_batch(len(request.inputs))
        snapshot = service.bank.snapshot
        fields = service.rows(request.prompt, request.inputs, False, snapshot)
        texts = await service.run(service.generator, snapshot,
                                  [(request.prompt, row, request.max_new_tokens) for row in fields])
        return {"prompt": request.prompt, "results": [{"text": text} for text in texts]}

    @app.post("/v1/ensemble", dependencies=[authorized])
    async def ensemble_endpoint(request: EnsembleRequest) -> dict:
        return await service.ensemble(request)


def add_operations_routes(app: FastAPI, service: Service, authorized) -> None:
    """health, the prompt list, reload, metrics."""
    bank = service.bank

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": bank.backbone.name, "prompts": len(bank.snapshot.entries)}

    @app.get("/v1/prompts", dependencies=[authorized])
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

    @app.post("/v1/prompts/reload", dependencies=[authorized])
    async def reload() -> dict:
        if bank.directory is None:
            raise HTTPException(409, "this server was not started from a prompt directory")
        return await asyncio.to_thread(bank.reload)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        snapshot = bank.snapshot
        return service.metrics.render(len(snapshot.entries), len(snapshot.rejected))
