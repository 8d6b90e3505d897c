"""The openai backend against a real chat-completions HTTP server on 127.0.0.1 (started here, in a thread).

The server answers by the sentence it finds in the request: good JSON, a point, prose, malformed JSON, an empty
answer, a 500 before succeeding (retry), a permanent 500, a 400, a non-chat payload, and a slow answer (timeout).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from l2l_ray.config import ConfigError, PriorsConfig
from l2l_ray.priors.base import PriorRequest, build_backend
from l2l_ray.priors.openai_backend import OpenAIBackend

ANSWERS = {
    # sentence -> (HTTP status, assistant content or raw body); coordinates in Qwen2.5-VL pixels of the 644x476 input
    "good": (200, '```json\n[{"bbox_2d": [161, 119, 483, 357], "label": "ball", "attributes": ["red"]}]\n```'),
    "point": (200, '{"point_2d": [322, 238], "label": "cup"}'),
    "prose": (200, "I am not sure which object you mean."),
    "malformed": (200, '{"bbox_2d": [161, 119, "label": }'),
    "empty": (200, ""),
    "outside": (200, '{"bbox_2d": [900, 600, 1200, 900], "label": "x"}'),
    "bad request": (400, '{"error": "bad request"}'),
    "not chat": (200, None),
}


class ChatServer:
    def __init__(self, slow_s: float = 1.5):
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.headers: list[dict] = []
        self.flaky_calls = 0
        self.slow_s = slow_s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server.paths.append(self.path)
                self._send(200, json.dumps({"object": "list", "data": [{"id": "served-model"}]}))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                server.paths.append(self.path)
                server.headers.append(dict(self.headers))
                text = body["messages"][0]["content"][1]["text"]
                sentence = text.split('"')[1]
                status, content = server.answer(sentence)
                if content is None:
                    self._send(200, json.dumps({"id": "x", "object": "error"}))
                elif status != 200:
                    self._send(status, content)
                else:
                    self._send(200, json.dumps({"id": "c1", "object": "chat.completion", "model": body["model"],
                                                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                                    "role": "assistant", "content": content}}]}))

            def _send(self, status, text):
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, sentence: str):
        if sentence == "flaky":  # 500 twice, then a good answer
            self.flaky_calls += 1
            return (500, "overloaded") if self.flaky_calls <= 2 else ANSWERS["good"]
        if sentence == "broken":
            return 500, "always down"
        if sentence == "slow":
            time.sleep(self.slow_s)
            return ANSWERS["good"]
        return ANSWERS[sentence]


@pytest.fixture(scope="module")
def server():
    s = ChatServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "im.png"
    img = np.zeros((480, 640, 3), np.uint8)
    img[120:360, 160:480] = (220, 40, 40)  # the "ball": x 0.25-0.75, y 0.25-0.75
    Image.fromarray(img).save(path)
    return str(path)


def cfg_for(server, **kw):
    base = dict(backend="openai", endpoint=server.url, model="qwen-test", family="qwen2.5-vl", timeout_s=0.5,
                max_retries=2, retry_backoff_s=0.05, concurrency=4, proposal_size=32, api_key_env="L2L_TEST_KEY")
    return PriorsConfig(**{**base, **kw})


def reqs(image_path, *sentences):
    return [PriorRequest(sent_id=i, ref_id=100 + i, image_path=image_path, width=640, height=480, sentence=s)
            for i, s in enumerate(sentences)]


def test_answers_become_priors_or_typed_reasons(server, image_path, monkeypatch):
    monkeypatch.setenv("L2L_TEST_KEY", "sk-test")
    backend = build_backend(cfg_for(server))
    assert isinstance(backend, OpenAIBackend)
    sentences = ["good", "point", "prose", "malformed", "empty", "outside", "bad request", "not chat", "  "]
    priors = backend(reqs(image_path, *sentences))
    assert [p.sent_id for p in priors] == list(range(len(sentences)))
    status = {s: p.status for s, p in zip(sentences, priors, strict=True)}
    assert status == {"good": "ok", "point": "ok", "prose": "no_box", "malformed": "malformed_json",
                      "empty": "empty_answer", "outside": "box_out_of_range", "bad request": "http_error",
                      "not chat": "http_error", "  ": "empty_sentence"}
    good = priors[0]
    # 161/644 = 0.25, 119/476 = 0.25, 483/644 = 0.75, 357/476 = 0.75
    assert good.box == pytest.approx((0.25, 0.25, 0.75, 0.75), abs=1e-6)
    assert (good.category, good.attributes, good.backend, good.model) == ("ball", ("red",), "openai", "qwen-test")
    assert good.proposal.shape == (32, 32) and good.proposal[12:20, 12:20].mean() > 200
    assert priors[1].box == pytest.approx((0.45, 0.45, 0.55, 0.55), abs=1e-6) and priors[1].score == 0.5
    assert all(p.proposal is None and p.box is None for p in priors[2:])
    assert "HTTP 400" in priors[6].raw_text
    # what the server received: a base64 JPEG data URL of the resized input and a json_schema response format
    body = server.bodies[0]
    assert body["model"] == "qwen-test" and body["temperature"] == 0.0 and body["max_tokens"] == 256
    image_part, text_part = body["messages"][0]["content"]
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (644, 476)
    assert text_part["type"] == "text"
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["required"][0] == "bbox_2d"
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert set(server.paths) == {"/v1/chat/completions"}


def test_retry_then_success_and_permanent_failure(server, image_path):
    server.flaky_calls = 0
    n = len(server.bodies)
    flaky, broken = build_backend(cfg_for(server, concurrency=1))(reqs(image_path, "flaky", "broken"))
    assert flaky.status == "ok" and server.flaky_calls == 3  # 500, 500, then the answer
    assert broken.status == "http_error" and "HTTP 500" in broken.raw_text
    assert len(server.bodies) - n == 3 + 3  # max_retries=2: three tries each
    # without retries the flaky answer is an http_error
    server.flaky_calls = 0
    (p,) = build_backend(cfg_for(server, max_retries=0))(reqs(image_path, "flaky"))
    assert p.status == "http_error"


def test_slow_answer_times_out(server, image_path):
    t0 = time.perf_counter()
    slow, good = build_backend(cfg_for(server, max_retries=1))(reqs(image_path, "slow", "good"))
    elapsed = time.perf_counter() - t0
    assert slow.status == "timeout" and "within 0.5s" in slow.raw_text
    assert good.status == "ok"  # the other request is not held up by the slow one (concurrency 4)
    assert elapsed < 1.5 + 0.5  # two 0.5 s tries + 0.05 s backoff, not the server's 1.5 s sleep per try


def test_model_name_from_server_and_unreachable_endpoint(server, image_path, tmp_path):
    backend = build_backend(cfg_for(server, model=""))
    (p,) = backend(reqs(image_path, "good"))
    assert p.status == "ok" and p.model == "served-model" and server.bodies[-1]["model"] == "served-model"
    assert "/v1/models" in server.paths
    # nothing listens on port 9 (discard): connection refused -> http_error after the retries
    (p,) = build_backend(cfg_for(server, endpoint="http://127.0.0.1:9/v1", max_retries=1))(reqs(image_path, "good"))
    assert p.status == "http_error" and "cannot reach" in p.raw_text
    (p,) = build_backend(cfg_for(server))(reqs(str(tmp_path / "missing.jpg"), "good"))
    assert p.status == "image_error" and "missing.jpg" in p.raw_text
    (p,) = build_backend(cfg_for(server, structured=False))(reqs(image_path, "good"))
    assert p.status == "ok" and "response_format" not in server.bodies[-1]
    with pytest.raises(ConfigError, match="family"):
        build_backend(cfg_for(server, family="llava"))
