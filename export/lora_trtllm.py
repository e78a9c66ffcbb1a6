"""export-lora onto a TensorRT-LLM engine: the checks, the copy and the ``LoRARequest`` validation.

A TensorRT-LLM engine exported with ``--lora-rank`` loads Hugging Face PEFT directories itself, per
request (``LoRARequest``), so there is no graph surgery or conversion: the adapter is checked against the
engine's LoRA build (``check_trtllm_lora``: rank <= ``max_lora_rank``, targets among its modules), its PEFT
files are copied unchanged, and the engine is validated through TensorRT-LLM with the adapter on every
request (``trtllm_adapter_runner``; needs a GPU). Kept apart from ``export/lora.py`` because it is the
only part of export-lora that talks to TensorRT-LLM.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from toolkit.artifact.lora import ADAPTERS_DIR, PEFT_CONFIG, PEFT_WEIGHTS, AdapterError, AdapterInfo
from toolkit.artifact.manifest import Manifest, sha256_file
from toolkit.export.lora_peft import PeftAdapter, check_layers, publish_stage
from toolkit.export.lora_validate import peft_reference


class _LoraLLM:
    """TensorRT-LLM's ``LLM`` whose every ``generate`` call carries one adapter's ``LoRARequest``."""

    def __init__(self, llm, request):
        self._llm, self._request = llm, request

    def generate(self, inputs, *args, **kwargs):
        batched = bool(inputs) and isinstance(inputs[0], list)
        kwargs["lora_request"] = [self._request] * len(inputs) if batched else self._request
        return self._llm.generate(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._llm, name)


def trtllm_adapter_runner(engine_dir: Path, options: dict, name: str, adapter_dir: Path):
    """A validation runner (``TrtLlmRunner``) over a TensorRT-LLM LoRA engine with ``adapter_dir`` on every request."""
    import importlib

    from toolkit.export.trtllm_export import trtllm_lora_config
    from toolkit.export.trtllm_runner import TrtLlmRunner

    class _Runner(TrtLlmRunner):
        def llm_kwargs(self):
            return {**super().llm_kwargs(), "enable_lora": True, "lora_config": trtllm_lora_config(options["lora"])}

    runner = _Runner(engine_dir, options)
    request_cls = importlib.import_module("tensorrt_llm.executor").LoRARequest
    runner.llm = _LoraLLM(runner.llm, request_cls(lora_name=name, lora_int_id=1, lora_path=str(Path(adapter_dir).resolve())))
    return runner


def check_trtllm_lora(adapter: PeftAdapter, engine_dir: Path, manifest: Manifest) -> dict:
    """The engine's LoRA build options, if ``adapter`` fits them; ``AdapterError`` otherwise."""
    lora = (manifest.export_options or {}).get("lora")
    if not lora:
        raise AdapterError(f"{engine_dir} is a TensorRT-LLM engine built without LoRA; re-export it with "
                           "`toolkit export --target trtllm --lora-rank R [--lora-target-modules ...]`")
    if adapter.max_rank > int(lora["max_lora_rank"]):
        raise AdapterError(f"adapter {adapter.path} has rank {adapter.max_rank}, above the engine's max LoRA rank "
                           f"{lora['max_lora_rank']} (re-export the engine with a larger --lora-rank)")
    targets = sorted({m.rsplit(".", 1)[1] for m in adapter.weights})
    missing = [t for t in targets if t not in lora["target_modules"]]
    if missing:
        raise AdapterError(f"adapter {adapter.path} targets {', '.join(missing)}, which the engine was not built "
                           f"for (its LoRA modules: {', '.join(lora['target_modules'])})")
    return lora



def publish_trtllm_adapter(adapter: PeftAdapter, engine_dir: Path, manifest: Manifest, name: str,
                           out: Path | None, checkpoint: Path, reporter) -> tuple[AdapterInfo, Path]:
    """Check, copy, validate (``LoRARequest``) and publish ``adapter`` for a TensorRT-LLM engine.

    Returns (its ``AdapterInfo``, its directory); the caller records it in the engine's manifest."""
    from toolkit.export.golden import Reference
    from toolkit.export.validate import load_reference, validate_runner

    check_trtllm_lora(adapter, engine_dir, manifest)
    check_layers(adapter, checkpoint)
    target = Path(out) if out is not None else engine_dir / ADAPTERS_DIR / name
    stage = target.parent / f".{target.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        for file in (PEFT_CONFIG, PEFT_WEIGHTS):  # TensorRT-LLM reads the PEFT directory itself
            shutil.copyfile(adapter.path / file, stage / file)
        with reporter.stage("Running the golden prompts through PyTorch fp32 + PEFT (the adapter's reference)"):
            try:
                reference = peft_reference(checkpoint, stage, load_reference(engine_dir))
            except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches from PEFT / torch
                raise AdapterError(f"adapter {adapter.path} does not load onto the base checkpoint ({exc}): "
                                   "wrong base model or wrong shapes") from None
            reference.save(stage)
        with reporter.stage(f"Validating the TensorRT-LLM {manifest.precision} engine with the adapter (LoRARequest)"):
            runner = trtllm_adapter_runner(engine_dir, manifest.export_options, name, stage)
            try:
                result = validate_runner(runner, Reference.load(stage), manifest.precision, "trtllm").as_manifest()
            finally:
                runner.close()
        info = AdapterInfo(
            name=name, rank=adapter.max_rank, lora_alpha=float(adapter.config.get("lora_alpha") or 0),
            use_rslora=bool(adapter.config.get("use_rslora")),
            target_modules=sorted({m.rsplit(".", 1)[1] for m in adapter.weights}),
            modules={m: int(a.shape[0]) for m, (a, _) in adapter.weights.items()},
            base_model=str(adapter.config.get("base_model_name_or_path") or ""),
            base_sha256=manifest.source.get("sha256", ""), architecture=manifest.architecture,
            weights_sha256=sha256_file(stage / PEFT_WEIGHTS),
            source={"path": str(adapter.path.resolve()), "files_sha256": adapter.files_sha256, "format": "hf-peft"},
            validation=result,
        )
        publish_stage(stage, target, info, engine_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return info, target
