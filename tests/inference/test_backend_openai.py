"""The OpenAI-compatible backend against a scripted streaming server on 127.0.0.1.

`python -m llama_cpp.server` would be the real thing, but it needs the `server` extra of
llama-cpp-python (fastapi, uvicorn, sse-starlette, starlette-context, pydantic-settings),
which is not installed; this server speaks the same wire format (SSE `data:` chunks, a
usage chunk when asked, `[DONE]`) and plays one script per model name."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.config import OpenAIVariant
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.openai_backend import OpenAIBackend

KEY = "sk-test-kyara-1234567890"
MESSAGES = [
    {"role": "system", "content": "あなたは小野寺絢音です。"},
    {"role": "user", "content": "こんにちは！"},
]
OPTIONS = GenerationOptions(max_new_tokens=32, temperature=0.0, seed=3)

# model name -> (pieces, finish_reason, prompt_tokens)
SCRIPTS = {
    "chat": (["ごきげん", "よう", "、絢音", "ですわ。"], "stop", 17),
    "long": (["紅茶", "が", "好き"], "length", 9),
    "filtered": (["えっと"], "content_filter", 5),
    "cut": (["途中", "まで"], None, 5),  # the connection ends with no finish reason
    "strict": (["はい"], "stop", 4),  # rejects stream_options, like some older servers
    "slow": (["あ"] * 200, "stop", 4),  # 20 ms a piece
    "hang": (["…"], "stop", 4),  # answers after 1.5 s
}


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.sent_before_disconnect: int | None = None
        self.disconnected = threading.Event()


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args):  # keep test output clean
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            sent = self.headers.get("Authorization", "").removeprefix("Bearer ")
            # Like OpenAI: the error echoes the key it was given.
            return self._json(401, {"error": {"message": f"Incorrect API key provided: {sent}"}})
        model = body["model"]
        if model not in SCRIPTS:
            return self._json(404, {"error": {"message": f"The model `{model}` does not exist"}})
        if model == "strict" and "stream_options" in body:
            return self._json(
                400, {"error": {"message": "stream_options: extra inputs are not permitted"}}
            )
        pieces, finish, prompt_tokens = SCRIPTS[model]
        if model == "hang":
            time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        sent = 0
        try:
            for piece in pieces:
                self._event(model, {"role": "assistant", "content": piece}, None)
                sent += 1
                if model == "slow":
                    time.sleep(0.02)
            if finish is None:
                return  # connection closes mid-reply
            self._event(model, {}, finish)
            if body.get("stream_options", {}).get("include_usage"):
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(pieces),
                    "total_tokens": prompt_tokens + len(pieces),
                }
                self._send(
                    {
                        "id": "c1",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.server.sent_before_disconnect = sent
            self.server.disconnected.set()

    def _event(self, model, delta, finish):
        self._send(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def _send(self, payload):
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def make(server, monkeypatch):
    monkeypatch.setenv("KYARA_TEST_KEY", KEY)
    backends = []

    def build(model="chat", base_url=None, **extra):
        url = base_url or f"http://127.0.0.1:{server.server_address[1]}/v1"
        variant = OpenAIVariant(
            name="local",
            backend="openai",
            model=model,
            base_url=url,
            api_key_env="KYARA_TEST_KEY",
            **extra,
        )
        backends.append(OpenAIBackend(variant))
        return backends[-1]

    yield build
    for backend in backends:
        backend.close()


def run(backend, options=OPTIONS):
    deltas = list(backend.stream(MESSAGES, options))
    return deltas[:-1], deltas[-1]


def test_streams_pieces_then_usage_and_eos(make, server):
    texts, final = run(make("chat"))
    assert [d.text for d in texts] == SCRIPTS["chat"][0]
    assert final.done and final.stop_reason == "eos" and final.error is None
    assert (final.prompt_tokens, final.completion_tokens) == (17, 4)
    assert final.ttft_s > 0 and final.tokens_per_s > 0
    sent = server.requests[-1]["body"]
    assert sent["messages"] == MESSAGES and sent["stream"] is True
    assert sent["max_tokens"] == 32 and sent["temperature"] == 0.0 and sent["seed"] == 3
    assert sent["stream_options"] == {"include_usage": True}


def test_finish_reason_length_maps_to_length(make):
    _, final = run(make("long"))
    assert final.stop_reason == "length" and final.completion_tokens == 3


@pytest.mark.parametrize("model, words", [("filtered", "content_filter"), ("cut", "ended")])
def test_a_reply_cut_short_by_the_server_keeps_its_text_and_says_why(make, model, words):
    texts, final = run(make(model))
    assert "".join(d.text for d in texts) == "".join(SCRIPTS[model][0])
    assert final.stop_reason == "error" and words in final.error


def test_a_server_rejecting_stream_options_is_asked_again_without(make, server):
    texts, final = run(make("strict"))
    assert [d.text for d in texts] == ["はい"] and final.stop_reason == "eos"
    assert final.completion_tokens is None  # no usage without the option
    assert "stream_options" not in server.requests[-1]["body"]


def test_closing_the_stream_closes_the_connection(make, server):
    server.disconnected.clear()
    stream = make("slow").stream(MESSAGES, OPTIONS)
    assert next(stream).text == "あ"
    stream.close()
    assert server.disconnected.wait(5), "the server never saw the client go"
    assert server.sent_before_disconnect < 100


def test_connection_refused_is_a_one_line_error(make, one_line):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = make(base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(BackendError) as err:
        next(backend.stream(MESSAGES, OPTIONS))
    message = one_line(str(err.value))
    assert "cannot reach" in message and "refused" in message.lower()


def test_a_server_that_does_not_answer_in_time_is_a_one_line_error(make, one_line):
    with pytest.raises(BackendError) as err:
        next(make("hang", timeout_s=0.3).stream(MESSAGES, OPTIONS))
    assert "within 0.3 s" in one_line(str(err.value))


def test_wrong_key_is_a_one_line_error_without_the_key(make, monkeypatch, one_line):
    monkeypatch.setenv("KYARA_TEST_KEY", "sk-wrong-secret-0987654321")
    backend = make()
    with pytest.raises(BackendError) as err:
        next(backend.stream(MESSAGES, OPTIONS))
    message = one_line(str(err.value))
    assert "401" in message and "KYARA_TEST_KEY" in message
    assert "sk-wrong-secret" not in message and "0987654321" not in message


def test_unknown_model_is_a_one_line_error(make, one_line):
    with pytest.raises(BackendError) as err:
        next(make("no-such-model").stream(MESSAGES, OPTIONS))
    message = one_line(str(err.value))
    assert "404" in message and "no-such-model" in message


def test_official_api_without_a_key_says_which_variable(monkeypatch, one_line):
    monkeypatch.delenv("KYARA_ABSENT_KEY", raising=False)
    variant = OpenAIVariant(
        name="gpt", backend="openai", model="gpt-4o-mini", api_key_env="KYARA_ABSENT_KEY"
    )
    with pytest.raises(BackendError) as err:
        OpenAIBackend(variant)
    assert "KYARA_ABSENT_KEY" in one_line(str(err.value))


def test_a_local_server_needs_no_key(server, monkeypatch):
    monkeypatch.delenv("KYARA_TEST_KEY", raising=False)
    variant = OpenAIVariant(
        name="nokey",
        backend="openai",
        model="chat",
        api_key_env="KYARA_TEST_KEY",
        base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
    )
    backend = OpenAIBackend(variant)
    try:
        with pytest.raises(BackendError, match="401"):  # this server does want one
            next(backend.stream(MESSAGES, OPTIONS))
        assert server.requests[-1]["auth"].startswith("Bearer ")
    finally:
        backend.close()
