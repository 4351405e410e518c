"""Paths in the shipped configs are home-relative: a lab member with KYARA_HOME elsewhere
(or another home: in kyara.yaml) gets the variants, adapters and job outputs under that
home, never under ~/.local/share/kyara."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.inference.sources import resolve_path
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

PATH_KEYS = {"adapter", "path", "lora_path", "output", "questions", "start_adapter", "base",
             "data", "train", "dequantize_from", "from", "source", "dir"}


def _paths(node, trail=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*trail, str(key)))
    elif isinstance(node, list):
        for value in node:
            yield from _paths(value, trail)
    elif isinstance(node, str) and trail and trail[-1] in PATH_KEYS:
        yield ".".join(trail), node


def test_no_shipped_config_names_a_home_of_its_own():
    found = []
    for file in sorted(CONFIGS.rglob("*.yaml")):
        if file.name == "kyara.yaml":
            continue  # the one place the home itself is set
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        for key, value in _paths(data):
            if value.startswith(("~", "/", "$HOME")) or ".local/share" in value:
                found.append(f"{file.relative_to(CONFIGS)}: {key}: {value}")
    assert not found, found


def test_the_gemma2_adapter_is_found_under_the_home_in_use(tmp_path, monkeypatch):
    home = tmp_path / "elsewhere"
    monkeypatch.setenv("KYARA_HOME", str(home))
    ws = Workspace.load(CONFIGS)
    assert ws.settings.home_path() == home
    variant = ws.variant("gemma-2-2b-jpn-it-ayane")
    assert resolve_path(variant.adapter, ws.settings.home_path()) == (
        home / "runs" / "train-ayane-gemma2" / "adapter")
    # and that is where its train job writes the adapter
    from pipelines.config import load_job
    from pipelines.jobs.train import output_dir

    job = load_job(CONFIGS / "jobs" / "train-ayane-gemma2.yaml")
    assert output_dir(job, home) / "adapter" == Path(home / "runs" / "train-ayane-gemma2" /
                                                     "adapter")
