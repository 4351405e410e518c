"""`kyara judge` and `kyara judge calibrate`: in-process through typer's runner, and for
real in a subprocess where it matters (SIGKILL and resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from judge_testing import KEY, REPO, kyara_command, set_judge
from scripted_judge_server import Reply, answer
from typer.testing import CliRunner

from console.cli import app
from store import Store

DIALOGUES = REPO / "configs" / "personas" / "ayane" / "dialogues.jsonl"


def first_lines(path, n, target):
    lines = path.read_text(encoding="utf-8").splitlines()[:n]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def invoke(*args, configs):
    runner = CliRunner()
    return runner.invoke(app, list(args), env={"KYARA_CONFIGS": str(configs), "COLUMNS": "160"},
                         catch_exceptions=False)


def test_judge_a_dialogues_file(server, configs, tmp_path):
    server.responder = lambda request: (answer("口調。", 3) if "speech style" in request.prompt
                                        else answer("性格。", 6))
    data = first_lines(DIALOGUES, 6, tmp_path / "d.jsonl")
    out = tmp_path / "out.jsonl"
    result = invoke("judge", str(data), "--criteria", "personality,style", "--judge", "scripted",
                    "--persona", "ayane", "-o", str(out), configs=configs)
    assert result.exit_code == 0, result.output
    assert server.count == 12
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"d00{i}" for i in range(1, 7)]
    assert all(r["messages"] for r in rows)  # the input row is kept
    assert {(r["verdicts"]["personality"]["score"], r["verdicts"]["style"]["score"])
            for r in rows} == {(6, 3)}
    assert rows[0]["verdicts"]["style"]["status"] == "ok"
    text = result.stdout
    for word in ("personality", "style", "mean", "6.00", "3.00", "invalid", "failed"):
        assert word in text
    # Resume: nothing is missing, nothing is asked.
    again = invoke("judge", "score", str(data), "-c", "personality,style", "-j", "scripted",
                   configs=configs)
    assert again.exit_code == 0 and server.count == 12


def test_calibration_rows_as_data_and_the_failure_exit(server, configs, tmp_path):
    rows = [{"id": f"r{i}", "question": f"質問{i}", "reply": f"返答{i}ですわ。"} for i in range(4)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    server.responder = lambda request: (Reply(status=400) if "返答2" in request.prompt
                                        else Reply(text="点なし") if "返答3" in request.prompt
                                        else answer("理由。", 5))
    result = invoke("judge", str(data), "-c", "personality", "-j", "scripted", configs=configs)
    assert result.exit_code == 1  # one failed: run again to retry it
    assert "1 verdict(s) failed" in result.stderr
    assert "bad_request 1" in result.stdout


@pytest.mark.parametrize("args, words", [
    (["--criteria", "charisma"], "unknown criterion 'charisma'"),
    (["--judge", "nobody"], "judge 'nobody' not found"),
    (["--persona", "nobody"], "persona 'nobody' not found"),
])
def test_user_errors_are_one_line(server, configs, tmp_path, args, words):
    data = first_lines(DIALOGUES, 1, tmp_path / "d.jsonl")
    result = invoke("judge", str(data), "-j", "scripted", *args, configs=configs)
    assert result.exit_code == 2 and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and server.count == 0


def test_bad_data_is_one_line(server, configs, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a", "text": "no messages"}\n', encoding="utf-8")
    result = invoke("judge", str(data), "-j", "scripted", configs=configs)
    assert result.exit_code == 2 and "bad.jsonl:1: expected 'messages'" in result.stderr
    missing = invoke("judge", str(tmp_path / "none.jsonl"), "-j", "scripted", configs=configs)
    assert missing.exit_code == 2 and "no such file" in missing.stderr


def test_calibrate_prints_the_agreement_and_saves_it(server, configs, tmp_path):
    from pipelines.judge import load_calibration
    from pipelines.workspace import Workspace

    calibration = Workspace.load(configs).persona_data("ayane").calibration
    by_reply = {r.reply: r.score for r in calibration}

    def human(request):
        block = request.prompt.rsplit("[Interactions]", 1)[1]
        return answer("理由。", next(s for reply, s in by_reply.items()
                                    if f"[assistant] {reply}\n<<<END-" in block))

    server.responder = human
    result = invoke("judge", "calibrate", "--persona", "ayane", "--judge", "scripted",
                    "--criterion", "personality", configs=configs)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Spearman ρ" in text and "1.000" in text and "100.0%" in text
    assert "within ±1" in text and "mean absolute error" in text
    assert "human (rows) × judge (columns)" in text
    saved = load_calibration(os.environ["KYARA_HOME"], "scripted")["ayane/personality"]
    assert saved.agreement.n == 91 and saved.model == "scripted-judge"
    assert "calibration.json" in result.stderr


def test_killed_with_sigkill_and_run_again_judges_only_what_is_missing(server, configs,
                                                                      tmp_path):
    set_judge(configs, concurrency=2)
    server.delay = 0.1
    n = 30
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"k{i}", "question": f"質問{i}",
                                        "reply": f"返答{i}ですわ。"}, ensure_ascii=False) + "\n"
                            for i in range(n)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    command = kyara_command("judge", str(data), "-c", "personality", "-j", "scripted",
                            "-o", str(out))
    env = {**os.environ, "KYARA_CONFIGS": str(configs)}
    store = Store.open(os.path.join(os.environ["KYARA_HOME"], "store"))
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # Kill it once some verdicts are in the store and others are on their way.
        while (store.count("judgments") < 4 and time.monotonic() < deadline
               and process.poll() is None):
            time.sleep(0.03)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    kept = store.count("judgments", "status = 'ok'")
    assert 0 < kept < n, kept
    assert not out.exists()  # never half a file
    time.sleep(0.2)  # requests the dead process had just sent reach the count
    first_run = server.count
    server.delay = 0.0
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert server.count - first_run == n - kept  # only what was missing
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n and all(r["verdicts"]["personality"]["status"] == "ok" for r in rows)
    assert store.count("judgments") == n
    assert KEY not in result.stdout + result.stderr
