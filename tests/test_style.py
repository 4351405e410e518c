"""Deterministic style checks: the lab's failure modes (no 。, line breaks, rambling, never
stopping on the turn terminator) are each caught."""

from pipelines.config import SpeechRules
from pipelines.style import check_reply, style_score

RULES = SpeechRules(first_person="わたくし", endings=["ですわ", "ますわ", "ですの"],
                    target_chars=30, max_chars=45)


def by_name(checks):
    return {c.name: c for c in checks}


def test_a_good_reply_passes_everything():
    checks = check_reply("小野寺絢音と申しますわ。", RULES, stop_reason="eos")
    assert all(c.ok for c in checks) and style_score(checks) == 1.0


def test_the_labs_failures_are_caught():
    rambling = ("重厚な響きの名前ですが、両親の話しによると、中学生のころからこの名前と"
                "呼ばれているようですわ\nそれから")
    c = by_name(check_reply(rambling, RULES, stop_reason="length"))
    assert not c["length"].ok and "max 45" in c["length"].detail
    assert not c["ends"].ok and not c["newlines"].ok and not c["stop"].ok
    assert "turn terminator" in c["stop"].detail
    assert c["register"].ok  # ですわ is there: only the shape is wrong


def test_plain_register_and_two_sentences():
    c = by_name(check_reply("私の名前は小野寺絢音です。よろしく。", RULES))
    assert not c["register"].ok and not c["sentences"].ok and "2 sentence" in c["sentences"].detail
    assert "stop" not in c  # no stop reason given, no stop check
    assert 0 < style_score(list(c.values())) < 1
