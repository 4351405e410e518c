"""The judge and the openai chat backend against a server that answers as vLLM's
OpenAI-compatible server does (`vllm serve MODEL --api-key KEY --max-model-len N`), so the
README's "Serving on vLLM" holds without a GPU here:

- chat completions with `logprobs`: vLLM's shape — `choices[0].logprobs.content[]` of
  {token, logprob, bytes, top_logprobs}, tokens decoded one at a time (a Japanese
  character cut across byte-fallback tokens comes out as "�" with the replacement
  character's bytes), -9999.0 for a logprob of -inf, the chosen token inside its own
  top list;
- errors: `{"object": "error", "message": ..., "type": "BadRequestError", "param": null,
  "code": 400}` for a prompt longer than --max-model-len (newer versions wrap the same
  fields in {"error": {...}}), and {"error": "Unauthorized"} for a wrong --api-key;
- streaming: a first chunk with the role and empty content, the pieces, a chunk with the
  finish reason, a usage chunk when asked (stream_options.include_usage), [DONE];
- Gemma 2's chat template refuses a system message: vLLM answers it with the same 400
  error body, "System role not supported" (the template's raise_exception). Only the error
  shape is replayed here: the template itself runs in a real server in
  tests/test_gemma2_server.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from judge_testing import KEY, one_line

from pipelines.config import OpenAIVariant
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.openai_backend import OpenAIBackend
from pipelines.judge.verdict import BAD_REQUEST, UNAUTHORIZED, Interaction

MAX_MODEL_LEN = 12000  # characters stand in for tokens (a judge prompt is ~6000)
ANSWER = "1. 口調は丁寧ですわ。\n2. 人物像に合っています。\nスコア: 5\n5"
TOO_LONG = ("This model's maximum context length is {max} tokens. However, you requested "
            "{asked} tokens ({prompt} in the messages, {completion} in the completion). "
            "Please reduce the length of the messages or completion.")


class VLLMServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), VLLMHandler)
        self.requests: list[dict] = []
        self.wrapped_errors = False     # newer vLLM: {"error": {...}}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> VLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def vllm_logprobs(text: str, top_n: int) -> dict:
    """One token per ASCII character; each Japanese character as three byte-fallback
    tokens that vLLM decodes to "�"; at the score line's "5", where the judge decides:
    5 70 %, 6 30 %, 4 at -inf; at the repeat below it the copied digit, certain."""
    content = []
    replacement = list("\ufffd".encode())
    for char in text:
        if ord(char) < 128:
            content.append({"token": char, "logprob": -0.05, "bytes": list(char.encode())})
        else:
            content += [{"token": "\ufffd", "logprob": -0.02, "bytes": replacement}] * 3
    for entry in content:
        entry["top_logprobs"] = [dict(entry)]
    decided, repeat = [i for i, t in enumerate(content) if t["token"] == "5"][-2:]
    top = [{"token": "5", "logprob": math.log(0.7), "bytes": [53]},
           {"token": "6", "logprob": math.log(0.3), "bytes": [54]},
           {"token": "\n", "logprob": -12.5, "bytes": [10]},
           {"token": "4", "logprob": -9999.0, "bytes": [52]}][:top_n]
    content[decided].update(logprob=math.log(0.7), top_logprobs=top)
    content[repeat].update(logprob=-1e-4, top_logprobs=[
        {"token": "5", "logprob": -1e-4, "bytes": [53]},
        {"token": "6", "logprob": -11.0, "bytes": [54]}][:top_n])
    return {"content": content}


class VLLMHandler(BaseHTTPRequestHandler):
    server: VLLMServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, message: str) -> None:
        fields = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
        self._send(400, {"error": fields} if self.server.wrapped_errors
                   else {"object": "error", **fields})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": "Unauthorized"})
        prompt = sum(len(m["content"]) for m in body["messages"])
        completion = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        if prompt + completion > MAX_MODEL_LEN:
            return self._error(TOO_LONG.format(max=MAX_MODEL_LEN, asked=prompt + completion,
                                               prompt=prompt, completion=completion))
        if body["messages"] and body["messages"][0]["role"] == "system":
            return self._error("System role not supported")
        if body.get("stream"):
            return self._stream(body)
        choice = {"index": 0, "message": {"role": "assistant", "content": ANSWER,
                                          "tool_calls": [], "reasoning_content": None},
                  "logprobs": None, "finish_reason": "stop", "stop_reason": None}
        if body.get("logprobs"):
            choice["logprobs"] = vllm_logprobs(ANSWER, body.get("top_logprobs") or 0)
        self._send(200, {"id": "chatcmpl-0123", "object": "chat.completion", "created": 0,
                         "model": body["model"], "choices": [choice],
                         "usage": {"prompt_tokens": prompt, "total_tokens": prompt + 30,
                                   "completion_tokens": 30, "prompt_tokens_details": None},
                         "prompt_logprobs": None})

    def _stream(self, body: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> None:
            data = {"id": "chatcmpl-0123", "object": "chat.completion.chunk", "created": 0,
                    "model": body["model"],
                    "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
            if usage:
                data["usage"] = usage
            self.wfile.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())

        chunk({"role": "assistant", "content": ""})
        for piece in ("ごきげんよう", "、絢音", "ですわ。"):
            chunk({"content": piece})
        chunk({"content": ""}, finish="stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            chunk({}, usage={"prompt_tokens": 12, "total_tokens": 15, "completion_tokens": 3})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server():
    with VLLMServer() as srv:
        yield srv


def _score(judge, interaction):
    async def go():
        try:
            return await judge.score(interaction, "personality", use_cache=False)
        finally:
            await judge.aclose()

    return asyncio.run(go())


def test_the_judge_reads_vllm_logprobs(make_judge, server):
    judge = make_judge(store=False)
    verdict = _score(judge, Interaction.from_pair("趣味は？", "読書ですわ。", id="m1"))
    assert verdict.status == "ok" and verdict.score == 5, verdict.error
    assert verdict.weighted_score == pytest.approx(5.3)   # 0.7 x 5 + 0.3 x 6; 4 at -inf
    sent = server.requests[0]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 20
    assert "max_tokens" in sent and "max_completion_tokens" not in sent


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_prompt_over_max_model_len_is_one_line_from_the_judge(make_judge, server, wrapped):
    server.wrapped_errors = wrapped
    judge = make_judge(store=False, max_tokens=MAX_MODEL_LEN)
    verdict = _score(judge, Interaction.from_pair("趣味は？", "読書ですわ。", id="m1"))
    assert verdict.status == "failed" and verdict.error_kind == BAD_REQUEST
    message = one_line(verdict.error)
    assert "refused the request (HTTP 400): This model's maximum context length is 12000" in message
    assert len(server.requests) == 1            # a 400 is not retried


def test_a_wrong_api_key_is_one_line_from_the_judge(make_judge, server, monkeypatch):
    from judge_testing import KEY_ENV

    judge = make_judge(store=False)
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    judge.provider._key = "sk-wrong"
    verdict = _score(judge, Interaction.from_pair("趣味は？", "読書ですわ。", id="m1"))
    assert verdict.error_kind == UNAUTHORIZED
    assert "401 unauthorized — check KYARA_JUDGE_TEST_KEY" in one_line(verdict.error)
    assert "sk-wrong" not in verdict.error


@pytest.fixture
def chat(server, monkeypatch):
    monkeypatch.setenv("KYARA_VLLM_KEY", KEY)
    backends = []

    def build(**extra):
        variant = OpenAIVariant(name="gemma-vllm", backend="openai",
                                model="google/gemma-2-2b-jpn-it", base_url=server.base_url,
                                api_key_env="KYARA_VLLM_KEY", **extra)
        backends.append(OpenAIBackend(variant))
        return backends[-1]

    yield build
    for backend in backends:
        backend.close()


MESSAGES = [{"role": "user", "content": "こんにちは！"}]


def test_a_chat_variant_streams_from_vllm(chat):
    deltas = list(chat().stream(MESSAGES, GenerationOptions(max_new_tokens=32, seed=1)))
    assert "".join(d.text for d in deltas[:-1]) == "ごきげんよう、絢音ですわ。"
    final = deltas[-1]
    assert final.done and final.stop_reason == "eos" and final.completion_tokens == 3


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_prompt_over_max_model_len_is_one_line_from_the_chat_backend(chat, server, wrapped):
    server.wrapped_errors = wrapped
    long = [{"role": "user", "content": "長い" * MAX_MODEL_LEN}]
    with pytest.raises(BackendError) as caught:
        list(chat().stream(long, GenerationOptions(max_new_tokens=32)))
    message = one_line(str(caught.value))
    assert message.startswith("variant 'gemma-vllm': ")
    assert "answered HTTP 400: This model's maximum context length is 12000 tokens" in message
    assert "{" not in message                   # the message, not the JSON body


def test_a_wrong_api_key_is_one_line_from_the_chat_backend(chat, monkeypatch):
    backend = chat()
    monkeypatch.setenv("KYARA_VLLM_KEY", "sk-wrong")
    wrong = chat()
    with pytest.raises(BackendError) as caught:
        list(wrong.stream(MESSAGES, GenerationOptions(max_new_tokens=8)))
    assert "refused the API key from KYARA_VLLM_KEY (401)" in one_line(str(caught.value))
    assert backend is not wrong


def test_the_readme_examples_are_valid_configs():
    """The judge and variant files of README's "Serving on vLLM" load as they are."""
    import re

    import yaml

    from pipelines.config import JudgeConfig, parse_variant
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Serving on vLLM", 1)[1].split("\n### ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    judge = JudgeConfig.model_validate(blocks[0])
    variant = parse_variant(blocks[1], "README.md")
    assert judge.provider == "openai_compatible" and judge.base_url and judge.logprobs
    assert variant.backend == "openai" and variant.base_url == judge.base_url


