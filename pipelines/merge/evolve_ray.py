"""Fitness evaluations on Ray (the optional extra `kyara[ray]`): one actor per worker (by
default one per GPU, one on the CPU), each with its own resident model and judge, on the
cluster named by `ray_address:` (or RAY_ADDRESS), else on a local Ray started for the job
and stopped after it.

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
from collections import deque
from collections.abc import Iterator
from typing import Any

from pipelines.config import ConfigError, EvolveJob

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

    def __init__(self, cfg_json: dict[str, Any], configs: str, space: Any) -> None:
        from pipelines.merge.evolve import Evaluator
        from pipelines.workspace import Workspace

        self.evaluator: Any = None
        self.error: Exception | None = None
        try:
            cfg = EvolveJob.model_validate(cfg_json)
            self.evaluator = Evaluator(cfg, Workspace.load(configs), space)
        except Exception as exc:
            self.error = exc

    def ready(self) -> dict[str, Any]:
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


def connect(ray: Any, address: str | None) -> None:
    """ray.init for the job: the named cluster, else RAY_ADDRESS, else a new local Ray. A
    cluster that cannot be reached is one line naming the address."""
    where = address or os.environ.get("RAY_ADDRESS")
    try:
        if where:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if not where:
            raise
        causes = [exc]
        while causes[-1].__cause__ is not None and len(causes) < 8:
            causes.append(causes[-1].__cause__)
        key = "ray_address" if address else "RAY_ADDRESS"
        # Ray puts the GCS's AuthenticationError in the text of the error it raises
        if any(isinstance(c, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(c)
               for c in causes):
            # Ray 2.60 sends its token to an explicit address only with RAY_AUTH_MODE=token
            raise ConfigError(f"{key}: the Ray cluster at {where} refused the connection "
                              "without its token: set RAY_AUTH_MODE=token for the job (the "
                              "token in ~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
        raise ConfigError(f"{key}: no Ray cluster reachable at {where} "
                          f"({_first_line(exc)})") from None


def actor_env(cfg: EvolveJob, configs: str) -> dict[str, str]:
    """What the actors need from the job's environment, which actors on a cluster started
    elsewhere (`ray start`) do not inherit: the judge's API key, kyara's and Hugging Face's
    settings. Handed over as the actors' runtime_env (kept in the cluster's GCS)."""
    names = {name for name in os.environ if name.startswith(("KYARA_", "HF_"))}
    if cfg.fitness.judge > 0:
        from pipelines.workspace import Workspace

        key = Workspace.load(configs).judge(cfg.judge).api_key_env
        if key:
            names.add(key)
    return {name: os.environ[name] for name in sorted(names) if name in os.environ}


class RayPool:
    """The actors and their dispatch: `evaluate` is the search's Evaluate over them."""

    def __init__(self, cfg: EvolveJob, configs: str, space: Any) -> None:
        ray = require_ray()
        self.ray = ray
        self.started = not ray.is_initialized()  # ours to shut down; else the caller's
        if self.started:
            connect(ray, cfg.ray_address)
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
        env = actor_env(cfg, configs)
        if env:
            options["runtime_env"] = {"env_vars": env}
        self.remote = ray.remote(**options)(_Actor)
        self.args = (cfg.model_dump(mode="json"), configs, space)
        self.actors = [self.remote.remote(*self.args) for _ in range(count)]
        self.counts = [0] * count
        try:
            self.info = self._get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayActorError as err:  # its process died while it loaded
            raise RuntimeError(f"Ray: an actor died while loading its model: "
                               f"{_first_line(err)}") from err

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
