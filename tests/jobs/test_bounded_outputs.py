"""Destructive options are bounded (issue 27, item 5): a relative `output:` is under the
home, never the directory the job was started from, and an export's `force: true` replaces
only a folder a kyara export made."""

from __future__ import annotations

import pytest

from pipelines import jobs
from pipelines.config import ConfigError
from pipelines.jobs.export import MADE_BY, VERIFICATION_FILE, refuse_to_replace


def test_a_relative_output_is_under_the_home(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert jobs.output_dir(".", home, "exports", "x") == home.resolve()
    assert jobs.output_dir("mine/x", home, "exports", "x") == (home / "mine" / "x").resolve()
    assert jobs.output_dir(str(tmp_path / "abs"), home, "exports", "x") == tmp_path / "abs"
    assert jobs.output_dir(None, home, "exports", "x") == (home / "exports" / "x").resolve()


def test_force_replaces_only_an_exports_own_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    theirs = tmp_path / "thesis"
    theirs.mkdir()
    (theirs / "chapter1.tex").write_text("...", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        refuse_to_replace(theirs, home)
    message = str(err.value)
    assert "\n" not in message and f"no {MADE_BY} in it" in message
    for holder in (home, tmp_path):  # the home, the folder the job runs from
        with pytest.raises(ConfigError) as err:
            refuse_to_replace(holder.resolve(), home)
        assert "holds" in str(err.value)
    ours, older = tmp_path / "ours", tmp_path / "older"
    ours.mkdir()
    (ours / MADE_BY).write_text("{}", encoding="utf-8")
    older.mkdir()
    (older / VERIFICATION_FILE).write_text("{}", encoding="utf-8")  # before the marker
    refuse_to_replace(ours, home)
    refuse_to_replace(older, home)
