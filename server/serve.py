"""``toolkit serve``: load engine directories and run the app on uvicorn with a graceful shutdown.

On SIGTERM / Ctrl-C uvicorn stops accepting connections and waits up to ``grace_s`` for the
in-flight responses; then the app's lifespan marks itself not ready (``/health`` → 503) and
calls ``engine.stop(grace_s)``, which finishes or aborts what is left.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.artifact.layout import MANIFEST_NAME
from toolkit.runtime.types import Engine
from toolkit.server.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT_S, create_app

log = logging.getLogger(__name__)

#: uvicorn's HTTP/1.1 implementation. h11 bounds a request's headers (16 KiB, answered 431/400);
#: httptools, which uvicorn picks when it is installed (``ray[serve]`` installs it), has no such
#: bound, so a megabyte of headers would reach the app.
HTTP_PROTOCOL = "h11"

API_KEY_ENV = "TOOLKIT_API_KEY"


class ServeError(Exception):
    """The engines cannot be served as asked (bad engine dir, duplicate model, ...); the message says why."""



def api_keys_from_env(given: Sequence[str] = ()) -> list[str]:
    """The given keys plus the comma-separated keys in ``$TOOLKIT_API_KEY``."""
    keys = [k for k in given if k]
    keys += [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    return keys


def engine_dirs_to_serve(engine_dirs: Sequence[str | Path], models_dir: str | Path | None) -> list[Path]:
    """The ENGINE_DIR arguments plus every engine directory directly under ``models_dir``."""
    dirs = [Path(d) for d in engine_dirs]
    if models_dir is not None:
        root = Path(models_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--models-dir {root} is not a directory")
        dirs += sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file())
    return dirs


def assign_adapters(dirs: Sequence[Path], loras: Sequence[str]) -> dict[Path, dict[str, Path]]:
    """``--lora NAME[=PATH]`` options → ``{engine dir: {adapter name: adapter dir}}``; ValueError naming the problem.

    ``NAME`` is an adapter listed in an engine directory's manifest (``toolkit export-lora``);
    ``NAME=PATH`` an adapter exported elsewhere (``export-lora --out``), served by the engine built
    from the same base checkpoint.
    """
    from toolkit.artifact.lora import AdapterError, AdapterInfo, check_name
    from toolkit.artifact.manifest import load_manifest

    manifests = {d: load_manifest(d, verify_hashes=False) for d in dirs}
    assigned: dict[Path, dict[str, Path]] = {d: {} for d in dirs}
    for spec in loras:
        name, _, path = spec.partition("=")
        try:
            check_name(name)
            if path:
                info = AdapterInfo.load(Path(path))
                owners = [d for d, m in manifests.items() if m.source.get("sha256") == info.base_sha256]
                where = {d: Path(path) for d in owners}
            else:
                where = {d: d / m.adapters[name]["path"] for d, m in manifests.items() if name in m.adapters}
        except AdapterError as exc:
            raise ValueError(f"--lora {spec}: {exc}") from None
        if not where:
            listed = {d.name: sorted(m.adapters) for d, m in manifests.items()}
            raise ValueError(f"--lora {spec}: no served engine has this adapter (adapters per engine: {listed}); "
                             "add it with `toolkit export-lora`" if not path else
                             f"--lora {spec}: the adapter was exported for a base model none of the served engines has")
        for engine_dir, adapter_dir in where.items():
            if name in assigned[engine_dir]:
                raise ValueError(f"--lora {spec}: adapter name {name!r} is given twice")
            assigned[engine_dir][name] = adapter_dir
    return assigned


def scheduler_options(prefix_cache: bool = True, step_budget_ms: float | None = None,
                      max_batch_size: int | None = None, waiting_served_ratio: float | None = None,
                      queued_step_budget_ms: float | None = None) -> dict[str, Any]:
    """The ``SchedulerConfig`` fields ``--no-prefix-cache`` / ``--step-budget-ms`` / ``--max-batch-size`` /
    ``--waiting-served-ratio`` / ``--queued-step-budget-ms`` change (empty: all defaults; a ratio of 0 turns
    pausing off, a queued budget of 0 keeps ``--step-budget-ms`` while requests queue)."""
    return {**({} if prefix_cache else {"prefix_cache": False}),
            **({} if step_budget_ms is None else {"step_budget_ms": step_budget_ms}),
            **({} if max_batch_size is None else {"max_batch_size": max_batch_size}),
            **({} if waiting_served_ratio is None else {"waiting_served_ratio": waiting_served_ratio}),
            **({} if queued_step_budget_ms is None else {"queued_step_budget_ms": queued_step_budget_ms})}


def engine_options(no_prefix_cache: bool = False, step_budget_ms: float | None = None, prompt_lookup: bool | None = None,
                   max_draft_tokens: int | None = None, kv_cache_gib: float | None = None,
                   prefix_cache_share: float = 0.25, malloc_trim_s: float = 10.0,
                   predicted_outputs: bool | None = None, max_batch_size: int | None = None,
                   waiting_served_ratio: float | None = None, queued_step_budget_ms: float | None = None,
                   kv_cache_dtype: str | None = None) -> dict[str, Any]:
    """``toolkit serve``'s engine options as :func:`load_engines` keyword arguments.

    One translation for both ways of serving: plain ``toolkit serve`` and every ``--ray`` replica
    (``toolkit.scale.ray_serve``) build their engines from this dict, so an option cannot reach one
    and miss the other.
    """
    return {"prefix_cache": not no_prefix_cache, "step_budget_ms": step_budget_ms, "max_batch_size": max_batch_size,
            "waiting_served_ratio": waiting_served_ratio, "queued_step_budget_ms": queued_step_budget_ms,
            "speculative": {**({"prompt_lookup": prompt_lookup} if prompt_lookup is not None else {}),
                            **({"predicted_outputs": predicted_outputs} if predicted_outputs is not None else {}),
                            **({"max_draft": max_draft_tokens} if max_draft_tokens else {})},
            "memory": {"prefix_cache_share": prefix_cache_share, "malloc_trim_s": malloc_trim_s,
                       "reserve_prefix_cache": True,  # the prefix cache's pool committed at start (README: Memory)
                       **({"kv_budget_bytes": int(kv_cache_gib * 2**30)} if kv_cache_gib else {}),
                       **({"kv_cache_dtype": kv_cache_dtype} if kv_cache_dtype else {})}}


def load_engines(dirs: Sequence[Path], loras: Sequence[str] = (), max_loras: int | None = None,
                 prefix_cache: bool = True, step_budget_ms: float | None = None,
                 speculative: dict[str, Any] | None = None, memory: dict[str, Any] | None = None,
                 threads: int | None = None, kv_budgets: dict[Path, int] | None = None,
                 max_batch_size: int | None = None, waiting_served_ratio: float | None = None,
                 queued_step_budget_ms: float | None = None) -> dict[str, Engine]:
    """``{recipe name: unstarted engine}`` for each directory (one engine per recipe), with its ``--lora`` adapters.

    ``prefix_cache=False`` (``--no-prefix-cache``) turns prefix caching off (ONNX: the prefix cache; TensorRT-LLM: KV block reuse).
    ``step_budget_ms`` (``--step-budget-ms``): the ONNX engines' model time per decoding step, prompt chunks
    included (None: ``SchedulerConfig``'s default; 0: the token budget alone). ``max_batch_size``
    (``--max-batch-size``): the ONNX engines' most sequences decoded together (None: the default).
    ``waiting_served_ratio`` (``--waiting-served-ratio``): prompts-only steps for bursts of new requests
    (``runtime/scheduler.py``; None: the default, 0: never). ``queued_step_budget_ms``
    (``--queued-step-budget-ms``): the step budget while requests wait for a free row (None: the default;
    0: ``step_budget_ms`` then too).
    ``threads``: onnxruntime intra-op threads (Ray replicas' ``--threads``); ``kv_budgets``: a KV budget
    per directory, over ``memory``'s (Ray replicas sharing a machine, ``toolkit.scale.options.replica_kv_budgets``).
    """
    from toolkit.runtime import load_engine
    from toolkit.runtime.scheduler import SchedulerConfig

    engines: dict[str, Engine] = {}
    adapters = assign_adapters(dirs, loras) if loras else {}
    for engine_dir in dirs:
        options = {"adapters": adapters[engine_dir], "max_loras": max_loras} if adapters.get(engine_dir) else {}
        if threads:  # TensorRT-LLM engines are handed only the options they take (runtime.engines.load_engine)
            options["threads"] = threads
        if scheduler := scheduler_options(prefix_cache, step_budget_ms, max_batch_size, waiting_served_ratio,
                                          queued_step_budget_ms):
            options["config"] = SchedulerConfig(**scheduler)
        if speculative:  # --[no-]prompt-lookup / --[no-]predicted-outputs / --max-draft-tokens (runtime/speculative.py)
            from toolkit.runtime.speculative import SpeculativeConfig

            options["speculative"] = SpeculativeConfig(**speculative)
        options.update(memory or {})  # ONNX engines: kv_budget_bytes, kv_cache_dtype, prefix_cache_share, malloc_trim_s (README: Memory)
        if kv_budgets and engine_dir in kv_budgets:
            options["kv_budget_bytes"] = kv_budgets[engine_dir]
        engine = load_engine(engine_dir, **options)
        key = engine.recipe.name
        if key in engines:
            raise ValueError(f"{engine_dir}: recipe {key!r} is already served by another engine directory; "
                             "serve one engine per model")
        engines[key] = engine
        log.info("loaded %s from %s", key, engine_dir)
    return engines


def build_app(engine_dirs: Sequence[str | Path] = (), api_keys: Sequence[str] = (),
              models_dir: str | Path | None = None, *, grace_s: float = 10.0,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S, loras: Sequence[str] = (),
              max_loras: int | None = None, prefix_cache: bool = True, step_budget_ms: float | None = None,
              speculative: dict[str, Any] | None = None, memory: dict[str, Any] | None = None,
              max_batch_size: int | None = None, waiting_served_ratio: float | None = None,
              queued_step_budget_ms: float | None = None, **app_options: Any) -> Any:
    """Load the engines and build the app; raises ServeError.

    ``loras``: ``--lora NAME[=PATH]`` options (``assign_adapters``); ``max_loras``: adapters kept loaded per engine.

    ``app_options`` go to ``create_app`` (``public_metrics``, ``cors_origins``). Which engine to
    serve when none is given (the default model, exported on first use) is the caller's decision
    (``toolkit serve`` in ``toolkit.cli``): the server only serves engine directories.
    """
    from toolkit.artifact.manifest import EngineDirError
    from toolkit.recipes import UnknownRecipeError

    try:
        dirs = engine_dirs_to_serve(engine_dirs, models_dir)
        if not dirs:
            raise ServeError("no engine directory to serve: give ENGINE_DIR or a --models-dir holding engine directories")
        engines = load_engines(dirs, loras, max_loras, prefix_cache, step_budget_ms, speculative, memory,
                               max_batch_size=max_batch_size, waiting_served_ratio=waiting_served_ratio,
                               queued_step_budget_ms=queued_step_budget_ms)
        return create_app(engines, api_keys_from_env(api_keys), max_body_bytes=max_body_bytes,
                          shutdown_grace_s=grace_s, request_timeout_s=request_timeout_s, **app_options)
    except (EngineDirError, UnknownRecipeError, FileNotFoundError, ValueError) as exc:
        raise ServeError(str(exc)) from exc


def serve(engine_dirs: Sequence[str | Path] = (), host: str = "127.0.0.1", port: int = 8000,
          api_keys: Sequence[str] = (), models_dir: str | Path | None = None, *, grace_s: float = 10.0,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info",
          request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S, **app_options: Any) -> None:
    """Serve the engine directories (and those under ``models_dir``) until interrupted."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(engine_dirs, api_keys, models_dir, grace_s=grace_s, max_body_bytes=max_body_bytes,
                    request_timeout_s=request_timeout_s, **app_options)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level=log_level, http=HTTP_PROTOCOL,
                            access_log=False, timeout_graceful_shutdown=max(1, int(grace_s)))
    log.info("serving on http://%s:%d (OpenAI: /v1, Workers AI: /client/v4, docs: /schema)", host, port)
    _exit_zero_on_sigterm()
    uvicorn.Server(config).run()


def _exit_zero_on_sigterm() -> None:
    """Make a drained SIGTERM shutdown exit with status 0.

    uvicorn handles SIGTERM itself (stop accepting, drain, lifespan shutdown), then re-raises the
    signal to the handler that was installed before it started; with the default handler that kills
    the process (status -15) although the shutdown was clean. This handler exits normally instead.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_exit)


def _sigterm_exit(signum: int, frame: Any) -> None:
    log.info("stopped on SIGTERM")
    raise SystemExit(0)
