"""Fitness evaluations on Ray (the optional extra `kyara[ray]`): one actor per worker (by
default one per GPU, one on the CPU), each with its own resident model and judge, on the
cluster named by `ray_address:` (or RAY_ADDRESS), else on a local Ray started for the job
and stopped after it.

On a shared server (issue 27): token auth always; a job-local Ray is `address="local"` in a
private temporary folder with a fresh token, never another user's cluster; a named cluster
that lets in clients without a token is refused; no secret goes into an actor's
runtime_env (the cluster's nodes hold their own keys; a missing one is one line).

Only evaluation is distributed: CMA-ES, the evaluation log and the events stay in the job
process (the Ray driver), so resume and the console work the same as without Ray. Each
actor is given one candidate at a time (the next goes to whichever is free first) and the
results are handed back in candidate order, the order evaluations.jsonl needs.

Faults: an actor that dies mid-evaluation (killed, out of memory, its node gone) is replaced
and its evaluation run again on the replacement; only the driver writes the log, so the
evaluation is recorded once. When the driver dies its actors go with it (they are not
detached), and running the job again resumes from evaluations.jsonl.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, EvolveJob
from pipelines.processes import child_env, python

EXTRA_HINT = ("ray: true needs the optional extra: pip install 'kyara[ray]' (or set "
              "ray: false to evaluate one candidate after another)")
RETRIES = 2     # an evaluation is tried on at most 1 + RETRIES actors before the job fails
WAIT_S = 1.0    # ray.wait returns to Python this often, so a SIGTERM (cancel) is handled


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(EXTRA_HINT) from None
    return ray


class _Actor:
    """Built inside the Ray worker: its own workspace, resident model and judge. A failure
    to build is kept and raised by `ready` and `evaluate`, so the driver gets the exception
    itself (Ray would only say the actor died in its creation task)."""

    def __init__(self, cfg_json: dict[str, Any], configs: str, space: Any,
                 keys: list[str] | None = None) -> None:
        from pipelines.merge.evolve import Evaluator
        from pipelines.workspace import Workspace

        self.evaluator: Any = None
        self.error: Exception | None = None
        self.missing = [k for k in keys or () if not os.environ.get(k)]
        if self.missing:  # said by the driver in one line; nothing to build without it
            return
        try:
            cfg = EvolveJob.model_validate(cfg_json)
            self.evaluator = Evaluator(cfg, Workspace.load(configs), space)
        except Exception as exc:
            self.error = exc

    def ready(self) -> dict[str, Any]:
        if self.missing:
            return {"pid": os.getpid(), "missing_keys": self.missing}
        if self.error is not None:
            raise self.error
        return {"pid": os.getpid(), "questions": len(self.evaluator.questions),
                "capability": len(self.evaluator.capability)}

    def evaluate(self, merge: dict[str, Any], seed: int) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return self.evaluator.evaluate(merge, seed)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


TOKEN_HELP = ("kyara joins a Ray cluster only with Ray's token auth: start it with "
              "RAY_AUTH_MODE=token (ray start --head) and give the job its token "
              "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
PROBE_S = 10.0  # a tokenless client that has not connected by then is taken as refused
_PROBE = """
import sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("connected", flush=True)
ray.shutdown()
"""
# settings a remote cluster's actors may be given; anything that looks like a secret stays
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "AUTH", "CREDENTIAL")


def prepare_auth(remote: bool) -> None:
    """Before Ray is imported (it reads RAY_AUTH_MODE once, then): token auth, always. A
    job-local cluster gets a fresh token in this process's environment (inherited by the
    raylet and the actors it starts, readable by this user only; no token file written);
    for a remote cluster the user's own token is used."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if not remote:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def has_token() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (bool(path) and Path(path).is_file()) \
        or (Path.home() / ".ray" / "auth_token").is_file()


