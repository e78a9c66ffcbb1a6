"""Engines behind the runtime's ``Engine`` protocol: onnxruntime and TensorRT-LLM.

``load_engine`` opens an engine directory and picks the backend its manifest names; each backend
module (and its heavy library) is imported only when its engine is made.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.artifact.manifest import EngineDirError, load_manifest
from toolkit.recipes import get_recipe


def load_engine(engine_dir: str | Path, **options):
    """An unstarted engine for ``engine_dir`` (``OnnxEngine`` or ``TrtLlmEngine``); ``await engine.start()``."""
    engine_dir = Path(engine_dir)
    manifest = load_manifest(engine_dir)
    recipe = get_recipe(manifest.recipe)
    if manifest.target == "onnx":
        from toolkit.runtime.engines.onnx_engine import OnnxEngine

        return OnnxEngine(engine_dir, manifest, recipe, **options)
    if manifest.target == "trtllm":
        from toolkit.runtime.engines.trtllm_engine import TrtLlmEngine

        config = options.get("config")
        extra = {key: options[key] for key in ("adapters", "max_loras") if key in options}
        if config is not None:
            extra["max_waiting"], extra["prefix_cache"] = config.max_waiting, config.prefix_cache
        return TrtLlmEngine(engine_dir, manifest, recipe, **extra)
    raise EngineDirError(f"{engine_dir}: unknown target {manifest.target!r}; re-export")
