"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the judge's
tests and bench/judge_throughput.py: real HTTP, threaded, programmable per request.

Each request is answered by the first queued Reply, else by `responder(request)`. A
Reply chooses the status, text (with logprobs), headers (Retry-After), raw body (HTML,
malformed JSON), and a delay. The server records every request (body, prompt, auth
header) and the most requests it ever had in flight at once.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    text: str | None = None
    status: int = 200
    body: bytes | None = None                  # replaces the JSON body as given
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    score_logprobs: dict[str, float] | None = None   # top_logprobs at the last digit token
    split_bytes: bool = False                  # non-ASCII characters as two byte-tokens
    tokens: int = 321


def answer(reasoning: str, score: int | str, **options: Any) -> Reply:
    """The judge's format: reasoning, the score on its own line, then the score again."""
    return Reply(text=f"{reasoning}\n{score}\n{score}", **options)


def probabilities(dist: dict[str, float]) -> dict[str, float]:
    """{"7": 0.7, "6": 0.3} -> logprobs."""
    return {token: math.log(p) for token, p in dist.items()}


@dataclass
class Request:
    index: int
    body: dict[str, Any]
    auth: str | None
    path: str

    @property
    def prompt(self) -> str:
        return "\n".join(m.get("content", "") for m in self.body.get("messages", []))


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, responder: Callable[[Request], Reply] | None = None,
                 delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.responder = responder or (lambda request: answer("理由を述べます。", 4))
        self.delay = delay                     # added to every answer
        self.queue: deque[Reply] = deque()
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered = 0                      # replies fully written
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> ScriptedServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.queue.clear()
            self.max_in_flight = self.in_flight
            self.answered = 0

    def _next(self, request: Request) -> Reply:
        with self._lock:
            if self.queue:
                return self.queue.popleft()
        return self.responder(request)


def completion_body(reply: Reply, model: str) -> bytes:
    text = reply.text or ""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": reply.text}}
    if reply.score_logprobs is not None:
        choice["logprobs"] = {"content": _token_logprobs(text, reply)}
    body = {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 0,
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": reply.tokens - 21, "completion_tokens": 21,
                      "total_tokens": reply.tokens}}
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def _token_logprobs(text: str, reply: Reply) -> list[dict[str, Any]]:
    """One token per character (non-ASCII ones split into byte pieces when asked, as
    OpenAI does). The score distribution is where a real judge has it: at the digit of the
    first of the trailing score lines, where it decides; the repeat below it is a copy of
    that digit, certain (p ~ 1), as gpt-4o-mini writes it."""
    tokens: list[dict[str, Any]] = []
    first_token: list[int] = []  # character index -> index of its first token
    for char in text:
        first_token.append(len(tokens))
        raw = char.encode("utf-8")
        if reply.split_bytes and len(raw) > 1:
            for piece in (raw[:1], raw[1:]):
                tokens.append({"token": "bytes:" + piece.hex(), "logprob": -0.01,
                               "bytes": list(piece), "top_logprobs": []})
        else:
            tokens.append({"token": char, "logprob": -0.01, "bytes": list(raw),
                           "top_logprobs": [{"token": char, "logprob": -0.01, "bytes": list(raw)}]})
    score_lines = _trailing_score_digits(text)
    if not score_lines or not reply.score_logprobs:
        return tokens
    decided, *repeats = score_lines
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())}
           for t, lp in sorted(reply.score_logprobs.items(), key=lambda kv: -kv[1])]
    top.append({"token": "。", "logprob": -9.0, "bytes": list("。".encode())})
    at = tokens[first_token[decided]]
    at["top_logprobs"] = top
    chosen = reply.score_logprobs.get(at["token"])
    if chosen is not None:
        at["logprob"] = chosen
    for offset in repeats:
        copy = tokens[first_token[offset]]
        copy["logprob"] = -1e-4
        copy["top_logprobs"] = [{"token": copy["token"], "logprob": -1e-4,
                                 "bytes": copy["bytes"]},
                                *({"token": t["token"], "logprob": -12.0, "bytes": t["bytes"]}
                                  for t in top if t["token"] != copy["token"])]
    return tokens


_SCORE_LINE = re.compile(r"^[\s*#:_]*(?:score|スコア|評価)?[\s*:：_]*([1-7１-７])[\s*_。.]*$",
                         re.IGNORECASE)


def _trailing_score_digits(text: str) -> list[int]:
    """Character offsets of the digits of the score lines that end the text, top first."""
    found: list[int] = []
    end = len(text)
    while end > 0:
        start = text.rfind("\n", 0, end) + 1
        line = text[start:end]
        end = start - 1
        if not line.strip():
            continue
        match = _SCORE_LINE.match(line)
        if not match:
            break
        found.insert(0, start + match.start(1))
    return found


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real API servers do

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every kept-alive answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if not _stats_handler(self):
            self.send_error(404)

    def do_DELETE(self) -> None:  # DELETE /stats resets the counters
        if self.path == "/stats":
            self.server.reset()
            self.send_response(204)
            self.end_headers()
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        srv = self.server
        with srv._lock:
            request = Request(len(srv.requests), body, self.headers.get("Authorization"), self.path)
            srv.requests.append(request)
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            reply = srv._next(request)
            time.sleep(srv.delay + reply.delay)
            if reply.body is not None:
                data = reply.body
            elif reply.status != 200:
                data = json.dumps({"error": {"message": f"scripted {reply.status}",
                                             "type": "scripted"}}).encode()
            else:
                data = completion_body(reply, body.get("model", "?"))
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            with srv._lock:
                srv.answered += 1
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass  # the client gave up (a timeout test)
        finally:
            with srv._lock:
                srv.in_flight -= 1


def _stats_handler(handler: _Handler) -> bool:
    """GET /stats and POST /reset, for a server run as its own process (the bench)."""
    srv = handler.server
    if handler.path == "/stats":
        with srv._lock:
            data = json.dumps({"count": len(srv.requests), "max_in_flight": srv.max_in_flight,
                               "answered": srv.answered}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return True
    return False


def main() -> None:
    """Serve until killed: `python scripted_judge_server.py [--delay S]`; prints the base
    URL on the first line of stdout. Answers: four steps of reasoning and 5, with logprobs."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()

    def respond(request: Request) -> Reply:
        reasoning = "\n".join(f"{i}. 観点{i}について検討しました。" for i in range(1, 5))
        return answer(reasoning, 5, score_logprobs={"5": math.log(0.7), "6": math.log(0.3)})

    server = ScriptedServer(respond, delay=args.delay)
    print(server.base_url, flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
