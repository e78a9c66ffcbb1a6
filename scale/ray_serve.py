"""The app as a Ray Serve deployment, and ``toolkit serve --ray``.

Imports ``ray`` (the ``toolkit[ray]`` extra): only ``toolkit serve --ray`` and the Ray tests import
this module.

Each replica is one Ray actor running :class:`ToolkitReplica`: Ray Serve's ingress calls
``__serve_build_asgi_app__``, which loads the engine directories through the same
``server.serve.load_engines`` with the same engine options as plain ``toolkit serve`` (plus the
replica's onnxruntime thread count and its share of the machine's KV budget: ``scale.options.replica_kv_budgets``)
and builds the same Litestar app plain ``toolkit serve`` runs; Ray Serve
runs its lifespan (the engines start) and routes a replica no request until its
``check_health`` (engines started) passes. Ray Serve's HTTP proxy is the one endpoint; it streams
each ASGI message as the replica sends it, and on a client disconnect cancels the replica's
request, which closes the stream's generator and aborts the engine request (KV cache freed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve

from toolkit.runtime.lora import DEFAULT_MAX_LORAS
from toolkit.scale.adapter_routing import ADAPTERS_HEADER
from toolkit.scale.metrics_merge import merge_expositions
from toolkit.scale.options import ScaleOptions, replica_resources
from toolkit.scale.proxy_errors import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from toolkit.server.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT_S

log = logging.getLogger(__name__)

APP_NAME = "toolkit"
DEPLOYMENT_NAME = "toolkit-engine"


class ToolkitReplica:
    """One replica: its own engines behind the app (``spec`` is what :func:`build_application` packed)."""

    async def __init__(self, spec: dict[str, Any]) -> None:
        self._spec = spec
        self._app: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from toolkit.artifact.onnx_session import ARENA_ENV
        from toolkit.runtime.kv_cache import machine_memory_bytes
        from toolkit.scale.options import replica_kv_budgets, replicas_per_node
        from toolkit.server.app import create_app
        from toolkit.server.serve import load_engines

        spec = self._spec
        logging.basicConfig(level=spec.get("log_level", "INFO").upper())
        if spec.get("ort_arena_mib") is not None:  # --ort-arena-mib, read by create_session in this replica's process
            os.environ[ARENA_ENV] = str(spec["ort_arena_mib"])
        dirs = [Path(d) for d in spec["engine_dirs"]]
        options = spec.get("engine_options") or {}  # toolkit serve's engine options (server.serve.engine_options)
        sharing = replicas_per_node(spec.get("most_replicas", 1), _node_cpus(), spec.get("replica_cpus", 1.0))
        budgets = replica_kv_budgets(dirs, (options.get("memory") or {}).get("kv_budget_bytes"), sharing,
                                     machine_memory_bytes())
        # every replica serves every --lora adapter; each loads one on its first request
        engines = load_engines(dirs, spec.get("loras", ()), spec.get("max_loras"), threads=spec.get("threads"),
                               kv_budgets=budgets, **options)
        self._app = create_app(engines, spec["api_keys"], **spec["app_options"])
        served = [name for engine in engines.values() for name in (getattr(engine, "adapter_names", ()) or ())]
        return AdapterResidency(AllReplicasMetrics(self._app, self._all_metrics), served, self.resident_adapter)

    async def resident_adapter(self, name: str) -> str:
        """Makes adapter ``name`` resident on this replica (the subclass of :func:`build_application`
        wraps it in ``@serve.multiplexed``, so Ray routes the adapter's requests here). The load proper
        is the engine's: it reads the adapter on its first request, keeping at most ``--max-loras``."""
        return name

    def _multiplexed_adapters(self) -> list[str]:
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        return list(wrapper.models) if wrapper is not None else []

    @property
    def _ctx(self) -> Any:
        return self._app.state.ctx

    async def check_health(self) -> None:
        """Healthy once every engine has started; Ray routes requests only to healthy replicas."""
        task = self._ctx._start_task
        if task is not None and not task.done():
            await asyncio.shield(task)  # the first check waits for the engines (replica still "starting")
        if self._ctx.start_error:
            raise RuntimeError(f"engine start failed: {self._ctx.start_error}")
        if not self._ctx.ready:
            raise RuntimeError("engines not ready")

    async def render_metrics(self) -> tuple[str, str]:
        """(this replica's id, its own Prometheus exposition); called on every replica by ``/metrics``."""
        body, _ = self._ctx.metrics.render()
        return serve.get_replica_context().replica_id.unique_id, body.decode()

    async def replica_info(self) -> dict[str, Any]:
        """Replica id and process id (the tests use it to kill one replica)."""
        entries = self._ctx.models.entries
        stats = {e.names[0]: e.engine.stats().__dict__ for e in entries}
        loaded = {e.names[0]: list(getattr(getattr(e.engine, "lora", None), "loaded", ()) or ()) for e in entries}
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(), "stats": stats,
                "adapters_loaded": loaded, "adapters_multiplexed": self._multiplexed_adapters()}

    async def _all_metrics(self) -> tuple[bytes, str]:
        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(context.deployment, context.app_name)
        results = await handle.broadcast("render_metrics").results_async(timeout_s=10, return_exceptions=True)
        good = [r for r in results if isinstance(r, tuple)]
        if len(good) < len(results):
            log.warning("/metrics: %d of %d replicas did not answer", len(results) - len(good), len(results))
        return merge_expositions(good)


