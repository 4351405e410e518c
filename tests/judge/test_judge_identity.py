"""The judge cache and calibration know who answered (issue 27, item 4): another server,
other sampling or changed anchors ask again; a calibration made against another server is
stale, so the curate gate does not pass on it."""

from __future__ import annotations

import json

from pipelines.judge import Interaction
from pipelines.judge.calibrate import Agreement
from pipelines.judge.calibration import CalibrationReport, calibration_status, save_calibration

ITEM = Interaction.from_pair("好きな紅茶は？", "ダージリンですわ。", id="m1")


def test_another_server_other_sampling_or_anchors_make_another_key(make_judge, configs):
    def key(**changes):
        judge = make_judge(store=False, **changes)
        return judge.key(ITEM, "personality"), judge.identity

    base, identity = key()
    assert key() == (base, identity)  # the same judge: the same key
    other_server, other_identity = key(base_url="http://127.0.0.1:9/v1")
    assert other_server != base and other_identity != identity
    assert key(base_url=make_judge(store=False).config.base_url, temperature=0.7)[0] != base
    # an anchor's text edited in the persona's calibration rows
    rows = configs / "personas" / "ayane" / "calibration.jsonl"
    lines = rows.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["reason"] += "（改）"
    rows.write_text("\n".join([json.dumps(first, ensure_ascii=False), *lines[1:]]) + "\n",
                    encoding="utf-8")
    judge = make_judge(store=False, temperature=0.0)
    assert judge.key(ITEM, "personality") not in (base, other_server)


def test_openai_judges_identity_follows_openai_base_url(make_judge, monkeypatch):
    judge = make_judge(store=False, provider="openai", base_url=None)
    plain = judge.identity
    monkeypatch.setenv("OPENAI_BASE_URL", "http://someone-else:8000/v1")
    assert make_judge(store=False).identity != plain


def test_a_calibration_made_against_another_server_is_stale(make_judge, tmp_path):
    judge = make_judge(store=False)
    c = judge.criterion("personality")

    def report(identity: str) -> CalibrationReport:
        return CalibrationReport(judge=judge.name, model=judge.model, provider="x",
                                 persona="ayane", criterion="personality",
                                 prompt_version=c.prompt_version, date="2026-12-07",
                                 few_shot=0, seed=0,
                                 agreement=Agreement(n=10, scored=10, spearman=0.9),
                                 identity=identity)

    save_calibration(tmp_path, report(judge.identity))
    args = (tmp_path, judge.name, "ayane", "personality", c.prompt_version, judge.model)
    assert calibration_status(*args, judge.identity).state == "calibrated"
    save_calibration(tmp_path, report("another-server"))
    stale = calibration_status(*args, judge.identity)
    assert stale.state == "stale" and "another server" in stale.label
    save_calibration(tmp_path, report(""))  # written before the identity was recorded
    assert calibration_status(*args, judge.identity).state == "stale"
