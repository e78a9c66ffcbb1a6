"""``toolkit export-lora``: a PEFT LoRA adapter → the engine's adapter format, validated, listed in the manifest.

This module is the command: it runs the steps below in order, publishes the adapter directory and records
it in the manifest. The steps live beside it: reading/checking the PEFT directory in ``lora_peft.py``, the
ONNX LoRA graph and the conversion in ``lora_graph.py``, the PyTorch + PEFT reference and the ONNX
validation runner in ``lora_validate.py``, the TensorRT-LLM branch in ``lora_trtllm.py``.

Steps (each refuses with a message naming the problem):
1. read the PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``): LoRA only (no
   DoRA, no bias, no ``modules_to_save``), targets among q/k/v/o/gate/up/down, rank <= 64;
2. give the engine directory its LoRA graph once (``add_lora_inputs``: ``model.lora.onnx``);
3. convert: per graph module ``A = lora_A.T``, ``B = lora_B.T * scale`` (``lora_alpha / r``, or
   ``/ sqrt(r)`` with rslora), q/k/v stacked for a packed ``qkv_proj``; shapes checked against the graph;
4. the adapter's golden reference: PyTorch fp32 + PEFT on the engine's golden prompts (32 greedy
   tokens, first-step top-64 logits), stored as the adapter's ``reference.json``;
5. the engine + adapter validated against it with the base export's bars for its precision;
6. the adapter directory published (``adapters/<name>`` or ``--out``) and the manifest updated.

A TensorRT-LLM engine (exported with ``--lora-rank``) loads Hugging Face PEFT directories itself, per
request (``LoRARequest``): steps 2-3 become checks against the engine's LoRA build (rank <= its
``max_lora_rank``, targets among its modules) and the PEFT files are copied unchanged into the adapter
directory beside ``adapter.json`` and ``reference.json``; step 5 runs the engine through TensorRT-LLM with
the adapter as a ``LoRARequest`` (``trtllm_adapter_runner``; needs a GPU, ``TrtLlmUnavailableError``
without TensorRT-LLM) with the bars of the engine's precision.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from toolkit.artifact.lora import ADAPTER_WEIGHTS, ADAPTERS_DIR, AdapterError, AdapterInfo, check_name
from toolkit.artifact.manifest import (EngineDirError, Manifest, describe_files, load_manifest, sha256_file,
                                       write_manifest)
from toolkit.export.lora_graph import convert, ensure_lora_graph
from toolkit.export.lora_peft import check_base_model, publish_stage, read_peft_adapter
from toolkit.export.lora_trtllm import publish_trtllm_adapter
from toolkit.export.lora_validate import adapter_runner, peft_reference


@dataclass
class LoraExportOutcome:
    name: str
    adapter_dir: Path
    info: AdapterInfo


def export_lora(peft_dir: Path, engine_dir: Path, name: str, out: Path | None = None,
                checkpoint: Path | None = None, reporter=None) -> LoraExportOutcome:
    """Convert, validate and publish one adapter for ``engine_dir`` (see the module docstring)."""
    from toolkit.export import sources
    from toolkit.export.golden import Reference
    from toolkit.export.progress import StageReporter
    from toolkit.export.validate import load_reference, validate_runner
    from toolkit.recipes import get_recipe

    reporter = reporter or StageReporter(quiet=True)
    check_name(name)
    engine_dir = Path(engine_dir)
    manifest = load_manifest(engine_dir)
    recipe = get_recipe(manifest.recipe)
    with reporter.stage("Reading the PEFT adapter"):
        adapter = read_peft_adapter(Path(peft_dir))
        check_base_model(adapter, manifest, (recipe.hf_id, *recipe.model_names))
    checkpoint = Path(checkpoint or manifest.source.get("path", ""))
    if not (checkpoint / "config.json").is_file():
        raise AdapterError(f"the base checkpoint {checkpoint} is needed for the adapter's PyTorch reference; pass --checkpoint")
    with reporter.stage("Checking the base checkpoint against the engine"):
        if sources.hash_checkpoint(checkpoint) != manifest.source.get("sha256"):
            raise AdapterError(f"checkpoint {checkpoint} is not the one {engine_dir} was built from (SHA-256 differs)")
    if manifest.target == "trtllm":
        info, target = publish_trtllm_adapter(adapter, engine_dir, manifest, name, out, checkpoint, reporter)
        _record(engine_dir, manifest, info, target)
        return LoraExportOutcome(name, target, info)
    with reporter.stage("Adding the LoRA inputs to the engine graph"):
        modules = ensure_lora_graph(engine_dir, manifest)
    tensors = convert(adapter, modules)
    target = Path(out) if out is not None else engine_dir / ADAPTERS_DIR / name
    stage = target.parent / f".{target.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        from safetensors.numpy import save_file

        save_file(tensors, str(stage / ADAPTER_WEIGHTS))
        with reporter.stage("Running the golden prompts through PyTorch fp32 + PEFT (the adapter's reference)"):
            reference = peft_reference(checkpoint, adapter.path, load_reference(engine_dir))
            reference.save(stage)
        with reporter.stage(f"Validating the {manifest.precision} engine with the adapter"):
            graph = manifest.export_options.get("graph", "optimum")
            runner = adapter_runner(engine_dir, modules, tensors)
            result = validate_runner(runner, Reference.load(stage), manifest.precision, graph).as_manifest()
        info = AdapterInfo(
            name=name,
            rank=adapter.max_rank,
            lora_alpha=float(adapter.config.get("lora_alpha") or 0),
            use_rslora=bool(adapter.config.get("use_rslora")),
            target_modules=sorted({m.rsplit(".", 1)[1] for m in adapter.weights}),
            modules={k[:-2]: int(v.shape[1]) for k, v in tensors.items() if k.endswith(".A")},
            base_model=str(adapter.config.get("base_model_name_or_path") or ""),
            base_sha256=manifest.source.get("sha256", ""),
            architecture=manifest.architecture,
            weights_sha256=sha256_file(stage / ADAPTER_WEIGHTS),
            source={"path": str(adapter.path.resolve()), "files_sha256": adapter.files_sha256},
            validation=result,
        )
        publish_stage(stage, target, info, engine_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _record(engine_dir, manifest, info, target)
    return LoraExportOutcome(name, target, info)


def _record(engine_dir: Path, manifest: Manifest, info: AdapterInfo, adapter_dir: Path) -> None:
    """Hash the LoRA graph (and the adapter, when inside the engine) into the manifest and list the adapter."""
    inside = adapter_dir.resolve().is_relative_to(engine_dir.resolve())
    if inside:
        manifest.adapters[info.name] = {
            "path": adapter_dir.resolve().relative_to(engine_dir.resolve()).as_posix(),
            "rank": info.rank,
            "target_modules": info.target_modules,
            "weights_sha256": info.weights_sha256,
            "validation": {k: info.validation[k] for k in ("passed", "precision", "greedy_agreement", "top1_agreement",
                                                          "min_cosine", "max_abs_diff", "failures")},
        }
    manifest.files = describe_files(engine_dir)
    write_manifest(engine_dir, manifest)


def engine_adapters(engine_dir: Path) -> dict[str, dict]:
    """The adapters listed in an engine directory's manifest."""
    try:
        return dict(load_manifest(engine_dir, verify_hashes=False).adapters)
    except EngineDirError:
        return {}