def _node_cpus() -> float:
    """The CPUs Ray counts on this replica's node (how many replicas it can hold: ``replicas_per_node``)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return float(next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node), 1.0))


class AdapterResidency:
    """ASGI wrapper of the app (outermost): a request Ray routed with a multiplexed model id
    (``serve_multiplexed_model_id``, set by the proxy's ``adapter_routing`` middleware) naming one of
    this replica's adapters makes it resident through the ``@serve.multiplexed`` loader first, so Ray
    knows this replica has it. Every response names the replica (``x-toolkit-replica``) and lists the
    adapters it serves (``x-toolkit-adapters``, read and removed by the proxy middleware)."""

    def __init__(self, app: Any, adapters: Sequence[str], resident: Any) -> None:
        self.app = app
        self._adapters = frozenset(adapters)
        self._resident = resident
        self._headers: list[tuple[bytes, bytes]] | None = None

    def __getattr__(self, name: str) -> Any:  # Ray Serve looks for FastAPI attributes on the app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        if self._headers is None:
            replica = serve.get_replica_context().replica_id.unique_id
            self._headers = [(b"x-toolkit-replica", replica.encode()),
                             (ADAPTERS_HEADER, ",".join(sorted(self._adapters)).encode())]
        adapter = serve.get_multiplexed_model_id()
        if adapter and adapter in self._adapters:
            await self._resident(adapter)
        extra = self._headers

        async def tagged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*(message.get("headers") or []), *extra]}
            await send(message)

        await self.app(scope, receive, tagged_send)


class AllReplicasMetrics:
    """ASGI wrapper of the app: a ``GET /metrics`` the app allows (API key, see ``--public-metrics``)
    answers with every replica's metrics, each sample labelled ``replica="<id>"``."""

    def __init__(self, app: Any, gather: Any) -> None:
        self.app = app
        self._gather = gather

    def __getattr__(self, name: str) -> Any:  # Ray Serve looks for FastAPI attributes on the app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != "/metrics" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        messages: list[dict] = []

        async def capture(message: dict) -> None:
            messages.append(message)

        await self.app(scope, receive, capture)
        if not messages or messages[0].get("status") != 200:
            for message in messages:
                await send(message)
            return
        body, content_type = await self._gather()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def build_application(engine_dirs: Sequence[str | Path], api_keys: Sequence[str], options: ScaleOptions, *,
                      grace_s: float = 10.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                      request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S, log_level: str = "info",
                      engine_options: dict[str, Any] | None = None, ort_arena_mib: int | None = None,
                      loras: Sequence[str] = (), max_loras: int | None = None, **app_options: Any) -> Any:
    """The bound Ray Serve application: ``options`` replicas of the app over ``engine_dirs``.

    ``api_keys`` are final (the caller adds ``$TOOLKIT_API_KEY``: replicas may run elsewhere).
    ``engine_options``: ``toolkit serve``'s engine options (``server.serve.engine_options``), given to
    every replica's engines as plain ``toolkit serve`` gives them to its own; ``ort_arena_mib``: ``--ort-arena-mib``.
    Engine directories must be readable at the same path on every node that runs a replica.
    """
    dirs = [str(Path(d).resolve()) for d in engine_dirs]
    resources = replica_resources(dirs, options.threads)
    spec = replica_spec(dirs, api_keys, options, resources["num_cpus"], engine_options=engine_options,
                        ort_arena_mib=ort_arena_mib, loras=loras, max_loras=max_loras, log_level=log_level,
                        app_options={"max_body_bytes": max_body_bytes, "shutdown_grace_s": grace_s,
                                     "request_timeout_s": request_timeout_s, **app_options})
    deployment = serve.deployment(serve.ingress()(_replica_class(max_loras or DEFAULT_MAX_LORAS)), name=DEPLOYMENT_NAME)
    deployment = deployment.options(**options.deployment_options(resources))
    return deployment.bind(spec)


def replica_spec(engine_dirs: Sequence[str], api_keys: Sequence[str], options: ScaleOptions, replica_cpus: float, *,
                 engine_options: dict[str, Any] | None = None, ort_arena_mib: int | None = None,
                 loras: Sequence[str] = (), max_loras: int | None = None, log_level: str = "info",
                 app_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every replica is handed (plain data, pickled by Ray): how to build its engines and app."""
    return {"engine_dirs": list(engine_dirs), "api_keys": list(api_keys), "threads": options.threads,
            "most_replicas": options.most_replicas, "replica_cpus": replica_cpus,
            "engine_options": engine_options or {}, "ort_arena_mib": ort_arena_mib,
            "loras": list(loras), "max_loras": max_loras, "log_level": log_level, "app_options": app_options or {}}


def _replica_class(max_loras: int) -> type:
    """:class:`ToolkitReplica` whose ``resident_adapter`` is Ray Serve's multiplexed loader, keeping as
    many adapters per replica as the engine does (``--max-loras``, least recently used dropped)."""

    class MultiplexedReplica(ToolkitReplica):
        @serve.multiplexed(max_num_models_per_replica=max_loras)
        async def resident_adapter(self, name: str) -> str:
            return await ToolkitReplica.resident_adapter(self, name)

    MultiplexedReplica.__name__ = MultiplexedReplica.__qualname__ = "ToolkitReplica"
    return MultiplexedReplica


def proxy_env() -> dict[str, str]:
    """Environment the Ray processes need: Ray Serve's proxy reads its middleware callback from it
    (``toolkit.scale.proxy_errors``). Set before a local ``ray.init``; a remote cluster's head must be
    started with it (README, "Scaling out")."""
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK}


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init``: a local cluster (address None) or the one at ``address``, with :func:`proxy_env`."""
    import ray

    os.environ.update(proxy_env())  # inherited by a local cluster's processes
    ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": proxy_env()}, **kwargs)


def deploy(engine_dirs: Sequence[str | Path], api_keys: Sequence[str], options: ScaleOptions, *,
           host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Start Serve's proxy on ``host:port`` (once per cluster) and deploy (or redeploy) the app; waits
    until every initial replica's engines have started. Ray must be initialised."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(engine_dirs, api_keys, options, **kwargs), name=APP_NAME, route_prefix="/")


def serve_on_ray(engine_dirs: Sequence[str | Path], host: str, port: int, api_keys: Sequence[str],
                 options: ScaleOptions, *, address: str | None = None, log_level: str = "info",
                 **kwargs: Any) -> None:
    """``toolkit serve --ray``: join the cluster at ``address`` (none: start a local one), deploy, wait for Ctrl-C / SIGTERM."""
    import ray

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    init_ray(address, logging_level=log_level.upper())
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        deploy(engine_dirs, api_keys, options, host=host, port=port, log_level=log_level, **kwargs)
        log.info("serving on http://%s:%d through Ray Serve (OpenAI: /v1, Workers AI: /client/v4)", host, port)
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        log.info("shutting down: replicas get %.0f s to finish their requests", options.grace_s)
        # bounded: a signal sent to the whole process group has also stopped a local cluster's GCS
        _bounded(lambda: serve.delete(APP_NAME), options.grace_s + 15)
        if address is None:
            _bounded(serve.shutdown, 15)
        ray.shutdown()


def _bounded(step: Any, timeout_s: float) -> None:
    """Run ``step`` in a daemon thread and wait at most ``timeout_s`` for it."""
    thread = threading.Thread(target=step, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("shutdown step did not finish within %.0f s; going on", timeout_s)
