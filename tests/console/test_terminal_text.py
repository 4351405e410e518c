"""One function makes model, server and file text safe for a terminal (console.text): the
TUI's plain(), the CLI's one-line failures and job lines use it (issue 27, item 6)."""

from __future__ import annotations

from console.text import visible

HOSTILE = "a\x1b]52;c;ZXZpbA==\x07b\x9b2Jc\x85d\x7fe\rf"


def test_visible_escapes_c0_del_and_c1_keeping_lines():
    assert visible(HOSTILE + "\n\tg") == (
        "a\\x1b]52;c;ZXZpbA==\\x07b\\x9b2Jc\\x85d\\x7fe\\x0df\n\tg")
    assert visible("行1\n行2", lines=False) == "行1\\x0a行2"
    assert visible("ごきげんよう。") == "ごきげんよう。"  # text is left alone


def test_plain_fail_and_job_lines_use_it(capsys):
    import pytest
    import typer

    from console.common import fail
    from console.jobs import visible as job_line
    from console.widgets import plain

    assert plain(HOSTILE).plain == visible(HOSTILE)  # DEL and C1 too, which it once missed
    assert job_line("x\ny\x1b") == "x\\x0ay\\x1b"
    with pytest.raises(typer.Exit):
        fail("server said: [bold]\x1b]0;pwned\x07")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "[bold]" in err
