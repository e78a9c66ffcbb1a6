"""What an engine directory contains: its file names, and the KV cache layout of an exported graph.

Export writes these files and runtime reads them; naming them once here keeps the two sides in
step. ``KvSpec`` describes the graph's ``past_key_values.N.key/value`` inputs and is recorded in the
manifest's ``kv_layout``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "toolkit.json"
"""The manifest (``toolkit.artifact.manifest``)."""
MODEL_FILE = "model.onnx"
"""The ONNX graph (both graph builders)."""
OPTIMUM_DATA_FILE = "model.onnx_data"
"""External weights of optimum-built graphs (``--graph optimum``)."""
GQA_DATA_FILE = "model.onnx.data"
"""External weights of onnxruntime-genai-built graphs (``--graph gqa``)."""
GENAI_CONFIG = "genai_config.json"
"""onnxruntime-genai's config beside a gqa graph (holds the head size the graph leaves symbolic)."""
TRTLLM_CONFIG = "config.json"
"""TensorRT-LLM's engine config (``build_config``, ``pretrained_config``) beside ``rank<N>.engine``."""
REFERENCE_NAME = "reference.json"
"""The fp32 reference outputs every artifact is validated against (``toolkit.export.golden``)."""

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class KvSpec:
    """Layout of the exported model's KV cache inputs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: type

    @property
    def past_names(self) -> list[str]:
        """The graph's cache inputs in layer order: ``past_key_values.N.key``, ``past_key_values.N.value``."""
        return [f"past_key_values.{layer}.{kind}" for layer in range(self.num_layers) for kind in ("key", "value")]

    def as_manifest(self, graph: str = "optimum") -> dict:
        """The manifest's ``kv_layout`` for an artifact of ``graph``."""
        layout = "[batch, kv_heads, seq, head_dim] per layer, past_key_values.N.key/value"
        if graph == "gqa":
            layout = "[batch, kv_heads, capacity, head_dim] per layer, updated in place (past and present share a buffer)"
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": np.dtype(self.dtype).name,
            "layout": layout,
        }


def kv_spec(session: Any, model_path: Path | None = None) -> KvSpec:
    """Read the KV cache layout from an onnxruntime session's ``past_key_values.N.key`` inputs.

    onnxruntime-genai's graphs name the head dimension symbolically; it is then read from the
    ``genai_config.json`` written beside ``model_path``.
    """
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if not past:
        raise ValueError("the ONNX model has no past_key_values inputs; export it with text-generation-with-past")
    first = past[0]
    head_dim = first.shape[3] if isinstance(first.shape[3], int) else _config_head_size(model_path)
    return KvSpec(len(past), int(first.shape[1]), int(head_dim), _ORT_TO_NUMPY[first.type])


def _config_head_size(model_path: Path | None) -> int:
    return int(json.loads((Path(model_path).parent / GENAI_CONFIG).read_text())["model"]["decoder"]["head_size"])


def head_size(model: Any, model_path: Path) -> int:
    """The attention head size of ``model`` (an ``onnx.ModelProto`` of ``model_path``), as ``kv_spec`` reads it
    from a session: the ``past_key_values.0.key`` input's last dimension, or ``genai_config.json``'s."""
    past = next((i for i in model.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")), None)
    dims = past.type.tensor_type.shape.dim if past is not None else []
    if len(dims) == 4 and dims[3].HasField("dim_value"):
        return int(dims[3].dim_value)
    return _config_head_size(model_path)


def cache_dir() -> Path:
    """Root of the toolkit's cache (``$TOOLKIT_CACHE`` or ``~/.cache/toolkit``): exported checkpoints and
    engines (``toolkit.export``) and built native kernels (``toolkit.runtime.native_head``)."""
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit")).expanduser()
