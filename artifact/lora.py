"""The LoRA adapter contract between ``toolkit export-lora`` and the runtime.

An engine directory that has adapters holds, beside ``model.onnx``:

- ``model.lora.onnx``: the same graph (sharing ``model.onnx``'s external weights file) where every
  targeted projection ``y = x @ W`` became ``y = x @ W + (x @ A[row]) @ B[row]``, with per-row
  low-rank weights as graph inputs ``lora_A.<module>`` ``[rows, in, rank]`` and ``lora_B.<module>``
  ``[rows, rank, out]`` (``<module>`` is ``layers.N.q_proj`` etc.; each input has its own symbolic
  rank). Base rows and unused rank are zeros, and a step where no row has an adapter feeds rank 0,
  so one step serves a batch that mixes adapters and the base model.
- ``adapters/<name>/adapter.json`` (``AdapterInfo``) and ``adapters/<name>/adapter.safetensors``:
  per module ``<module>.A`` ``[in, rank]`` and ``<module>.B`` ``[rank, out]``, float32, the PEFT
  scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rslora) folded into ``B``. Packed
  graph projections (the gqa graph's ``qkv_proj``) get q/k/v stacked along the rank, ``B``
  block-diagonal.

An adapter exported elsewhere (``export-lora --out DIR``) has the same two files; it may be served
by an engine built from the same base checkpoint (``AdapterInfo.base_sha256``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LORA_MODEL_FILE = "model.lora.onnx"
ADAPTERS_DIR = "adapters"
ADAPTER_INFO = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
A_PREFIX = "lora_A."
B_PREFIX = "lora_B."
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
MAX_RANK = 64
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(ValueError):
    """An adapter is missing, corrupted, or does not fit the engine; the message names the problem."""


def a_input(module: str) -> str:
    return A_PREFIX + module


def b_input(module: str) -> str:
    return B_PREFIX + module


def check_name(name: str) -> str:
    """An adapter name usable in a model id (``BASE:NAME``), a path and a metrics label."""
    if not NAME_PATTERN.match(name or ""):
        raise AdapterError(f"adapter name {name!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


@dataclass
class AdapterInfo:
    """``adapter.json``: what the adapter is, what it was made for, and how it validated.

    modules: graph module -> rank; base_sha256: the base checkpoint's hash (the engine manifest's
    ``source.sha256``); weights_sha256: of ``adapter.safetensors``; source: the PEFT directory and
    its files' SHA-256; validation: the verdict against the adapter's PyTorch + PEFT reference.
    """

    name: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: dict[str, int]
    base_model: str
    base_sha256: str
    architecture: str
    weights_sha256: str
    source: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None

    def save(self, directory: Path) -> None:
        (directory / ADAPTER_INFO).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "AdapterInfo":
        path = Path(directory) / ADAPTER_INFO
        if not path.is_file():
            raise AdapterError(f"{directory} is not an exported adapter: {ADAPTER_INFO} is missing (run `toolkit export-lora`)")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise AdapterError(f"{path} is corrupted ({exc}); re-run `toolkit export-lora`") from None


def graph_modules(session: Any) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of a LoRA graph's adapter inputs (empty for a graph without them)."""
    modules = {}
    for arg in session.get_inputs():
        if arg.name.startswith(A_PREFIX):
            module = arg.name[len(A_PREFIX):]
            out = next(b.shape[2] for b in session.get_inputs() if b.name == b_input(module))
            modules[module] = (int(arg.shape[1]), int(out))
    return modules


def load_adapter_weights(directory: Path, modules: dict[str, tuple[int, int]],
                         expected_sha256: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module: (A [in, r], B [r, out])}`` of an exported adapter, checked against the graph's ``modules``."""
    from safetensors.numpy import load_file

    from toolkit.artifact.manifest import sha256_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{directory}: {ADAPTER_WEIGHTS} is missing; re-run `toolkit export-lora`")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise AdapterError(f"{path} does not match its recorded SHA-256 (corrupted); re-run `toolkit export-lora`")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"{path} is not a readable safetensors file ({exc}); re-run `toolkit export-lora`") from None
    weights = {}
    for key in sorted(k for k in tensors if k.endswith(".A")):
        module = key[:-2]
        a, b = tensors[key], tensors.get(module + ".B")
        if module not in modules:
            raise AdapterError(f"{path}: module {module!r} is not a LoRA input of this engine's graph")
        fan_in, fan_out = modules[module]
        if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != fan_in or b.shape[1] != fan_out or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"{path}: module {module!r} has A {getattr(a, 'shape', None)} and B {getattr(b, 'shape', None)}, "
                f"the engine needs A [{fan_in}, r] and B [r, {fan_out}]"
            )
        weights[module] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
    if not weights:
        raise AdapterError(f"{path} holds no LoRA weights")
    return weights