SYSTEM = [{"role": "system", "content": "あなたは小野寺絢音です。"},
          {"role": "user", "content": "こんにちは！"}]
FOLDED = [{"role": "user", "content": "あなたは小野寺絢音です。\n\nこんにちは！"}]


@pytest.fixture
def fresh_folds(monkeypatch):
    """What this process learnt of servers that refuse the system role, emptied per test."""
    from pipelines.inference import openai_backend

    monkeypatch.setattr(openai_backend, "_FOLDED", set())


def test_a_refused_system_role_is_retried_folded_once_and_remembered(chat, server, fresh_folds):
    backend = chat()
    assert json.loads(backend.render(SYSTEM)) == SYSTEM  # native until the server says no
    deltas = list(backend.stream(SYSTEM, GenerationOptions(max_new_tokens=32, seed=1)))
    assert "".join(d.text for d in deltas[:-1]) == "ごきげんよう、絢音ですわ。"
    final = deltas[-1]
    assert final.stop_reason == "eos"
    assert "refuses the system role (System role not supported)" in final.extra["notice"]
    assert "system_prompt: fold" in final.extra["notice"]
    assert json.loads(final.extra["rendered"]) == FOLDED
    assert [r["messages"] for r in server.requests] == [SYSTEM, FOLDED]
    # remembered: the next turn, and another backend on the same server, go folded at once
    again = list(chat().stream(SYSTEM, GenerationOptions(max_new_tokens=32, seed=1)))
    assert "notice" not in again[-1].extra and server.requests[-1]["messages"] == FOLDED
    assert len(server.requests) == 3
    assert json.loads(backend.render(SYSTEM)) == FOLDED


def test_fold_in_the_config_never_sends_a_system_message(chat, server, fresh_folds):
    deltas = list(chat(system_prompt="fold").stream(SYSTEM, GenerationOptions(max_new_tokens=8)))
    assert deltas[-1].stop_reason == "eos" and "notice" not in deltas[-1].extra
    assert [r["messages"] for r in server.requests] == [FOLDED]


def test_native_in_the_config_keeps_the_refusal_as_one_line(chat, server, fresh_folds):
    with pytest.raises(BackendError) as caught:
        list(chat(system_prompt="native").stream(SYSTEM, GenerationOptions(max_new_tokens=8)))
    assert "answered HTTP 400: System role not supported" in one_line(str(caught.value))
    assert len(server.requests) == 1


def test_another_400_is_not_retried_folded(chat, server, fresh_folds):
    long = [SYSTEM[0], {"role": "user", "content": "長い" * MAX_MODEL_LEN}]
    with pytest.raises(BackendError) as caught:
        list(chat().stream(long, GenerationOptions(max_new_tokens=8)))
    assert "maximum context length" in str(caught.value) and len(server.requests) == 1
