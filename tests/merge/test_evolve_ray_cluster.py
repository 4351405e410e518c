"""The evolve job on a Ray cluster of its own (`ray start --head`, started here, with token
authentication), reached through `ray_address:`, the job run by the job runner: its driver
killed with SIGKILL half way, then run again: the search resumes from evaluations.jsonl,
nothing evaluated twice, nothing lost, the same evaluations as the search without Ray."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipelines.events import iter_events
from tests.merge.evolve_job import (
    KEY_ENV,
    job_dict,
    kill_after_evaluations,
    records,
    run_job,
    start_job,
)

pytest.importorskip("ray", reason="the ray extra (kyara[ray]) is not installed")

RAY = str(Path(sys.executable).with_name("ray"))  # the venv's: its workers run this Python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A one-node cluster with 2 CPUs on the loopback, token auth on; (address, the env a
    driver needs)."""
    # the nodes hold the judge's key themselves: kyara never sends it to a cluster
    yield from start_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                           KEY_ENV: "sk-test"})


def start_head(env: dict[str, str]):
    temp = tempfile.mkdtemp(prefix="kyara-rayhead-")  # short: Ray's socket paths
    port = free_port()
    log = Path(temp) / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
             "--node-ip-address", "127.0.0.1", "--temp-dir", temp,
             "--include-dashboard=false", "--disable-usage-stats"],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own group: stopped with it, nothing else is
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "ray start took over 120 s"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", env
    finally:
        stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the cluster's process group (ray start, GCS, raylet, workers), SIGKILL
    to what is left after 5 s. Not `ray stop`: it stops every Ray on the machine."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait()
                return
            proc.poll()  # reap ray start itself, or the group never empties
            time.sleep(0.2)


def run_through_runner(data: dict, tmp_path: Path, configs: Path, **env: str) -> list:
    """The job in its own process, as the console runs it (Ray reads RAY_AUTH_MODE once,
    when it is imported: a test cannot switch it in its own process)."""
    cfg_path = tmp_path / "evolve.yaml"
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    assert start_job(cfg_path, tmp_path / "run", configs, **env).wait(timeout=300) in (0, 2)
    return list(iter_events(tmp_path / "run" / "events.jsonl"))


def test_the_job_connects_through_ray_address(head, models, configs, tmp_path):
    address, env = head
    events = run_through_runner(job_dict(models, tmp_path / "search", population=2,
                                         generations=1, ray=True, workers=2,
                                         ray_address=address), tmp_path, configs, **env)
    assert events[-1].type == "done", events[-1]
    port = address.rsplit(":", 1)[1]  # Ray names the node by its own IP, not 127.0.0.1
    logs = [e.message for e in events if e.type == "log"]
    assert any(m.startswith("Ray: 2 actor(s) at ") and f":{port}," in m for m in logs), logs
    assert [r["index"] for r in records(tmp_path / "search")] == [0, 1]


def test_a_job_without_the_token_is_named_in_one_line(head, models, configs, tmp_path):
    address, _ = head
    # no RAY_AUTH_TOKEN and no ~/.ray/auth_token for the job (its own HOME); the job's
    # RAY_AUTH_MODE=disabled does not turn kyara's token auth off
    events = run_through_runner(job_dict(models, tmp_path / "s", ray=True,
                                         ray_address=address), tmp_path, configs,
                                RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    assert events[-1].type == "error" and events[-1].kind == "config", events[-1]
    assert events[-1].message.startswith(f"ray_address: no Ray token for the cluster at "
                                         f"{address}: ")
    assert "RAY_AUTH_MODE=token" in events[-1].message


@pytest.fixture(scope="module")
def open_head():
    """A cluster started without token auth: anyone who can reach it runs code on it."""
    yield from start_head({"RAY_AUTH_MODE": "disabled"})


@pytest.mark.slow
def test_a_cluster_that_lets_anyone_in_is_refused(open_head, head, models, configs,
                                                  tmp_path):
    from pipelines.merge.evolve_ray import accepts_anyone

    open_address, _ = open_head
    address, _ = head
    assert accepts_anyone(open_address) and not accepts_anyone(address)
    events = run_through_runner(job_dict(models, tmp_path / "s", ray=True,
                                         ray_address=open_address), tmp_path, configs,
                                RAY_AUTH_TOKEN=secrets.token_hex(16))
    assert events[-1].type == "error" and events[-1].kind == "config", events[-1]
    assert "lets in clients without a token" in events[-1].message
    assert not (tmp_path / "s" / "evaluations.jsonl").exists()


@pytest.mark.slow
def test_driver_killed_on_a_ray_cluster_resumes_without_repeats(head, models, configs,
                                                                tmp_path):
    address, env = head
    search = tmp_path / "search"
    data = job_dict(models, search, generations=3, name="evo-ray", ray=True, workers=2,
                    ray_address=address)
    cfg_path = tmp_path / "evolve.yaml"
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    first = start_job(cfg_path, tmp_path / "run1", configs, **env)
    log = search / "evaluations.jsonl"
    kill_after_evaluations(first, log)  # the driver only: the cluster is elsewhere
    assert first.returncode == -signal.SIGKILL
    kept = log.read_bytes().count(b"\n")
    assert 3 <= kept < 12

    # The dead driver's actors go with it; the new run's two find the cluster's 2 CPUs free.
    second = start_job(cfg_path, tmp_path / "run2", configs, **env)
    assert second.wait(timeout=300) == 0
    events = list(iter_events(tmp_path / "run2" / "events.jsonl"))
    assert events[-1].type == "done", events[-1]
    logs = [e.message for e in events if e.type == "log"]
    port = address.rsplit(":", 1)[1]
    assert any(m.startswith("Ray: 2 actor(s) at ") and f":{port}," in m for m in logs), logs
    summary = events[-1].summary
    assert summary["replayed"] == kept and summary["evaluated"] == 12 - kept
    resumed = records(search)
    assert [r["index"] for r in resumed] == list(range(12))  # none repeated, none missing

    # the same search without Ray and without a kill, in this process
    whole = run_job(configs, tmp_path / "run3",
                    job_dict(models, tmp_path / "whole", generations=3, name="evo-ray"))
    assert whole[-1].type == "done", whole[-1]
    for a, b in zip(resumed, records(tmp_path / "whole"), strict=True):
        assert a["genome"] == b["genome"] and a["fitness"] == b["fitness"], a["index"]
        assert a["samples"] == b["samples"], a["index"]
    assert whole[-1].summary["best_fitness"] == summary["best_fitness"]
