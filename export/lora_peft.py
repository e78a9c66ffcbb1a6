"""Reading and checking a PEFT LoRA adapter for ``toolkit export-lora`` (step 1 of ``export/lora.py``).

Its own module because every engine target needs it: the ONNX path converts the weights read here
(``export/lora_graph.py``), the TensorRT-LLM path (``export/lora_trtllm.py``) only checks them against the
engine's LoRA build. Everything wrong with the directory (missing or unreadable files, DoRA, biases,
``modules_to_save``, unsupported targets, ranks above ``MAX_RANK``, another base model) is refused here with
an ``AdapterError`` naming the problem, before any engine file is touched.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.artifact.lora import MAX_RANK, PEFT_CONFIG, PEFT_WEIGHTS, PROJECTIONS, AdapterError, AdapterInfo
from toolkit.artifact.manifest import Manifest, sha256_file

_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read from disk: its config and ``{"layers.N.proj": (lora_A [r, in], lora_B [out, r] * scale)}``."""

    path: Path
    config: dict
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    files_sha256: dict[str, str]

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in (patterns or {}).items():
        if module_name == key or module_name.endswith("." + key) or re.fullmatch(rf".*\.{key}", module_name):
            return value
    return default


def read_peft_adapter(path: Path) -> PeftAdapter:
    """Read and check a PEFT LoRA directory; raise ``AdapterError`` naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {path} is not a directory (expected {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (path / name).is_file():
            raise AdapterError(f"adapter {path}: {name} is missing")
    try:
        config = json.loads((path / PEFT_CONFIG).read_text())
    except ValueError as exc:
        raise AdapterError(f"adapter {path}: {PEFT_CONFIG} is not valid JSON ({exc})") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"adapter {path}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True), ("lora_bias", True)):
        if config.get(key) == bad:
            raise AdapterError(f"adapter {path}: {key}={bad} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {path}: bias={config.get('bias')!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise AdapterError(f"adapter {path}: modules_to_save {config['modules_to_save']} is not supported (LoRA weights only)")
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(path / PEFT_WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"adapter {path}: {PEFT_WEIGHTS} is not a readable safetensors file ({exc})") from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.search(key)
        if match is None:
            raise AdapterError(f"adapter {path}: tensor {key!r} is not a LoRA A/B weight of a decoder layer projection")
        layer, proj, kind = match.groups()
        if proj not in PROJECTIONS:
            raise AdapterError(f"adapter {path}: LoRA on {proj!r} is not supported (only {', '.join(PROJECTIONS)})")
        parts.setdefault(f"layers.{layer}.{proj}", {})[kind] = tensor.astype(np.float32)
    if not parts:
        raise AdapterError(f"adapter {path}: {PEFT_WEIGHTS} holds no LoRA weights")
    alpha, rslora = float(config.get("lora_alpha") or config.get("r") or 8), bool(config.get("use_rslora"))
    weights = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {path}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter {path}: {module} has lora_A {a.shape} and lora_B {b.shape}, ranks disagree")
        rank = a.shape[0]
        if not 0 < rank <= MAX_RANK:
            raise AdapterError(f"adapter {path}: {module} has rank {rank}, the supported range is 1..{MAX_RANK}")
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        weights[module] = (a, b * np.float32(scale))
    files = {name: sha256_file(path / name) for name in (PEFT_CONFIG, PEFT_WEIGHTS)}
    return PeftAdapter(path, config, weights, files)


def check_base_model(adapter: PeftAdapter, manifest: Manifest, model_names: tuple[str, ...]) -> None:
    """Refuse an adapter whose ``base_model_name_or_path`` names another model than the engine's."""
    base = adapter.config.get("base_model_name_or_path")
    if not base:
        return
    local = Path(base)
    if (local / "config.json").is_file():
        model_type = json.loads((local / "config.json").read_text()).get("model_type")
        if local.resolve() == Path(manifest.source.get("path", "")).resolve() or model_type == manifest.architecture:
            return
        raise AdapterError(
            f"adapter {adapter.path} was trained on {base} ({model_type}), but this engine is a "
            f"{manifest.architecture} model ({manifest.recipe}): wrong base model"
        )
    known = {n.lower() for n in model_names} | {Path(manifest.source.get("path", "")).as_posix().lower()}
    if base.lower() not in known and not local.exists():
        raise AdapterError(
            f"adapter {adapter.path} was trained on {base!r}, but this engine serves {model_names[0]!r} "
            f"({manifest.recipe}): wrong base model"
        )



def check_layers(adapter: PeftAdapter, checkpoint: Path) -> None:
    """Refuse an adapter with weights for a layer the base checkpoint does not have."""
    config = json.loads((checkpoint / "config.json").read_text())
    layers = int(config.get("num_hidden_layers") or 0)
    deepest = max(int(m.split(".")[1]) for m in adapter.weights)
    if layers and deepest >= layers:
        raise AdapterError(f"adapter {adapter.path} has LoRA weights for layer {deepest}, the base model has {layers} "
                           "layers: wrong base model")



def publish_stage(stage: Path, target: Path, info: AdapterInfo, engine_dir: Path) -> None:
    """Save the adapter's record in its staging directory, refuse it if its validation failed, then move it into place."""
    info.save(stage)
    if not info.validation["passed"]:
        raise AdapterError(f"adapter {info.name!r} failed validation on {engine_dir}: "
                           f"{'; '.join(info.validation['failures'])}")
    if target.exists():
        shutil.rmtree(target)
    stage.replace(target)
