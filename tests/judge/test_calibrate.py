"""Agreement with the human labels: the figures, a calibration run against the scripted
server (anchors from the other rows), the saved file and what the console shows."""

from __future__ import annotations

import json

import pytest
from scripted_judge_server import Reply, answer

from pipelines.judge import (
    Verdict,
    agreement,
    calibrate,
    calibration_path,
    calibration_status,
    load_calibration,
    save_calibration,
)


def ok(score: int) -> Verdict:
    return Verdict(criterion="personality", status="ok", score=score)


def test_perfect_agreement():
    a = agreement([1, 2, 3, 4, 5, 6, 7], [ok(s) for s in range(1, 8)])
    assert a.spearman == pytest.approx(1.0) and a.exact == 1 and a.within_one == 1
    assert a.mae == 0 and a.scored == 7
    assert [a.confusion[i][i] for i in range(7)] == [1] * 7


def test_off_by_one_and_the_confusion_table():
    human = [1, 2, 3, 4, 5, 6, 7, 7]
    judged = [ok(2), ok(2), ok(4), ok(4), ok(6), ok(6), ok(6), ok(3)]
    a = agreement(human, judged)
    assert a.exact == pytest.approx(3 / 8)
    assert a.within_one == pytest.approx(7 / 8)
    assert a.mae == pytest.approx((1 + 0 + 1 + 0 + 1 + 0 + 1 + 4) / 8)
    assert a.confusion[0][1] == 1 and a.confusion[6][5] == 1 and a.confusion[6][2] == 1
    assert sum(map(sum, a.confusion)) == 8
    assert 0 < a.spearman < 1


def test_invalid_and_failed_are_counted_not_scored():
    judged = [ok(3), Verdict(criterion="personality", status="invalid", raw_text="?"),
              Verdict(criterion="personality", status="failed", error_kind="timeout"), ok(5)]
    a = agreement([3, 7, 1, 5], judged)
    assert (a.n, a.scored, a.invalid, a.failed) == (4, 2, 1, 1)
    assert a.exact == 1 and a.mae == 0


def test_a_constant_judge_has_no_rho_rather_than_a_crash():
    a = agreement([1, 4, 7], [ok(4), ok(4), ok(4)])
    assert a.spearman is None and a.exact == pytest.approx(1 / 3)


def test_nothing_scored_gives_no_figures():
    a = agreement([4], [Verdict(criterion="personality", status="invalid")])
    assert a.spearman is None and a.exact is None and a.mae is None


def human_label_judge(rows):
    """A judge that gives each reply its human score, and checks its own prompt."""
    by_reply = {r.reply: r for r in rows}
    problems = []

    def respond(request):
        prompt = request.prompt
        block = prompt.rsplit("[Interactions]", 1)[1]
        reply = next(r for text, r in by_reply.items() if f"[assistant] {text}\n<<<END-" in block)
        examples = prompt.split("[Scored examples]", 1)[1].split("[Interactions]", 1)[0]
        if f"[assistant] {reply.reply}\n" in examples:
            problems.append(f"{reply.id} is its own anchor")
        if examples.count("\nScore (personality): ") != 3:
            problems.append(f"{reply.id}: not 3 anchors")
        return answer("人間の評価に合わせます。", reply.score)

    return respond, problems


async def test_calibration_scores_every_row_with_anchors_from_the_others(server, make_judge,
                                                                         tmp_path):
    judge = make_judge(concurrency=8)
    rows = [r for r in judge.data.calibration if r.criterion == "personality"]
    server.responder, problems = human_label_judge(rows)
    report, pairs = await calibrate(judge, "personality")
    await judge.aclose()
    assert not problems, problems[:3]
    assert server.count == len(rows) == report.agreement.n == 91
    a = report.agreement
    assert a.spearman == pytest.approx(1.0) and a.exact == 1 and a.mae == 0
    assert report.judge == "scripted" and report.model == "scripted-judge"
    assert report.prompt_version == "personality-v2" and report.persona == "ayane"
    assert report.date[:2] == "20" and report.few_shot == 3
    assert [row.id for row, _ in pairs] == [r.id for r in rows]
    stored = judge.store.rows("judgments")
    assert sorted(r["message_id"] for r in stored) == sorted(r.id for r in rows)

    again = make_judge()
    report2, _ = await calibrate(again, "personality")  # cached: nothing asked again
    assert server.count == 91 and report2.agreement.spearman == pytest.approx(1.0)

    path = save_calibration(tmp_path, report)
    assert path == calibration_path(tmp_path, "scripted") == tmp_path / "judges" / "scripted" / "calibration.json"
    loaded = load_calibration(tmp_path, "scripted")["ayane/personality"]
    assert loaded == report


async def test_a_criterion_without_labelled_rows_is_a_clear_error(make_judge):
    from pipelines.judge import JudgeError

    with pytest.raises(JudgeError, match="no calibration rows labelled 'style'"):
        await calibrate(make_judge(store=False, criteria=["style"]), "style")


def test_status_labels_for_the_console(tmp_path):
    from pipelines.judge.calibrate import Agreement, CalibrationReport

    report = CalibrationReport(
        judge="local-gemma3", model="embedded:gemma3-270m", provider="llama_cpp",
        persona="ayane", criterion="personality", prompt_version="personality-v2",
        date="2026-11-25T12:00:00+00:00", few_shot=3, seed=0,
        agreement=Agreement(n=91, scored=90, spearman=0.42, within_one=0.61))
    before = calibration_status(tmp_path, "local-gemma3", "ayane", "personality", "personality-v2")
    assert before.state == "uncalibrated" and before.label == "uncalibrated"
    save_calibration(tmp_path, report)
    now = calibration_status(tmp_path, "local-gemma3", "ayane", "personality", "personality-v2")
    assert now.state == "calibrated" and now.label == "ρ 0.42, ±1 61% (n=90, 2026-11-25)"
    stale = calibration_status(tmp_path, "local-gemma3", "ayane", "personality", "personality-v3")
    assert stale.state == "stale" and "personality-v2" in stale.label
    other = calibration_status(tmp_path, "local-gemma3", "ayane", "style", "style-v2")
    assert other.state == "uncalibrated"


def test_a_damaged_file_reads_as_uncalibrated(tmp_path):
    path = calibration_path(tmp_path, "j")
    path.parent.mkdir(parents=True)
    path.write_text("{not json", encoding="utf-8")
    assert load_calibration(tmp_path, "j") == {}
    path.write_text(json.dumps({"reports": {"a/b": {"judge": "j"}}}), encoding="utf-8")
    assert calibration_status(tmp_path, "j", "a", "b", "v").state == "uncalibrated"


async def test_invalid_answers_during_calibration_are_counted(server, make_judge):
    server.responder = lambda request: Reply(text="採点不能")
    judge = make_judge(store=False, concurrency=8)
    report, _ = await calibrate(judge, "personality")
    assert report.agreement.invalid == 91 and report.agreement.spearman is None
