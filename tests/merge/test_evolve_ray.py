"""The evolve job's Ray path on a real local Ray (`ray.init(num_cpus=2)`, one cluster for
the module) and the tiny evolve models: one actor per worker, each with its resident model,
gives the same evaluations as the plain path; an actor killed mid-evaluation is replaced and
its evaluation recorded once; a GPU search on a cluster without GPUs, and more actors than
the cluster has CPUs, are refused in one line."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipelines.config import ConfigError, EvolveJob
from pipelines.merge import evolve_ray
from pipelines.merge.evolve import SearchSpace, resolve_sources
from tests.judge.scripted_judge_server import ScriptedServer
from tests.merge.evolve_job import KEY_ENV, job_dict, records, run_job, score_marker, write_configs

ray = pytest.importorskip("ray", reason="the ray extra (kyara[ray]) is not installed")

SEARCH = {"population": 4, "generations": 2, "workers": 2}


@pytest.fixture(scope="module")
def local_ray():
    # a short folder: Ray's socket paths must fit in 107 bytes, pytest's tmp_path may not
    temp = tempfile.mkdtemp(prefix="kyara-ray-")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # a loopback cluster; no token in ~/.ray
        # the judge's key where the nodes start (kyara never sends it to the actors)
        env.setenv(KEY_ENV, "sk-test")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


class Judge:
    """The scripted judge with a hook run (once) on the first request that finds it set."""

    def __init__(self) -> None:
        self.hook = None
        self.lock = threading.Lock()

    def __call__(self, request):
        with self.lock:
            hook, self.hook = self.hook, None
            if hook is not None:
                hook()
        return score_marker(request)


@pytest.fixture(scope="module")
def judge():
    with ScriptedServer(judge := Judge()) as server:
        judge.server = server
        yield judge


@pytest.fixture(scope="module")
def ray_configs(tmp_path_factory, judge) -> Path:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, "sk-test")
        yield write_configs(tmp_path_factory.mktemp("configs"), judge.server.base_url)


@pytest.fixture(scope="module")
def plain(models, ray_configs, tmp_path_factory) -> list[dict]:
    """The same search without Ray: what every Ray run must match."""
    folder = tmp_path_factory.mktemp("plain")
    events = run_job(ray_configs, folder / "run", job_dict(models, folder / "search", **SEARCH))
    assert events[-1].type == "done", events[-1]
    return records(folder / "search")


@pytest.fixture
def pools(monkeypatch) -> list:
    """Every RayPool the job makes, for the test to look into."""
    made = []

    class Recorded(evolve_ray.RayPool):
        def __init__(self, *args) -> None:
            made.append(self)
            super().__init__(*args)

    monkeypatch.setattr(evolve_ray, "RayPool", Recorded)
    return made


def same_evaluations(got: list[dict], expected: list[dict]) -> None:
    assert [r["index"] for r in got] == list(range(len(expected)))  # none twice, none lost
    for a, b in zip(got, expected, strict=True):
        assert a["genome"] == b["genome"] and a["merge"] == b["merge"], a["index"]
        assert a["fitness"] == b["fitness"] and a["samples"] == b["samples"], a["index"]


def test_one_actor_per_worker_gives_the_plain_paths_evaluations(
        local_ray, models, ray_configs, plain, pools, tmp_path):
    events = run_job(ray_configs, tmp_path / "run",
                     job_dict(models, tmp_path / "search", ray=True, **SEARCH))
    assert events[-1].type == "done", events[-1]
    (pool,) = pools
    assert any(e.type == "log" and e.message.startswith("Ray: 2 actor(s) at ")
               for e in events)
    # two actor processes, neither this one, each built its own resident model once
    pids = {info["pid"] for info in pool.info}
    assert len(pids) == 2 and os.getpid() not in pids
    assert sum(pool.counts) == 8 and min(pool.counts) >= 1, pool.counts
    assert pool.replaced == [] and pool.actors == []  # killed when the job ended
    assert local_ray.is_initialized()  # the caller's Ray is left running
    same_evaluations(records(tmp_path / "search"), plain)


def test_an_actor_killed_mid_evaluation_is_replaced_and_recorded_once(
        local_ray, models, ray_configs, plain, pools, judge, tmp_path):
    killed = []

    def kill_actor_0() -> None:
        # The first judge request: no evaluation has finished (each needs its verdicts),
        # so actor 0 is in the middle of evaluation 0. Its reply is held back until the
        # actor is gone.
        actor = pools[0].actors[0]
        local_ray.kill(actor)
        killed.append(actor)
        time.sleep(1.5)

    judge.hook = kill_actor_0
    events = run_job(ray_configs, tmp_path / "run",
                     job_dict(models, tmp_path / "search", ray=True, **SEARCH))
    assert events[-1].type == "done", events[-1]
    (pool,) = pools
    assert len(killed) == 1
    assert [index for index, _ in pool.replaced] == [0], pool.replaced
    assert "died" in pool.replaced[0][1]
    assert sum(pool.counts) == 8  # the killed actor finished nothing
    warnings = [e.message for e in events if e.type == "log" and e.level == "warning"]
    assert any("evaluation 0 was run again on a replacement" in m for m in warnings), warnings
    assert events[-1].summary["evaluated"] == 8
    same_evaluations(records(tmp_path / "search"), plain)


def test_a_cluster_without_room_is_refused_in_one_line(local_ray, models, ray_configs,
                                                       tmp_path):
    def pool(**changes):
        cfg = EvolveJob.model_validate(job_dict(models, tmp_path / "s", ray=True, **changes))
        space = SearchSpace.build(cfg, *resolve_sources(cfg, None), "float32")
        with pytest.raises(ConfigError) as info:
            evolve_ray.RayPool(cfg, str(ray_configs), space)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "has no GPU" in pool(options={"device": "cuda"})
    assert "3 actors need 3 CPUs" in pool(workers=3)
    assert local_ray.is_initialized()