def accepts_anyone(where: str, timeout: float = PROBE_S) -> bool:
    """Whether the cluster at `where` lets in a client without a token (then anyone who can
    reach it runs code as its user): a driver without one, in a process of its own, tries."""
    with tempfile.TemporaryDirectory(prefix="kyara-rayprobe-") as home:
        env = {k: v for k, v in child_env().items()
               if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
        env.update(RAY_AUTH_MODE="disabled", HOME=home)
        try:
            done = subprocess.run(python("-c", _PROBE, where), env=env, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False
    return "connected" in done.stdout


def connect(ray: Any, address: str | None) -> str | None:
    """ray.init for the job, token auth always (`prepare_auth` ran before Ray was
    imported). No address: a new local Ray, `address="local"` (never the cluster that
    /tmp/ray/ray_current_cluster names, the last `ray start` of any user on the host), in a
    private temporary folder (0700; returned, to be removed after shutdown). The named
    cluster (`ray_address:`, else RAY_ADDRESS): refused in one line when this job has no
    token or the cluster lets in clients without one; unreachable is one line too."""
    where = address or os.environ.get("RAY_ADDRESS")
    key = "ray_address" if address else "RAY_ADDRESS"
    if not where:
        temp = tempfile.mkdtemp(prefix="kyara-ray-")  # short: Ray's socket paths
        try:
            ray.init(address="local", _temp_dir=temp, include_dashboard=False,
                     log_to_driver=False)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return temp
    if not has_token():
        raise ConfigError(f"{key}: no Ray token for the cluster at {where}: {TOKEN_HELP}")
    if accepts_anyone(where):
        raise ConfigError(f"{key}: the Ray cluster at {where} lets in clients without a "
                          f"token (anyone who can reach it runs code as its user): "
                          f"{TOKEN_HELP}")
    try:
        ray.init(address=where, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        causes = [exc]
        while causes[-1].__cause__ is not None and len(causes) < 8:
            causes.append(causes[-1].__cause__)
        # Ray puts the GCS's AuthenticationError in the text of the error it raises
        if any(isinstance(c, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(c)
               for c in causes):
            raise ConfigError(f"{key}: the Ray cluster at {where} refused this job's token "
                              "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token: "
                              "the head's is `ray get-auth-token` there)") from None
        raise ConfigError(f"{key}: no Ray cluster reachable at {where} "
                          f"({_first_line(exc)})") from None
    return None


def actor_env(remote: bool) -> dict[str, str]:
    """The settings a remote cluster's actors are given in their runtime_env (kept in the
    cluster's GCS): kyara's and Hugging Face's, never a secret (no name with TOKEN, KEY,
    SECRET, PASSWORD, AUTH or CREDENTIAL: HF_TOKEN and the judge's key stay here). The
    cluster's nodes hold their own keys; `_Actor.ready` says which one is missing. Actors of
    a job-local cluster inherit this process's environment: nothing to hand over."""
    if not remote:
        return {}
    return {name: value for name, value in sorted(os.environ.items())
            if name.startswith(("KYARA_", "HF_"))
            and not any(word in name.upper() for word in _SECRET_WORDS)}


def needed_keys(cfg: EvolveJob, configs: str) -> list[str]:
    """The environment variables the actors' judge reads its key from (none without one)."""
    if cfg.fitness.judge <= 0:
        return []
    from pipelines.workspace import Workspace

    key = Workspace.load(configs).judge(cfg.judge).api_key_env
    return [key] if key else []


class RayPool:
    """The actors and their dispatch: `evaluate` is the search's Evaluate over them."""

    def __init__(self, cfg: EvolveJob, configs: str, space: Any) -> None:
        self.remote_cluster = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        if "ray" not in sys.modules:  # Ray reads its auth mode once, when imported
            prepare_auth(self.remote_cluster)
        ray = require_ray()
        self.ray = ray
        self.started = not ray.is_initialized()  # ours to shut down; else the caller's
        self.temp: str | None = None
        if self.started:
            self.temp = connect(ray, cfg.ray_address)
        self.actors: list[Any] = []
        self.replaced: list[tuple[int, str]] = []  # (evaluation index, why its actor died)
        self.counts: list[int] = []                # evaluations finished per actor slot
        try:
            self._start(cfg, configs, space)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg: EvolveJob, configs: str, space: Any) -> None:
        ray = self.ray
        self.address = ray.get_runtime_context().gcs_address
        resources = ray.cluster_resources()
        cuda = cfg.options.device == "cuda"
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if cuda and gpus == 0:
            raise ConfigError("ray: the Ray cluster has no GPU; set options.device: cpu or "
                              "start Ray where the GPUs are")
        count = cfg.workers or (gpus if cuda else 1)
        have, kind = (gpus, "GPU") if cuda else (cpus, "CPU")
        if count > have:  # an actor that cannot be placed would wait for ever
            raise ConfigError(f"workers: {count} actors need {count} {kind}s (one each); the "
                              f"Ray cluster at {self.address} has {have}")
        # One GPU per actor; on the CPU one core each (Ray then runs torch on one thread).
        options: dict[str, Any] = {"num_gpus": 1} if cuda else {"num_cpus": 1}
        env = actor_env(self.remote_cluster)
        if env:
            options["runtime_env"] = {"env_vars": env}
        self.remote = ray.remote(**options)(_Actor)
        self.args = (cfg.model_dump(mode="json"), configs, space, needed_keys(cfg, configs))
        self.actors = [self.remote.remote(*self.args) for _ in range(count)]
        self.counts = [0] * count
        try:
            self.info = self._get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayActorError as err:  # its process died while it loaded
            raise RuntimeError(f"Ray: an actor died while loading its model: "
                               f"{_first_line(err)}") from err
        missing = sorted({k for info in self.info for k in info.get("missing_keys", ())})
        if missing:
            raise ConfigError(f"ray_address: the judge's key {', '.join(missing)} is not set "
                              f"on the Ray cluster's nodes at {self.address}; kyara never "
                              "sends secrets to a cluster: set it where `ray start` runs")

    @property
    def size(self) -> int:
        return len(self.actors)

    def _get(self, refs: list[Any]) -> list[Any]:
        """ray.get in slices of WAIT_S, with a task's own exception raised as itself."""
        pending = list(refs)
        while pending:
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=WAIT_S)
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as err:
            raise self._cause(err) from err

    @staticmethod
    def _cause(err: Any) -> BaseException:
        cause = getattr(err, "cause", None)
        return cause if isinstance(cause, Exception) else err

    def _replace(self, slot: int) -> None:
        try:
            self.ray.kill(self.actors[slot])  # dead already, or only unreachable: make sure
        except Exception:  # killing a dead actor; nothing more to do for it
            pass
        self.actors[slot] = self.remote.remote(*self.args)

    def evaluate(self, batch: list[tuple[int, dict[str, Any], int]]
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each candidate to the next free actor; (index, record) yielded in candidate
        order. A candidate whose actor died goes first in line again, on the replacement."""
        ray = self.ray
        waiting = deque(batch)
        order = [index for index, _, _ in batch]
        tries = dict.fromkeys(order, 0)
        free = list(range(len(self.actors)))
        running: dict[Any, tuple[int, tuple[int, dict[str, Any], int]]] = {}
        finished: dict[int, dict[str, Any]] = {}
        out = 0
        while out < len(order):
            while waiting and free:
                slot, item = free.pop(0), waiting.popleft()
                running[self.actors[slot].evaluate.remote(item[1], item[2])] = (slot, item)
            done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)
            for ref in done:
                slot, item = running.pop(ref)
                index = item[0]
                try:
                    finished[index] = ray.get(ref)
                    self.counts[slot] += 1
                except ray.exceptions.RayActorError as err:
                    tries[index] += 1
                    if tries[index] > RETRIES:
                        raise RuntimeError(f"Ray: evaluation {index} lost its actor "
                                           f"{tries[index]} times; last: "
                                           f"{_first_line(err)}") from err
                    self.replaced.append((index, _first_line(err)))
                    self._replace(slot)
                    waiting.appendleft(item)
                except ray.exceptions.RayTaskError as err:
                    raise self._cause(err) from err
                free.append(slot)
            while out < len(order) and order[out] in finished:
                yield order[out], finished.pop(order[out])
                out += 1

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone; the rest must still be killed
                pass
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None
