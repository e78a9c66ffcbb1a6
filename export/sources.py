"""Where an export's inputs come from: checkpoint resolution, content hashing, cache locations, tool versions."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from toolkit.artifact.layout import cache_dir  # the cache root, shared with the runtime (sources.cache_dir stays importable)
from toolkit.recipes import Recipe

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
CONFIG_FILES = ("config.json", "generation_config.json")
# Bump when the export steps change what an artifact contains, so older cached exports are rebuilt.
ARTIFACT_REVISION = "position-ids+last-logits+mqa-2"
TOOL_PACKAGES = ("toolkit", "optimum", "optimum-onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnx", "transformers", "torch")


class SourceError(ValueError):
    """The checkpoint cannot be exported with the chosen recipe."""


def default_engine_dir(recipe: Recipe, target: str, precision: str, graph: str = "optimum") -> Path:
    """Where an export lands when ``--out`` is not given (``NAME-TARGET[-gqa]-PRECISION``)."""
    flavour = f"-{graph}" if target == "onnx" and graph != "optimum" else ""
    return cache_dir() / "engines" / f"{recipe.name}-{target}{flavour}-{precision}"


def hash_checkpoint(checkpoint: Path) -> str:
    """SHA-256 over the names and contents of every file in the checkpoint directory."""
    from toolkit.artifact.manifest import sha256_file

    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(path.relative_to(checkpoint).as_posix().encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def read_model_type(checkpoint: Path, recipe: Recipe) -> dict:
    """The checkpoint's config.json, after checking it matches the recipe's architecture."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{checkpoint} has no config.json; pass a Hugging Face checkpoint directory")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type != recipe.architecture:
        raise SourceError(
            f"recipe {recipe.name!r} expects a {recipe.architecture!r} checkpoint but {checkpoint} is {model_type!r}; "
            "pick the matching --recipe (see `toolkit recipes`)"
        )
    return config


def tool_versions() -> dict[str, str]:
    """Installed versions of the packages that shape an artifact."""
    versions = {}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_key(source_sha: str, recipe: Recipe, target: str, precision: str, graph: str = "optimum") -> str:
    """Hash of everything that determines the artifact; equal keys mean an export can be reused."""
    from toolkit.export.golden import GOLDEN_REVISION

    versions = tool_versions()
    key = {
        "source": source_sha,
        "recipe": recipe.name,
        "target": target,
        "precision": precision,
        "revision": ARTIFACT_REVISION,
        "graph": graph,
        "onnxruntime-genai": versions.get("onnxruntime-genai") if graph == "gqa" else None,
        "toolkit": versions.get("toolkit"),
        "onnxruntime": versions.get("onnxruntime") or versions.get("onnxruntime-gpu"),
        "optimum-onnx": versions.get("optimum-onnx"),
        "golden": GOLDEN_REVISION,  # the reference (and what is validated) changes with the golden set
    }
    if graph == "gqa" and precision == "int8":  # the schemes applied after the builder (toolkit.export.gqa_export)
        from toolkit.export.gqa_export import INT8_BODY, INT8_HEAD

        key["int8_head"] = INT8_HEAD.options()
        key["int8_body"] = {"linears": list(INT8_BODY["linears"]), "smooth_alpha": INT8_BODY["smooth_alpha"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
