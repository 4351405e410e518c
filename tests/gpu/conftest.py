"""The GPU acceptance run (tests/gpu/): every test runs once per device. The `cuda` runs are
marked gpu (`make test-gpu`; never in `make test`: pyproject's addopts and CI leave gpu out)
and skip cleanly where torch sees no CUDA GPU; the `cpu` runs are the same tests as a slow
CPU dry run (`make test-slow`, `bash bench/gpu/acceptance.sh --cpu`), sized small.

KYARA_ACCEPTANCE_FIGURES=FILE: the figures the tests measure (tokens/s, peak memory against
the estimate) are merged into FILE at the end of the session, for bench/gpu/acceptance.sh."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tests.gpu.flow import SETTINGS, Flow, write_figures

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
           pytest.param("cpu", marks=pytest.mark.slow, id="cpu")]


@functools.cache
def cuda_missing() -> str | None:
    """Why the gpu tests cannot run here, or None."""
    try:
        import torch
    except ImportError as exc:
        return f"needs a CUDA GPU: torch does not import ({exc})"
    if not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no GPU visible"
        return f"needs a CUDA GPU: torch sees none ({build}, torch {torch.__version__})"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and (why := cuda_missing()):
        pytest.skip(why)


@pytest.fixture(scope="session")
def figures():
    """{device: {figure: value}}, written to KYARA_ACCEPTANCE_FIGURES at the end."""
    collected: dict[str, dict] = {}
    yield collected
    target = os.environ.get("KYARA_ACCEPTANCE_FIGURES")
    if target and collected:
        write_figures(Path(target), collected)


@pytest.fixture(scope="module", params=DEVICES)
def flow(request, tmp_path_factory, figures) -> Flow:
    """The flow on one device, its base model dequantised (once per device and session)."""
    device = request.param
    flow = Flow(tmp_path_factory.mktemp(f"accept-{device}"), SETTINGS[device])
    seconds = flow.dequantise()
    figures.setdefault(device, {})["dequantise_s"] = round(seconds, 1)
    return flow


@pytest.fixture(autouse=True)
def _flow_home(request, monkeypatch):
    """What this process loads (variants registered by the jobs) comes from the flow's home,
    not the per-test home tests/conftest.py gives every test."""
    if "flow" in request.fixturenames:
        monkeypatch.setenv("KYARA_HOME", str(request.getfixturevalue("flow").home))
