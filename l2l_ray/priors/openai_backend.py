"""``priors.backend=openai``: any OpenAI-compatible chat-completions endpoint (``vllm serve``, SGLang, a gateway).

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --max-model-len 8192 --limit-mm-per-prompt '{"image":1}'
    l2l priors --config configs/synthetic.yaml priors.backend=openai priors.endpoint=http://127.0.0.1:8000/v1 \
        priors.model=Qwen/Qwen2.5-VL-7B-Instruct priors.family=qwen2.5-vl priors.concurrency=16

Images go as base64 JPEG data URLs, already resized to the model's input size (see ``prompts.resize_for_model``);
the answer is constrained with ``response_format={"type": "json_schema", ...}`` (``priors.structured``).
Standard library HTTP (urllib) in a thread pool of ``priors.concurrency`` threads; each request has a socket
timeout of ``priors.timeout_s`` and up to ``priors.max_retries`` retries with exponential backoff on 5xx, 429,
connection errors and timeouts. Final failures: ``timeout`` or ``http_error`` priors, never an exception.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from l2l_ray.config import ConfigError, PriorsConfig
from l2l_ray.priors.base import PriorRequest, register
from l2l_ray.priors.parsing import FAMILIES, attach_proposals, failed_prior, make_prior, parse_answer
from l2l_ray.priors.prompts import (
    answer_schema,
    chat_messages,
    grounding_prompt,
    image_url_part,
    load_image,
    model_input,
)
from l2l_ray.records import Prior

RETRY_HTTP = (429, 500, 502, 503, 504)


class HTTPFailure(Exception):
    """A request that failed for good; ``status`` is ``timeout`` or ``http_error``."""

    def __init__(self, status: str, message: str, retry: bool = False):
        super().__init__(message)
        self.status, self.retry = status, retry


class OpenAIBackend:
    """Callable ``list[PriorRequest] -> list[Prior]`` over HTTP; safe to call from several threads."""

    name = "openai"

    def __init__(self, cfg: PriorsConfig):
        if cfg.family not in FAMILIES:
            raise ConfigError(f"priors.family={cfg.family!r}: choose one of {', '.join(FAMILIES)}")
        self.cfg = cfg
        self.base = cfg.endpoint.rstrip("/")
        self.model = cfg.model
        self._model_lock = threading.Lock()
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def __call__(self, requests: list[PriorRequest]) -> list[Prior]:
        """One prior per request, in order, with soft proposals for the ok ones."""
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            results = list(pool.map(self._one, requests))
        priors = [p for p, _ in results]
        return attach_proposals(priors, [img for _, img in results], self.cfg)

    def _one(self, req: PriorRequest) -> tuple[Prior, object]:
        cfg = self.cfg
        if not req.sentence.strip():
            return failed_prior(req, "empty_sentence", "", self.name, self.model), None
        try:
            image = load_image(req.image_path)
            url, resized = model_input(image, cfg.family, cfg.min_pixels, cfg.max_pixels)
        except (OSError, ValueError) as e:
            return failed_prior(req, "image_error", str(e), self.name, self.model), None
        try:
            model = self._model_name()
            body = self.request_body(model, grounding_prompt(req.sentence, cfg.family, cfg.prompt_version), url)
            text = self._post_with_retries(f"{self.base}/chat/completions", body)
        except HTTPFailure as e:
            return failed_prior(req, e.status, str(e), self.name, self.model), None
        h, w = image.shape[:2]
        parsed = parse_answer(text, cfg.family, w, h, resized_hw=resized, min_pixels=cfg.min_pixels,
                              max_pixels=cfg.max_pixels)
        return make_prior(req, parsed, text, self.name, model), image

    def request_body(self, model: str, prompt: str, url: str) -> dict:
        """The chat-completions request for one (image, prompt)."""
        body = {"model": model, "messages": chat_messages(prompt, image_url_part(url)),
                "max_tokens": self.cfg.max_tokens, "temperature": 0.0}
        if self.cfg.structured:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "grounding", "schema": answer_schema(self.cfg.prompt_version)}}
        return body

    def _model_name(self) -> str:
        """``priors.model``, or the first model the server lists at ``GET /models`` when it is empty."""
        with self._model_lock:
            if not self.model:
                payload = self._send(urllib.request.Request(f"{self.base}/models", headers=self.headers))
                try:
                    self.model = payload["data"][0]["id"]
                except (KeyError, IndexError, TypeError) as e:
                    raise HTTPFailure("http_error", f"priors.model is empty and {self.base}/models lists no model; "
                                      "set priors.model") from e
            return self.model

    def _post_with_retries(self, url: str, body: dict) -> str:
        data = json.dumps(body).encode("utf-8")
        attempts = max(0, self.cfg.max_retries) + 1
        for attempt in range(attempts):
            try:
                payload = self._send(urllib.request.Request(url, data=data, headers=self.headers, method="POST"))
                return message_text(payload)
            except HTTPFailure as e:
                if not e.retry or attempt == attempts - 1:
                    raise
            time.sleep(self.cfg.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _timeout_msg(self, request: urllib.request.Request) -> str:
        return f"no answer from {request.full_url} within {self.cfg.timeout_s}s"

    def _send(self, request: urllib.request.Request) -> dict:
        """One HTTP exchange -> decoded JSON. Raises ``HTTPFailure`` (``.retry`` says whether to try again)."""
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace") if e.fp else ""
            raise HTTPFailure("http_error", f"HTTP {e.code} from {request.full_url}: {detail}",
                              e.code in RETRY_HTTP) from e
        except TimeoutError as e:
            raise HTTPFailure("timeout", self._timeout_msg(request), True) from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise HTTPFailure("timeout", self._timeout_msg(request), True) from e
            raise HTTPFailure("http_error", f"cannot reach {request.full_url}: {e.reason}", True) from e
        except (OSError, http.client.HTTPException) as e:
            raise HTTPFailure("http_error", f"connection to {request.full_url} failed: {e}", True) from e
        try:
            return json.loads(raw)
        except ValueError as e:
            raise HTTPFailure("http_error", f"{request.full_url} answered non-JSON: {raw[:200]!r}", False) from e


def message_text(payload: dict) -> str:
    """The assistant text of a chat-completions response ('' when the model said nothing).

    Raises ``HTTPFailure('http_error')`` when the payload is not a chat-completions response at all.
    """
    try:
        content = payload["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise HTTPFailure("http_error", f"not a chat-completions response: {str(payload)[:200]}", False) from e
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


@register("openai")
def build_openai(cfg: PriorsConfig) -> OpenAIBackend:
    return OpenAIBackend(cfg)
