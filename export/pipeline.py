"""``toolkit export``: checkpoint → fp32 ONNX + reference outputs → artifact → validation → engine directory.

Everything is built in a staging directory beside the output and renamed into place at the end;
an existing directory built from the same inputs (same build key) that validated is reused. The
manifest is written once, after validation, with every artifact file hashed once.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from toolkit.artifact.manifest import (EngineDirError, Manifest, describe_files, load_manifest, publish,
                                       staging_dir, write_manifest)
from toolkit.export import sources
from toolkit.export.progress import StageReporter
from toolkit.recipes import Recipe


@dataclass
class ExportRequest:
    """One ``toolkit export`` invocation; ``ExportRequest.resolve`` fills what was not given from the recipe."""

    recipe: Recipe
    target: str
    precision: str
    out_dir: Path
    checkpoint: Path | None = None
    force: bool = False
    graph: str = "optimum"  # onnx only: "optimum" or "gqa" (toolkit.export.gqa_export)
    logprobs: bool = False  # trtllm only: serve logprobs (LLM(gather_generation_logits=True))
    lora: dict | None = None  # trtllm only: LoRA build options (trtllm_export.lora_build_options)

    @classmethod
    def resolve(
        cls,
        recipe: Recipe,
        target: str = "onnx",
        precision: str | None = None,
        graph: str | None = None,
        out_dir: Path | None = None,
        checkpoint: Path | None = None,
        force: bool = False,
        logprobs: bool = False,
        lora: dict | None = None,
    ) -> "ExportRequest":
        """A request with the recipe's default precision and graph for ``target`` and the default output dir."""
        precision = precision or recipe.default_precision_for(target)
        graph = graph or recipe.default_graph_for(target)
        out_dir = out_dir or sources.default_engine_dir(recipe, target, precision, graph)
        return cls(recipe, target, precision, out_dir, checkpoint, force, graph, logprobs, lora)


@dataclass
class ExportOutcome:
    """The engine directory, its manifest, and whether an earlier export was reused."""

    engine_dir: Path
    manifest: Manifest
    reused: bool


def resolve_checkpoint(request: ExportRequest, reporter: StageReporter) -> Path:
    """The checkpoint to export: the given path, or the embedded default model built into the cache."""
    if request.checkpoint is not None:
        if not request.checkpoint.is_dir():
            raise sources.SourceError(f"checkpoint {request.checkpoint} is not a directory")
        return request.checkpoint
    if not request.recipe.embedded:
        raise sources.SourceError(
            f"recipe {request.recipe.name!r} needs a checkpoint path: download {request.recipe.hf_id} "
            "and run `toolkit export PATH --recipe ...`"
        )
    checkpoint = sources.cache_dir() / "checkpoints" / request.recipe.name
    if not (checkpoint / "config.json").is_file():
        from toolkit.export.default_model import build_default_checkpoint

        with reporter.stage("Building the default model's checkpoint from its GGUF (once)"):
            build_default_checkpoint(checkpoint, on_stage=reporter.note)
    return checkpoint


def _reusable(out_dir: Path, key: str) -> Manifest | None:
    try:
        manifest = load_manifest(out_dir)
    except EngineDirError:
        return None
    validated = bool(manifest.validation and manifest.validation.get("passed"))
    return manifest if manifest.build_key == key and validated else None


def _copy_support_files(checkpoint: Path, stage: Path) -> list[str]:
    """Tokenizer and config files; never over a file the artifact wrote itself (TensorRT-LLM's config.json)."""
    copied = []
    for name in (*sources.TOKENIZER_FILES, *sources.CONFIG_FILES):
        if (checkpoint / name).is_file() and not (stage / name).exists():
            shutil.copy2(checkpoint / name, stage / name)
            copied.append(name)
    return copied


def _build_artifact(request: ExportRequest, checkpoint: Path, fp32_model: Path, stage: Path) -> dict:
    if request.target == "onnx" and request.graph == "gqa":
        from toolkit.export.gqa_export import build_gqa_model

        return build_gqa_model(checkpoint, request.precision, stage)
    if request.target == "onnx":
        from toolkit.export.onnx_export import CONVERTERS, INT8_ACCURACY_LEVEL, INT8_BLOCK_SIZE

        CONVERTERS[request.precision](fp32_model, stage)
        if request.precision == "int8":
            return {"method": "MatMulNBits", "bits": 8, "block_size": INT8_BLOCK_SIZE, "accuracy_level": INT8_ACCURACY_LEVEL}
        return {"method": request.precision}
    from toolkit.export.trtllm_export import build_trtllm_engine

    return build_trtllm_engine(checkpoint, request.recipe, request.precision, stage, logprobs=request.logprobs,
                               lora=request.lora)


