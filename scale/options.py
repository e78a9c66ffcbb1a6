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

def engine_capacity(max_batch_size: int | None = None) -> int:
    """Requests one engine holds: its running batch (``--max-batch-size``, else the default) + its waiting queue.

    A replica takes that many requests at once, so the engine itself answers 429 when it is full
    (Ray's own default of 5 would queue in the proxy instead).
    """
    return (max_batch_size or SchedulerConfig().max_batch_size) + SchedulerConfig().max_waiting


DEFAULT_MAX_ONGOING_REQUESTS = engine_capacity()


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
    def most_replicas(self) -> int:
        """The most replicas the deployment runs at once: ``replicas``, or the autoscaling maximum."""
        return self.bounds[1] if self.autoscaling else self.replicas

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


def replicas_per_node(most_replicas: int, node_cpus: float, replica_cpus: float) -> int:
    """How many replicas of the deployment one node can hold: all of them, or fewer where the node's
    CPUs cannot (Ray places a replica only on a node with its ``num_cpus`` free)."""
    return max(1, min(most_replicas, int(node_cpus // max(replica_cpus, 1e-9))))


def replica_kv_budgets(engine_dirs: Sequence[str | Path], kv_budget_bytes: int | None, sharing: int,
                       memory_bytes: int) -> dict[Path, int]:
    """``{ONNX engine dir: KV budget bytes}`` for one replica of ``sharing`` on a node of ``memory_bytes``.

    ``--kv-cache-gib`` is per replica, as vLLM's and Ray Serve LLM's engine settings are per engine
    instance. Without it, plain ``toolkit serve``'s default (a tenth of the machine's memory, at least
    one full-context sequence: ``runtime.kv_cache.default_kv_budget_bytes``) is the default for *all*
    the replicas that can share the node: each replica gets its share, so ``--replicas 4`` keeps the
    machine's KV at a tenth of it rather than four tenths. When the replicas' budgets add up to more
    than the node's memory the deployment is refused (ScaleOptionsError): it would be killed by the
    kernel under load instead.
    """
    from toolkit.artifact.manifest import load_manifest
    from toolkit.runtime.kv_cache import KvGeometry, default_kv_budget_bytes

    budgets: dict[Path, int] = {}
    for engine_dir in map(Path, engine_dirs):
        manifest = load_manifest(engine_dir, verify_hashes=False)
        if manifest.target != "onnx":  # TensorRT-LLM sizes its KV cache itself, on the GPU
            continue
        per_token = KvGeometry.of_layout(manifest.kv_layout).bytes_per_token
        budgets[engine_dir] = kv_budget_bytes or default_kv_budget_bytes(per_token, manifest.context_length,
                                                                         memory_bytes // sharing)
    total = sharing * sum(budgets.values())
    if total > memory_bytes:
        raise ScaleOptionsError(
            f"{sharing} replicas on one machine would hold {total / 2**30:.1f} GiB of KV cache "
            f"({sum(budgets.values()) / 2**30:.2f} GiB each), more than its {memory_bytes / 2**30:.1f} GiB of memory: "
            "give a smaller --kv-cache-gib or fewer --replicas / --max-replicas")
    return budgets


def check_local_kv(engine_dirs: Sequence[str | Path], options: ScaleOptions, kv_budget_bytes: int | None) -> dict[Path, int]:
    """:func:`replica_kv_budgets` for a local cluster (all replicas on this machine), before Ray starts."""
    import os

    from toolkit.runtime.kv_cache import machine_memory_bytes

    cpus = replica_resources(engine_dirs, options.threads)["num_cpus"]
    sharing = replicas_per_node(options.most_replicas, os.cpu_count() or 1, cpus)
    return replica_kv_budgets(engine_dirs, kv_budget_bytes, sharing, machine_memory_bytes())
