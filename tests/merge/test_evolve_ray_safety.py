"""The evolve job's Ray path on a shared server (issue 27, item 1), against a stand-in `ray`
module that records what the job asks of Ray: a job-local Ray is `address="local"` in a
private folder with token auth, never the cluster /tmp/ray names; no secret reaches an
actor's runtime_env; a named cluster is joined only with a token and only when it refuses
clients without one. The real Ray paths: test_evolve_ray.py, test_evolve_ray_cluster.py."""

from __future__ import annotations

import json
import os
import stat
import sys
import types
from pathlib import Path

import pytest

from pipelines.config import ConfigError
from pipelines.merge import evolve_ray

CANARY = "sk-canary-0123456789"


class FakeRay(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("ray")
        self.inits: list[dict] = []
        self.remotes: list[dict] = []
        self.exceptions = types.SimpleNamespace(AuthenticationError=type("AE", (Exception,), {}),
                                                RayActorError=type("RAE", (Exception,), {}),
                                                RayTaskError=type("RTE", (Exception,), {}))
        self.initialized = False

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs) -> None:
        self.inits.append({**kwargs, "env_auth": os.environ.get("RAY_AUTH_MODE"),
                           "env_token": bool(os.environ.get("RAY_AUTH_TOKEN"))})
        self.initialized = True

    def shutdown(self) -> None:
        self.initialized = False


@pytest.fixture
def fake_ray(monkeypatch):
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return ray


def test_a_job_local_ray_is_private_and_never_another_users(fake_ray, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no token file anywhere: one is made here
    evolve_ray.prepare_auth(remote=False)
    temp = evolve_ray.connect(fake_ray, None)
    (init,) = fake_ray.inits
    assert init["address"] == "local"  # not /tmp/ray/ray_current_cluster's
    assert init["_temp_dir"] == temp and Path(temp).is_dir()
    assert stat.S_IMODE(Path(temp).stat().st_mode) == 0o700
    assert init["env_auth"] == "token" and init["env_token"]  # token auth, a fresh token
    assert not (tmp_path / ".ray" / "auth_token").exists()  # no token file written
    assert init["include_dashboard"] is False


def test_no_secret_goes_into_a_remote_actors_runtime_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("KYARA_JUDGE_API_KEY", CANARY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KYARA_HOME", "/data/kyara")
    shipped = evolve_ray.actor_env(remote=True)
    assert CANARY not in json.dumps(shipped)
    assert shipped["HF_HUB_OFFLINE"] == "1" and shipped["KYARA_HOME"] == "/data/kyara"
    assert evolve_ray.actor_env(remote=False) == {}  # local actors inherit the environment


def test_a_named_cluster_needs_a_token_here(fake_ray, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        evolve_ray.connect(fake_ray, "10.0.0.5:6379")
    assert str(err.value).startswith("ray_address: no Ray token for the cluster at "
                                     "10.0.0.5:6379: kyara joins a Ray cluster only with")
    assert fake_ray.inits == []


def test_a_named_cluster_that_lets_anyone_in_is_refused(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)
    monkeypatch.setattr(evolve_ray, "accepts_anyone", lambda where: True)
    with pytest.raises(ConfigError) as err:
        evolve_ray.connect(fake_ray, "10.0.0.5:6379")
    assert "lets in clients without a token" in str(err.value) and fake_ray.inits == []
    monkeypatch.setattr(evolve_ray, "accepts_anyone", lambda where: False)
    evolve_ray.connect(fake_ray, "10.0.0.5:6379")
    assert fake_ray.inits[0]["address"] == "10.0.0.5:6379"


def test_an_actor_without_the_judges_key_says_which(monkeypatch):
    monkeypatch.delenv("SOME_JUDGE_KEY", raising=False)
    actor = evolve_ray._Actor({}, "/nonexistent", None, ["SOME_JUDGE_KEY"])
    assert actor.ready()["missing_keys"] == ["SOME_JUDGE_KEY"]


class _Ref:
    def __init__(self, value):
        self.value = value


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Ref(self.fn(*args))


class _Handle:
    def __init__(self, args):
        self.args = args
        self.ready = _Method(lambda: {"pid": 1, "questions": 3, "capability": 0})


class PoolRay(FakeRay):
    """Enough of Ray for RayPool to start its actors: what it asks is recorded."""

    def cluster_resources(self):
        return {"CPU": 2}

    def get_runtime_context(self):
        return types.SimpleNamespace(gcs_address="127.0.0.1:1")

    def remote(self, **options):
        self.remotes.append(options)
        return lambda cls: types.SimpleNamespace(remote=lambda *args: _Handle(args))

    def wait(self, refs, num_returns, timeout):
        return refs, []

    def get(self, refs):
        return [r.value for r in refs]

    def kill(self, actor):
        pass


@pytest.mark.parametrize("address", [None, "10.0.0.5:6379"])
def test_the_pool_asks_ray_for_no_secret(monkeypatch, tmp_path, configs, address):
    """RayPool against the stand-in: a job-local Ray is `address="local"`; on either kind of
    cluster the actors' options hold no canary key, while the judge key's name goes to the
    actors to look up on their own nodes."""
    from pipelines.config import EvolveJob
    from tests.merge.evolve_job import KEY_ENV, job_dict

    ray = PoolRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(KEY_ENV, CANARY)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setattr(evolve_ray, "accepts_anyone", lambda where: False)
    if address:
        monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)
    models = [tmp_path / "m0", tmp_path / "m1"]
    cfg = EvolveJob.model_validate(job_dict(models, tmp_path / "out", ray=True, workers=2,
                                            ray_address=address))
    pool = evolve_ray.RayPool(cfg, str(configs), space=None)
    try:
        (init,) = ray.inits
        assert init["address"] == (address or "local")
        (options,) = ray.remotes
        assert CANARY not in json.dumps(options) and options["num_cpus"] == 1
        assert pool.args[3] == [KEY_ENV]  # the name, for the node to look up
        assert CANARY not in json.dumps(pool.args[:2])
    finally:
        pool.close()
    assert ray.initialized is False
