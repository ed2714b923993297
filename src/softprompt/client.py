"""A small Python client for `softprompt serve`."""

from __future__ import annotations

import httpx

from .errors import SoftPromptError


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise SoftPromptError(f"cannot reach the server at {self.http.base_url}: {error}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise SoftPromptError(f"server answered {response.status_code}: {detail}")
        return response.json()

    def health(self) -> dict:
        return self._call("GET", "/health")

    def prompts(self) -> dict:
        return self._call("GET", "/v1/prompts")

    def classify(self, prompt: str, inputs: list[str | dict[str, str]]) -> list[dict]:
        return self._call("POST", "/v1/classify", json={"prompt": prompt, "inputs": inputs})["results"]

    def ensemble(self, prompts: list[str], inputs: list[str | dict[str, str]]) -> list[dict]:
        return self._call("POST", "/v1/ensemble", json={"prompts": prompts, "inputs": inputs})["results"]

    def reload(self) -> dict:
        return self._call("POST", "/v1/prompts/reload")
