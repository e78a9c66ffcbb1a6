"""What a Ray Serve deployment of the app asks for: replica count or autoscaling, and resources per replica.

Plain data and arithmetic, no ``ray`` import: the CLI validates its options here before Ray starts,
and the tests check the mapping without a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.runtime.scheduler import SchedulerConfig

#: A replica takes as many requests as its engine can hold (running batch + waiting queue), so the
#: engine itself answers 429 when it is full (Ray's own default of 5 would queue in the proxy instead).
DEFAULT_MAX_ONGOING_REQUESTS = SchedulerConfig().max_batch_size + SchedulerConfig().max_waiting


class ScaleOptionsError(ValueError):
    """The replica options contradict each other; the message says how."""


@dataclass(frozen=True)
class ScaleOptions:
    """Replicas and their resources (see ``toolkit serve --ray`` in README's "Scaling out").

    replicas: fixed replica count, used when neither min_replicas nor max_replicas is given.
    min_replicas / max_replicas: autoscaling bounds; either one turns autoscaling on.
    target_ongoing_requests: the per-replica load (requests running or queued in the replica)
        Ray Serve's autoscaler steers towards.
    threads: onnxruntime intra-op threads per replica, also the CPUs the replica reserves
        (None: 1 CPU reserved, onnxruntime picks its thread count).
    grace_s: graceful_shutdown_timeout_s: a replica being removed (scale-down, redeploy,
        shutdown) stops getting new requests and gets this long to finish its in-flight ones.
    max_ongoing_requests: requests Ray sends one replica at once (beyond: queued in the proxy).
    upscale_delay_s / downscale_delay_s / metrics_interval_s / look_back_period_s: the autoscaler's
        reaction times (Ray Serve's AutoscalingConfig fields of the same names).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    threads: int | None = None
    grace_s: float = 10.0
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    metrics_interval_s: float = 2.0
    look_back_period_s: float = 10.0
    health_check_period_s: float = 2.0
    extra_actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ScaleOptionsError("--replicas must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ScaleOptionsError("--threads must be >= 1")
        if self.target_ongoing_requests <= 0:
            raise ScaleOptionsError("--target-ongoing-requests must be > 0")
        if self.max_ongoing_requests < 1:
            raise ScaleOptionsError("--max-ongoing-requests must be >= 1")
        if self.autoscaling:
            lo, hi = self.bounds
            if lo < 0 or hi < 1 or lo > hi:
                raise ScaleOptionsError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1 "
                                        f"(got {lo} and {hi})")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) replicas: a missing bound defaults to 1 (min) or to max(min, replicas) (max)."""
        lo = 1 if self.min_replicas is None else self.min_replicas
        hi = max(lo, self.replicas) if self.max_replicas is None else self.max_replicas
        return lo, hi

    def deployment_options(self, actor_options: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options(...)``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {**actor_options, **self.extra_actor_options},
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": self.grace_s,
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": 30.0,
        }
        if self.autoscaling:
            lo, hi = self.bounds
            opts["autoscaling_config"] = {
                "min_replicas": lo,
                "initial_replicas": min(max(self.replicas, lo, 1), hi),
                "max_replicas": hi,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": self.metrics_interval_s,
                "look_back_period_s": self.look_back_period_s,
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts


def replica_resources(engine_dirs: Sequence[str | Path], threads: int | None) -> dict[str, Any]:
    """``ray_actor_options`` for one replica serving ``engine_dirs``.

    ONNX engines: ``num_cpus`` = ``threads`` (1 when not given) per engine. TensorRT-LLM engines:
    ``num_gpus`` = the recipe's tensor-parallel size for the engine's precision
    (``recipe.trtllm.tensor_parallel_size``; 1 when the recipe does not list it) per engine, plus
    1 CPU. A replica is one placement: its GPUs are on one node.
    """
    from toolkit.artifact.manifest import load_manifest
    from toolkit.recipes import get_recipe

    cpus = 0.0
    gpus = 0
    for engine_dir in engine_dirs:
        manifest = load_manifest(engine_dir, verify_hashes=False)
        if manifest.target == "trtllm":
            recipe = get_recipe(manifest.recipe)
            gpus += int(recipe.trtllm.tensor_parallel_size.get(manifest.precision, 1))
            cpus = max(cpus, 1.0)
        else:
            cpus += float(threads or 1)
    options: dict[str, Any] = {"num_cpus": cpus or 1.0}
    if gpus:
        options["num_gpus"] = gpus
    return options
