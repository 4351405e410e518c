"""Fitness evaluations on Ray (the optional extra `kyara[ray]`): one actor per GPU, each
with its own resident model and judge, on a local Ray or the cluster named by RAY_ADDRESS.

Only evaluation is distributed: CMA-ES, the evaluation log and the events stay in the job
process, so resume and the console work the same as without Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from pipelines.config import ConfigError, EvolveJob

EXTRA_HINT = ("ray: true needs the optional extra: pip install 'kyara[ray]' (or set "
              "ray: false to evaluate one candidate after another)")


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(EXTRA_HINT) from None
    return ray


class _Actor:
    """Built inside the Ray worker: its own workspace, resident model and judge."""

    def __init__(self, cfg_json: dict[str, Any], configs: str, space: Any) -> None:
        from pipelines.merge.evolve import Evaluator
        from pipelines.workspace import Workspace

        cfg = EvolveJob.model_validate(cfg_json)
        self.evaluator = Evaluator(cfg, Workspace.load(configs), space)

    def evaluate(self, merge: dict[str, Any], seed: int) -> dict[str, Any]:
        return self.evaluator.evaluate(merge, seed)


class RayPool:
    def __init__(self, cfg: EvolveJob, configs: str, space: Any) -> None:
        ray = require_ray()
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
                     log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cuda = cfg.options.device == "cuda"
        if cuda and gpus == 0:
            raise ConfigError("ray: the Ray cluster has no GPU; set options.device: cpu or "
                              "start Ray where the GPUs are")
        count = cfg.workers or (gpus if cuda else 1)
        remote = ray.remote(num_gpus=1 if cuda else 0)(_Actor)
        cfg_json = cfg.model_dump(mode="json")
        self.actors = [remote.remote(cfg_json, configs, space) for _ in range(count)]

    @property
    def size(self) -> int:
        return len(self.actors)

    def evaluate(self, batch: list[tuple[int, dict[str, Any], int]]
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Round-robin over the actors; results come back in candidate order."""
        futures = [(index, self.actors[n % len(self.actors)].evaluate.remote(merge, seed))
                   for n, (index, merge, seed) in enumerate(batch)]
        for index, future in futures:
            yield index, self.ray.get(future)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