def _build(request: ExportRequest, checkpoint: Path, source_sha: str, key: str, config: dict, reporter: StageReporter) -> Manifest:
    from toolkit.export.golden import build_golden_reference
    from toolkit.export.onnx_export import export_fp32
    from toolkit.export.ort_runner import OrtCausalLM
    from toolkit.export.pytorch_check import compare_with_pytorch
    from toolkit.export.validate import validate_engine_dir

    started = time.perf_counter()
    context_length = min(request.recipe.context_window, int(config.get("max_position_embeddings") or 1 << 30))
    stage = staging_dir(request.out_dir)
    try:
        work = stage / "_fp32"
        with reporter.stage("Exporting fp32 ONNX with optimum (text-generation-with-past)"):
            fp32_model = export_fp32(checkpoint, work)
        with reporter.stage("Running the golden prompts through fp32 onnxruntime (reference outputs)"):
            from transformers import AutoTokenizer

            runner = OrtCausalLM(fp32_model)
            tokenizer = AutoTokenizer.from_pretrained(checkpoint, fix_mistral_regex=False)
            reference = build_golden_reference(runner, tokenizer, request.recipe.chat_format, config, context_length)
        with reporter.stage("Comparing fp32 ONNX with the PyTorch model"):
            reference.pytorch_check = compare_with_pytorch(checkpoint, runner, reference)
            spec = runner.spec
            del runner
        graph = f" ({request.graph} graph)" if request.target == "onnx" else ""
        with reporter.stage(f"Building the {request.target} {request.precision} artifact{graph}"):
            options = _build_artifact(request, checkpoint, fp32_model, stage)
            shutil.rmtree(work)
        copied = _copy_support_files(checkpoint, stage)
        reference.save(stage)
        manifest = Manifest(
            recipe=request.recipe.name,
            source={"path": str(checkpoint.resolve()), "sha256": source_sha},
            architecture=config["model_type"],
            target=request.target,
            precision=request.precision,
            context_length=context_length,
            kv_layout=spec.as_manifest(options.get("graph", "optimum")),
            build_key=key,
            tokenizer_files=[n for n in copied if n in sources.TOKENIZER_FILES],
            tools=sources.tool_versions(),
            export_options=options,
        )
        with reporter.stage("Validating the artifact against the fp32 reference"):
            manifest.validation = validate_engine_dir(stage, manifest)  # reads the files, not the manifest
        manifest.files = describe_files(stage)  # every artifact file hashed once
        manifest.export_seconds = round(time.perf_counter() - started, 1)
        write_manifest(stage, manifest)  # written once, verdict included
        publish(stage, request.out_dir)
        return manifest
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def run_export(request: ExportRequest, reporter: StageReporter) -> ExportOutcome:
    """Export (or reuse) the engine directory described by ``request``."""
    from toolkit.export.progress import quiet_libraries

    quiet_libraries()
    recipe = request.recipe
    recipe.check_supports(request.target, request.precision)  # TargetNotSupportedError
    if request.target == "onnx" and request.graph == "gqa":
        from toolkit.export.gqa_export import check_precision

        check_precision(request.precision)  # before minutes of ONNX work
    if request.target == "trtllm":
        from toolkit.artifact.trtllm import import_tensorrt_llm

        import_tensorrt_llm()  # fail before minutes of ONNX work when TensorRT-LLM is missing
    checkpoint = resolve_checkpoint(request, reporter)
    config = sources.read_model_type(checkpoint, recipe)
    with reporter.stage("Hashing the checkpoint"):
        source_sha = sources.hash_checkpoint(checkpoint)
    key = sources.build_key(source_sha, recipe, request.target, request.precision, request.graph)
    if request.logprobs:
        key += "+logprobs"  # a TensorRT-LLM engine served with logprobs is another build
    if request.lora:
        key += "+lora-r{max_lora_rank}-{mods}-{max_loras}".format(mods=".".join(request.lora["target_modules"]), **request.lora)
    if not request.force and (manifest := _reusable(request.out_dir, key)) is not None:
        reporter.note(f"reusing {request.out_dir}: built from the same inputs and validated (--force to rebuild)")
        return ExportOutcome(request.out_dir, manifest, reused=True)
    manifest = _build(request, checkpoint, source_sha, key, config, reporter)
    return ExportOutcome(request.out_dir, manifest, reused=False)


def ensure_default_engine(reporter: StageReporter, precision: str | None = None, graph: str | None = None) -> Path:
    """The embedded default model's engine directory, exported (and validated) on first use."""
    from toolkit.recipes import get_recipe

    request = ExportRequest.resolve(get_recipe("default"), "onnx", precision, graph)
    outcome = run_export(request, reporter)
    if not (outcome.manifest.validation or {}).get("passed"):
        out_dir = request.out_dir
        raise EngineDirError(f"the default engine at {out_dir} failed validation; run `toolkit validate {out_dir}`")
    return request.out_dir
