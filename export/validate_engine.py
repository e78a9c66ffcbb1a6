"""``toolkit validate``: run an engine directory's artifact on the golden prompts and judge it."""

from __future__ import annotations

from pathlib import Path

from toolkit.export.golden import REFERENCE_NAME, Reference
from toolkit.export.manifest import EngineDirError, Manifest
from toolkit.export.validate import validate_runner


def make_runner(engine_dir: Path, manifest: Manifest):
    """A validation runner for the artifact's target (onnxruntime, or TensorRT-LLM on a GPU)."""
    if manifest.target == "onnx":
        from toolkit.export.ort_runner import OrtCausalLM

        return OrtCausalLM(engine_dir / "model.onnx")
    if manifest.target == "trtllm":
        from toolkit.export.trtllm_runner import TrtLlmRunner

        return TrtLlmRunner(engine_dir)
    raise EngineDirError(f"{engine_dir}: unknown target {manifest.target!r} in the manifest; re-export")


def load_reference(engine_dir: Path) -> Reference:
    """The stored fp32 reference outputs, or a clear error."""
    if not (engine_dir / REFERENCE_NAME).is_file():
        raise EngineDirError(f"{engine_dir} has no {REFERENCE_NAME}; re-run `toolkit export --force`")
    return Reference.load(engine_dir)


def validate_engine_dir(engine_dir: Path, manifest: Manifest) -> dict:
    """Validation verdict as stored in the manifest: metrics, bars, the PyTorch check, ``passed``."""
    reference = load_reference(engine_dir)
    graph = manifest.export_options.get("graph", "optimum")
    result = validate_runner(make_runner(engine_dir, manifest), reference, manifest.precision, graph).as_manifest()
    torch_check = reference.pytorch_check or {}
    result["pytorch_check"] = torch_check
    if not torch_check.get("passed", False):
        result["failures"].append(
            f"fp32 ONNX vs PyTorch: max-abs diff {torch_check.get('max_abs_diff')} "
            f"(atol {torch_check.get('atol')}), argmax agreement {torch_check.get('argmax_agreement')}"
        )
        result["passed"] = False
    return result
