"""The eval job end to end on stand-ins that behave by rule: EchoBackend answers in Ayane's
register only for variants named *ayane*, and the scripted judge server (real HTTP) scores
ですわ 6 and anything else 2 and prefers the reply with ですわ. So every figure in the
results is known by hand; the tests check the job carries them through, resumes without
repeating work, refuses what costs too much, and shows failures as missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_job
from store import Store
from tests.conftest import CONFIGS, REPO
from tests.jobs.eval_standins import (
    COUNT_ENV,
    EVAL_BACKENDS,
    blocks,
    call_key,
    is_pairwise,
    judge_text,
)
from tests.judge.scripted_judge_server import Reply, ScriptedServer

KEY_ENV = "KYARA_TEST_JUDGE_KEY"


@pytest.fixture
def server():
    with ScriptedServer(lambda request: Reply(text=judge_text(request.prompt))) as srv:
        yield srv


@pytest.fixture
def env(tmp_path, server, monkeypatch):
    """configs/ (the real persona with its question sets, the criteria), two stand-in
    variants, a judge on the scripted server; the environment a subprocess needs too."""
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS / "personas", configs / "personas")
    shutil.copytree(CONFIGS / "judges" / "criteria", configs / "judges" / "criteria")
    (configs / "models").mkdir()
    (configs / "jobs").mkdir()
    for name in ("base-s", "ayane-s"):
        model = tmp_path / f"{name}.gguf"
        model.write_bytes(b"GGUF")
        (configs / "models" / f"{name}.yaml").write_text(
            f"name: {name}\nbackend: gguf\npath: {model}\npersona: ayane\n", encoding="utf-8")
    judge = {"name": "scripted", "provider": "openai_compatible", "model": "scripted-judge",
             "base_url": server.base_url, "api_key_env": KEY_ENV, "criteria": ["personality"],
             "few_shot": 2, "concurrency": 4, "timeout_s": 5, "max_retries": 1,
             "logprobs": False, "prices": {"input": 0.15, "output": 0.60}}
    (configs / "judges" / "scripted.yaml").write_text(yaml.safe_dump(judge), encoding="utf-8")
    home = tmp_path / "home"
    (configs / "kyara.yaml").write_text(yaml.safe_dump({"home": str(home)}), encoding="utf-8")
    values = {"KYARA_HOME": str(home), "KYARA_CONFIGS": str(configs),
              "KYARA_BACKEND_MODULES": EVAL_BACKENDS, KEY_ENV: "sk-test",
              COUNT_ENV: str(tmp_path / "generations.txt")}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {"configs": configs, "home": home, "env": values,
            "count": tmp_path / "generations.txt"}


def job_file(env, **changes) -> Path:
    cfg = {"job": "eval", "name": "eval-test", "persona": "ayane",
           "variants": ["base-s", "ayane-s"], "rag": [False], "judge": "scripted",
           "criteria": ["personality", "style"], "pairwise_criteria": ["personality"],
           "limits": {"heldout": 4, "probes": 2, "scripts": 1}, "max_new_tokens": 64,
           "reference": "base-s", **changes}
    path = env["configs"] / "jobs" / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_job(env, path: Path):
    from pipelines.jobs import JobContext
    from pipelines.jobs.eval import run
    from pipelines.workspace import Workspace

    ws = Workspace.load(env["configs"])
    run_dir = env["home"] / "runs" / f"r{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    ctx = JobContext.create(ws, run_dir, store=Store.open(ws.settings.store_path()))
    return list(run(load_job(path), ctx)), ctx


def generations(env) -> list[str]:
    path = env["count"]
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_the_table_carries_the_judged_figures(env, server):
    events, ctx = run_job(env, job_file(env))
    final = events[-1]
    assert final.type == "done", final
    assert [e.stage for e in events if e.type == "stage"] == [
        "validate", "plan", "generate", "judge", "pairwise", "results", "report"]
    out = Path(final.summary["output"])
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    # 2 combinations x (4 held-out + 2 probes + 1 script)
    assert len(replies) == 14 and final.summary["generated"] == 14
    script = next(r for r in replies if r["set"] == "scripts" and r["combo"] == "ayane-s")
    assert len(script["transcript"]) == 2 * len(script["turn_stops"]) >= 8  # every turn answered
    # generations: 2 x (4 + 2) single turns + 2 x the script's turns
    assert len(generations(env)) == 12 + 2 * len(script["turn_stops"])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {row["combo"]: row for row in results["headline"]}
    # ayane-s always says ですわ (6), base-s never (2): the means and the paired difference
    assert rows["ayane-s"]["criteria"]["personality"]["mean"] == pytest.approx(6.0)
    assert rows["base-s"]["criteria"]["personality"]["mean"] == pytest.approx(2.0)
    assert rows["ayane-s"]["criteria"]["personality"]["diff"]["mean"] == pytest.approx(4.0)
    assert rows["ayane-s"]["criteria"]["personality"]["n"] == 6  # 4 held-out + 2 probes
    assert rows["ayane-s"]["criteria"]["stability"]["mean"] == pytest.approx(6.0)  # the script
    assert rows["ayane-s"]["criteria"]["hallucination"]["n"] == 2  # probes only
    # pairwise: both orders pick ayane-s: 6 wins of 6
    pair = rows["ayane-s"]["pairwise"]["personality"]
    assert pair["win"]["k"] == 6 and pair["n"] == 6 and rows["base-s"]["pairwise"] == {}
    # calls: scores 2 x (4x2 + 2x3 + 1x1) = 30, pairwise 6 x 2 orders = 12
    asked = [call_key(r.prompt) for r in server.requests]
    assert sum(is_pairwise(r.prompt) for r in server.requests) == 12
    assert len(asked) == 42 and len(set(asked)) == 42
    assert final.summary["judge_requests"] == 42
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    # the arena: Bradley–Terry from this run's pairwise outcomes (6 wins of ayane-s)
    judged = results["arena"]["judge"]
    assert judged["games"] == 6 and [r["player"] for r in judged["ratings"]] == [
        "ayane-s", "base-s"]
    assert judged["ratings"][0]["wins"] == 6 and results["arena"]["human"]["games"] == 0
    report_md = (out / "report.md").read_text(encoding="utf-8")
    assert "### Arena" in report_md and "the judge's pairwise verdicts: 6 games" in report_md
    # the replies are in the store too, as eval sessions (not in the chat history)
    sessions = ctx.store.rows("sessions", where="kind = 'eval'")
    assert sorted(s["title"] for s in sessions) == [
        "eval eval-test · ayane-s · RAG off", "eval eval-test · base-s · RAG off"]
    stored = ctx.store.get("messages", replies[0]["id"])
    assert stored["content"] == replies[0]["text"] and stored["rendered_prompt"]
    from console.history import session_rows

    assert session_rows(ctx.store) == []


def test_a_second_run_repeats_nothing(env, server):
    path = job_file(env)
    first, _ = run_job(env, path)
    assert first[-1].type == "done"
    made, asked = len(generations(env)), server.count
    second, _ = run_job(env, path)
    assert second[-1].type == "done", second[-1]
    assert len(generations(env)) == made and server.count == asked
    assert second[-1].summary["generated"] == 0 and second[-1].summary["judge_requests"] == 0
    one = json.loads((Path(first[-1].summary["output"]) / "results.json").read_text())
    two = json.loads((Path(second[-1].summary["output"]) / "results.json").read_text())
    assert one["headline"] == two["headline"]


def test_cost_is_shown_and_refused_before_work(env, server):
    path = job_file(env, max_cost_usd=0.0001)
    with pytest.raises(ConfigError) as caught:
        run_job(env, path)
    message = str(caught.value)
    assert "max_cost_usd" in message and "force: true" in message and "\n" not in message
    assert generations(env) == [] and server.count == 0
    plan = json.loads((env["home"] / "evals" / "eval-test" / "plan.json").read_text())
    from pipelines.workspace import Workspace

    turns = len(Workspace.load(env["configs"]).persona_data("ayane").scripts[0].turns)
    assert plan["generations"] == 2 * (4 + 2 + turns)
    assert plan["judge_calls"] == {"scores": 30, "pairwise": 12}
    assert plan["usd"] > 0.0001
    events, _ = run_job(env, job_file(env, max_cost_usd=0.0001, force=True))
    assert events[-1].type == "done"
    log = " ".join(e.message or "" for e in events if e.type == "log")
    assert "judge calls: 30 scores + 12 pairwise" in log and "$" in log


def test_failures_are_missing_never_scores(env, server, tmp_path):
    """A reply the model broke is not judged; a verdict the judge failed is missing, and a
    rerun asks it again."""
    questions = tmp_path / "questions.jsonl"
    rows = [{"id": "q1", "question": "犬の名前は？"}, {"id": "q2", "question": "故障して"},
            {"id": "q3", "question": "好きな紅茶は？"}]
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                         encoding="utf-8")
    rows.append({"id": "q4", "question": "趣味は何？"})
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                         encoding="utf-8")
    broken_judge = threading.Event()
    broken_judge.set()

    def respond(request):
        if not is_pairwise(request.prompt):
            judged = blocks(request.prompt)[-1]  # the interaction (anchors say other things)
            if broken_judge.is_set() and "紅茶" in judged:
                return Reply(status=500)  # no answer after the retries: failed
            if "趣味" in judged:
                return Reply(text="I cannot decide.")  # an answer without a score: invalid
        return Reply(text=judge_text(request.prompt))

    server.responder = respond
    path = job_file(env, sets=["heldout"], questions=str(questions), limits={},
                    criteria=["personality"])
    events, _ = run_job(env, path)
    assert events[-1].type == "done", events[-1]
    out = Path(events[-1].summary["output"])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {row["combo"]: row for row in results["headline"]}
    personality = rows["ayane-s"]["criteria"]["personality"]
    # q2 broken, q3 failed, q4 invalid: one score, three missing; the mean is q1's alone
    assert personality["n"] == 1 and personality["missing"] == 3
    assert personality["mean"] == pytest.approx(6.0)
    q2 = next(q for q in results["questions"] if q["id"] == "q2")
    assert q2["replies"]["ayane-s"]["error"] and q2["replies"]["ayane-s"]["scores"][
        "personality"] is None
    broken_judge.clear()  # the judge answers now
    before = server.count
    events, _ = run_job(env, path)
    assert events[-1].type == "done"
    # the failed verdicts (q3, both combinations) are asked again; the invalid ones (q4)
    # are answers and stay; q2 is generated again and breaks again: never judged
    assert server.count - before == 2
    assert sum("故障" in line for line in generations(env)) == 4
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    personality = {r["combo"]: r for r in results["headline"]}["ayane-s"]["criteria"][
        "personality"]
    assert personality["n"] == 2 and personality["missing"] == 2


def test_bad_configs_are_one_line(env):
    with pytest.raises(ConfigError) as caught:
        run_job(env, job_file(env, variants=["nope"]))
    assert "nope" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        run_job(env, job_file(env, criteria=["personality", "charm"]))
    assert "charm" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        run_job(env, job_file(env, pairwise_criteria=["values"]))
    assert "pairwise_criteria" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_job(job_file(env, reference="ayane-s+rag"))
    assert "reference" in str(caught.value)


def _runner(env, path: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", "run", str(path), "--run-dir", str(run_dir),
         "--configs", str(env["configs"])],
        cwd=REPO, env={**os.environ, **env["env"]}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sigkill_anywhere_then_resume_repeats_no_finished_work(env, server, tmp_path):
    """Killed while generating, then killed while judging (answers delivered and stored,
    others in flight), the run resumed: no reply generated twice, no delivered judge
    answer asked for again."""
    path = job_file(env)
    replies = env["home"] / "evals" / "eval-test" / "replies.jsonl"

    # 1. killed while generating (a slow stand-in: one reply every ~0.2 s)
    slow = {**env["env"], "KYARA_EVAL_SLOW": "0.2"}
    proc = _runner({**env, "env": slow}, path, tmp_path / "run1")
    _wait(lambda: replies.exists() and len(replies.read_text().splitlines()) >= 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    kept_rows = [json.loads(line) for line in replies.read_text().splitlines()
                 if line.strip().endswith("}")]
    kept = {r["id"] for r in kept_rows}
    assert 3 <= len(kept) < 14
    kept_asks = {f"{r['variant']}\t{r['question']}" for r in kept_rows if r["set"] != "scripts"}
    made_before = len(generations(env))

    # 2. killed while judging: after 5 delivered answers the server holds every request
    hold = threading.Event()
    delivered: list[str] = []

    def respond(request):
        if len(delivered) >= 5:
            hold.wait(30)
        delivered.append(call_key(request.prompt))
        return Reply(text=judge_text(request.prompt))

    server.responder = respond
    proc = _runner(env, path, tmp_path / "run2")
    store = Store.open(env["home"] / "store")
    _wait(lambda: len(delivered) >= 5 and store.count(
        "judgments", where="status = 'ok'") >= 5, timeout=90)
    answered = set(delivered[:5])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    hold.set()
    made = generations(env)
    assert not kept_asks & set(made[made_before:])  # no kept reply generated again

    # 3. resumed to the end
    server.requests.clear()
    server.responder = lambda request: Reply(text=judge_text(request.prompt))
    proc = _runner(env, path, tmp_path / "run3")
    assert proc.wait(120) == 0, proc.stderr.read().decode()[-2000:]
    again = {call_key(r.prompt) for r in server.requests}
    assert not again & answered  # nothing delivered and stored was asked again
    rows = [json.loads(line) for line in replies.read_text().splitlines() if line.strip()]
    assert {r["id"] for r in rows} >= kept and len({r["id"] for r in rows}) == 14
    assert generations(env) == made  # everything was generated before run 2 was killed
    results = json.loads((replies.parent / "results.json").read_text(encoding="utf-8"))
    assert {row["combo"] for row in results["headline"]} == {"base-s", "ayane-s"}


def test_retrieval_on_indexes_once_and_carries_the_facts(env, server):
    """rag: [false, true] on an unindexed persona: the job indexes it first (what `kyara
    index` does), the RAG combinations' prompts carry the retrieved facts, and the fact
    figure follows the replies (the stand-in names the dog only when given facts)."""
    events, _ = run_job(env, job_file(env, rag=[False, True], sets=["heldout"],
                                      limits={"heldout": 3}, pairwise_criteria=[]))
    final = events[-1]
    assert final.type == "done", final
    logs = " ".join(e.message or "" for e in events if e.type == "log")
    assert "not indexed; indexed knowledge.jsonl" in logs
    out = Path(final.summary["output"])
    replies = {(r["combo"], r["question_id"]): r for r in map(
        json.loads, (out / "replies.jsonl").read_text(encoding="utf-8").splitlines())}
    assert len(replies) == 4 * 3
    dog = replies[("ayane-s+rag", "e001")]
    assert dog["retrieved_ids"] and "参考" in dog["rendered_prompt"] and dog["fact_hit"] is True
    assert replies[("ayane-s", "e001")]["retrieved_ids"] is None
    assert replies[("ayane-s", "e001")]["fact_hit"] is False
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    facts = {row["combo"]: row["facts"] for row in results["headline"]}
    assert facts["ayane-s+rag"]["k"] > facts["ayane-s"]["k"]
    assert facts["ayane-s"]["n"] == 3  # e000-e002 all name an expected fact


def test_a_simulated_user_plays_the_asker(env, server):
    """sets: [simulated]: the scenario's opening, then turns the simulator (any
    OpenAI-compatible model, here the scripted server) writes from the conversation so far;
    the whole transcript is judged on the script criteria."""
    events, _ = run_job(env, job_file(env, sets=["simulated"], simulator="scripted",
                                      simulated_turns=3, limits={"simulated": 1},
                                      pairwise_criteria=[]))
    final = events[-1]
    assert final.type == "done", final
    out = Path(final.summary["output"])
    rows = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    from pipelines.workspace import Workspace

    opening = Workspace.load(env["configs"]).persona_data("ayane").scenarios[0].opening
    users = [m["content"] for m in rows[0]["transcript"] if m["role"] == "user"]
    assert users == [opening, "では、2つ目の質問です。好きな花は？",
                     "では、3つ目の質問です。好きな花は？"]
    simulated = [r for r in server.requests if r.prompt.startswith("You play a user")]
    assert len(simulated) == 2 * 2  # two turns written per combination
    assert "[小野寺絢音]" in simulated[-1].prompt  # the simulator saw the character's replies
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows_ = {row["combo"]: row for row in results["headline"]}
    assert rows_["ayane-s"]["criteria"]["stability"]["mean"] == pytest.approx(6.0)


def test_a_simulated_user_is_asked_again_after_a_retryable_error(env, server):
    """The simulator's provider fails once with a retryable error (HTTP 500, Retry-After
    0), then answers: asked again as the judge asks again, so the reply has no error."""
    failed: list[int] = []

    def respond(request):
        if request.prompt.startswith("You play a user") and not failed:
            failed.append(request.index)
            return Reply(status=500, headers={"Retry-After": "0"})
        return Reply(text=judge_text(request.prompt))

    server.responder = respond
    events, _ = run_job(env, job_file(env, sets=["simulated"], simulator="scripted",
                                      simulated_turns=3, limits={"simulated": 1},
                                      pairwise_criteria=[]))
    assert events[-1].type == "done", events[-1]
    assert failed  # the first simulator request failed
    out = Path(events[-1].summary["output"])
    rows = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(not r["error"] for r in rows)
    for row in rows:
        users = [m["content"] for m in row["transcript"] if m["role"] == "user"]
        assert users[1:] == ["では、2つ目の質問です。好きな花は？",
                             "では、3つ目の質問です。好きな花は？"]
    simulated = [r for r in server.requests if r.prompt.startswith("You play a user")]
    assert len(simulated) == 2 * 2 + 1  # two turns per combination, one asked twice


def test_an_eval_run_opens_the_judge_and_the_retriever_once(env, server, monkeypatch):
    """Plan, judge, pairwise and results share one Judge; generation one Retriever."""
    from pipelines.judge.runner import Judge
    from pipelines.retrieval import Retriever

    opened: list[str] = []
    open_judge = Judge.open.__func__

    def counting_open(cls, *args, **kwargs):
        opened.append(args[1] if len(args) > 1 else kwargs.get("judge"))
        return open_judge(cls, *args, **kwargs)

    made: list[str] = []
    init = Retriever.__init__

    def counting_init(self, *args, **kwargs):
        made.append(args[1] if len(args) > 1 else "")
        init(self, *args, **kwargs)

    monkeypatch.setattr(Judge, "open", classmethod(counting_open))
    monkeypatch.setattr(Retriever, "__init__", counting_init)
    events, _ = run_job(env, job_file(env, rag=[False, True], sets=["heldout"],
                                      limits={"heldout": 2}))
    assert events[-1].type == "done", events[-1]
    assert [e.stage for e in events if e.type == "stage"] == [
        "validate", "plan", "generate", "judge", "pairwise", "results", "report"]
    assert opened == ["scripted"]
    assert made == ["ayane"]
    assert events[-1].summary["judge_requests"] > 0


def test_hf_like_backends_answer_single_questions_in_batches(env, server, tmp_path,
                                                             monkeypatch):
    """A backend with generate_batch (the hf backend) gets the held-out questions and
    probes in batches of batch_size per combination; scripts still go turn by turn. The
    records are the same as streamed ones."""
    monkeypatch.setenv("KYARA_BACKEND_MODULES", "gguf=tests.jobs.eval_standins:BatchEchoBackend")
    monkeypatch.setenv("KYARA_EVAL_BATCHES", str(tmp_path / "batches.txt"))
    events, _ = run_job(env, job_file(env, batch_size=3, pairwise_criteria=[]))
    assert events[-1].type == "done", events[-1]
    # per combination: 4 held-out + 2 probes = 6 single questions -> batches of 3 and 3
    assert (tmp_path / "batches.txt").read_text().split() == ["3", "3", "3", "3"]
    out = Path(events[-1].summary["output"])
    rows = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    single = [r for r in rows if r["set"] != "scripts"]
    assert len(single) == 12 and all(r["stop"] == "eos" and r["rendered_prompt"]
                                     for r in single)
    assert all(r["transcript"][-1]["content"] == r["text"] for r in single)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows_ = {row["combo"]: row for row in results["headline"]}
    assert rows_["ayane-s"]["criteria"]["personality"]["mean"] == pytest.approx(6.0)


def test_rag_on_without_facts_is_a_config_error(env, server):
    """An eval "RAG on" combination on a persona with no facts would run without retrieval
    under retrieval's name: refused before anything is generated."""
    (env["configs"] / "personas" / "ayane" / "knowledge.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        run_job(env, job_file(env, rag=[False, True]))
    message = str(caught.value)
    assert message.startswith("rag: retrieval on needs facts") and "\n" not in message
    assert generations(env) == [] and server.count == 0
