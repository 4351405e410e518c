"""A chat template that never ends, and a model process that never answers, are one line,
not a hang (issue 27, item 9): a render has a budget (time, output, range items); the
worker's render request a timeout, after which the child is stopped and the next request
starts a fresh one."""

from __future__ import annotations

import time

import pytest

from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.prompting import TemplateError, render_chat

MESSAGES = [{"role": "user", "content": "こんにちは"}]


@pytest.mark.parametrize("template, says", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "its loops ask for over"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}"
     "{% endfor %}", "stopped"),
])
def test_a_template_that_never_ends_stops_in_one_line(template, says):
    started = time.monotonic()
    with pytest.raises(TemplateError) as err:
        render_chat(template, MESSAGES)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - started < 10


def test_a_normal_template_still_renders():
    out = render_chat("{% for m in messages %}{{ m.content }}{% endfor %}"
                      "{% for i in range(3) %}.{% endfor %}", MESSAGES)
    assert out == "こんにちは..."


def test_a_render_the_worker_never_answers_is_one_line(tmp_path, monkeypatch):
    from pipelines.inference import worker
    from tests.inference.standin_backends import standin_variant

    monkeypatch.setenv("KYARA_BACKEND_MODULES",
                       "gguf=tests.inference.standin_backends:CrashBackend")
    monkeypatch.setenv("KYARA_STANDIN_RENDER_SLEEP", "30")
    monkeypatch.setattr(worker, "RENDER_TIMEOUT_S", 1.0)
    backend = worker.WorkerBackend(standin_variant(tmp_path), tmp_path / "home")
    try:
        with pytest.raises(BackendError) as err:
            backend.render(MESSAGES)
        message = str(err.value)
        assert "did not answer within 1 s while rendering the prompt" in message
        assert "\n" not in message
        monkeypatch.delenv("KYARA_STANDIN_RENDER_SLEEP")  # a fresh child, well behaved
        text = "".join(d.text for d in backend.stream(MESSAGES, GenerationOptions(
            max_new_tokens=3)) if not d.done)
        assert text
    finally:
        backend.close()
