"""The scripted judge server (scripted_judge_server.py) plus OpenAI's Batch API: /v1/files
(multipart upload, content download) and /v1/batches (create, retrieve, cancel), real
HTTP, with the wire shapes of OpenAI's reference (Batch objects, output and error files of
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}` rows).

A batch's fate is scripted by `server.script` (a BatchScript): how many polls it stays
`in_progress`, how it ends (completed, expired, cancelled, failed), how many of its
requests run before an expiry or a cancel, which requests fail (error file rows), and
garbage or refusals on purpose. Each request the batch runs is answered by the server's
responder, as a live call would be, and its body recorded in `server.batch_bodies`.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.judge.scripted_judge_server import Request, ScriptedServer, _Handler, completion_body


@dataclass
class BatchScript:
    polls: int = 1                         # retrieves answered in_progress before the end
    outcome: str = "completed"             # completed | expired | cancelled | failed
    run: int | None = None                 # requests run before an expiry / cancel
    fail: Callable[[dict[str, Any]], bool] = lambda body: False  # -> an error file row
    create_status: int | None = None       # e.g. 429: the create is refused
    garbage_retrieve: bool = False         # retrieve answers HTML
    garbage_lines: int = 0                 # lines of junk at the top of the output file


@dataclass
class Batch:
    id: str
    input_file_id: str
    status: str = "validating"
    polls: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0,
                                                            "failed": 0})
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancel_asked: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "batch", "endpoint": "/v1/chat/completions",
                "errors": {"object": "list", "data": self.errors} if self.errors else None,
                "input_file_id": self.input_file_id, "completion_window": "24h",
                "status": self.status, "output_file_id": self.output_file_id,
                "error_file_id": self.error_file_id, "created_at": 1700000000,
                "request_counts": dict(self.counts), "metadata": {}}


class BatchServer(ScriptedServer):
    def __init__(self, responder=None, delay: float = 0.0) -> None:
        super().__init__(responder, delay)
        self.RequestHandlerClass = _BatchHandler
        self.script = BatchScript()
        self.files: dict[str, tuple[str, bytes]] = {}     # id -> (purpose, bytes)
        self.batches: dict[str, Batch] = {}
        self.batch_bodies: list[dict[str, Any]] = []      # requests the batches ran
        self.calls: list[str] = []                        # "POST /v1/batches", ...
        self._batch_lock = threading.Lock()

    @property
    def live(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def uploads(self) -> list[bytes]:
        return [data for purpose, data in self.files.values() if purpose == "batch"]

    def _add_file(self, purpose: str, data: bytes) -> str:
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = (purpose, data)
        return file_id

    def _advance(self, batch: Batch) -> None:
        """One retrieve: in_progress for `polls` retrieves, then the scripted end."""
        script = self.script
        if batch.status in ("completed", "expired", "cancelled", "failed"):
            return
        lines = [json.loads(line) for line in self.files[batch.input_file_id][1].splitlines()
                 if line.strip()]
        batch.counts["total"] = len(lines)
        if script.outcome == "failed":
            batch.status = "failed"
            batch.errors = [{"code": "invalid_request", "line": 1, "param": "body.model",
                             "message": "scripted: the model is not available for batches"}]
            return
        if batch.polls < script.polls and not batch.cancel_asked:
            batch.polls += 1
            batch.status = "in_progress"
            batch.counts["completed"] = min(len(lines), batch.polls)
            return
        ending = "cancelled" if batch.cancel_asked else script.outcome
        ran = lines if ending == "completed" or script.run is None else lines[:script.run]
        out, errors = [], []
        for index, line in enumerate(ran):
            body = line["body"]
            self.batch_bodies.append(body)
            row_id = f"batch_req_{index}"
            if script.fail(body):
                errors.append({"id": row_id, "custom_id": line["custom_id"], "response": {
                    "status_code": 500, "request_id": f"req_{index}",
                    "body": {"error": {"message": "scripted server error",
                                       "type": "server_error"}}}, "error": None})
                continue
            reply = self.responder(Request(-1, body, None, "/v1/chat/completions"))
            if reply.status != 200:
                errors.append({"id": row_id, "custom_id": line["custom_id"], "response": None,
                               "error": {"code": "scripted", "message": f"status {reply.status}"}})
                continue
            out.append({"id": row_id, "custom_id": line["custom_id"], "response": {
                "status_code": 200, "request_id": f"req_{index}",
                "body": json.loads(completion_body(reply, body.get("model", "?")))},
                "error": None})
        if ending == "expired":  # OpenAI puts the requests that never ran in the error file
            for line in lines[len(ran):]:
                errors.append({"id": "batch_req_x", "custom_id": line["custom_id"],
                               "response": None, "error": {"code": "batch_expired", "message":
                               "This request could not be executed before the completion "
                               "window expired."}})
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in out)
        text = "not json at all\n" * script.garbage_lines + text
        if out or script.garbage_lines:
            batch.output_file_id = self._add_file("batch_output", text.encode())
        if errors:
            batch.error_file_id = self._add_file("batch_output", "".join(
                json.dumps(row) + "\n" for row in errors).encode())
        batch.counts["completed"] = len(out)
        batch.counts["failed"] = len(errors)
        batch.status = ending


class _BatchHandler(_Handler):
    server: BatchServer

    def _json(self, status: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": "scripted",
                                      "code": "scripted"}})

    def do_POST(self) -> None:
        srv = self.server
        path = self.path
        if path.endswith("/chat/completions"):
            return super().do_POST()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        with srv._batch_lock:
            srv.calls.append(f"POST {path}")
            if path == "/v1/files":
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                parts = {p.get_param("name", header="content-disposition"): p
                         for p in message.iter_parts()}
                purpose = parts["purpose"].get_content().strip()
                data = parts["file"].get_payload(decode=True)
                file_id = srv._add_file(purpose, data)
                return self._json(200, {"id": file_id, "object": "file", "bytes": len(data),
                                        "created_at": 1700000000, "filename": "input.jsonl",
                                        "purpose": purpose, "status": "processed"})
            if path == "/v1/batches":
                if srv.script.create_status is not None:
                    return self._error(srv.script.create_status,
                                       "Enqueued token limit reached for scripted-judge")
                body = json.loads(raw)
                if body.get("input_file_id") not in srv.files:
                    return self._error(400, "no such file")
                batch = Batch(f"batch_{len(srv.batches) + 1}", body["input_file_id"])
                srv.batches[batch.id] = batch
                return self._json(200, batch.to_json())
            if path.startswith("/v1/batches/") and path.endswith("/cancel"):
                batch = srv.batches.get(path.split("/")[3])
                if batch is None:
                    return self._error(404, "no such batch")
                batch.cancel_asked = True
                if batch.status not in ("completed", "expired", "cancelled", "failed"):
                    batch.status = "cancelling"
                return self._json(200, batch.to_json())
        self._error(404, f"no route {path}")

    def do_GET(self) -> None:
        srv = self.server
        path = self.path
        with srv._batch_lock:
            srv.calls.append(f"GET {path}")
            if path.startswith("/v1/files/") and path.endswith("/content"):
                found = srv.files.get(path.split("/")[3])
                if found is None:
                    return self._error(404, "no such file")
                data = found[1]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if path.startswith("/v1/batches/"):
                batch = srv.batches.get(path.split("/")[3])
                if batch is None:
                    return self._error(404, "no such batch")
                if srv.script.garbage_retrieve:
                    data = b"<html>502 Bad Gateway</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                srv._advance(batch)
                return self._json(200, batch.to_json())
        super().do_GET()
