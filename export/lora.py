"""``toolkit export-lora``: a PEFT LoRA adapter → the engine's adapter format, validated, listed in the manifest.

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

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.artifact.layout import MODEL_FILE
from toolkit.artifact.lora import (ADAPTER_WEIGHTS, ADAPTERS_DIR, LORA_MODEL_FILE, MAX_RANK, PACKED, PEFT_CONFIG,
                                   PEFT_WEIGHTS, PROJECTIONS, AdapterError, AdapterInfo, a_input, b_input,
                                   check_name)
from toolkit.artifact.manifest import (EngineDirError, Manifest, describe_files, load_manifest, sha256_file,
                                       write_manifest)

_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
_GRAPH_NODE = re.compile(r"/model/layers\.(\d+)/(?:self_attn|attn|mlp)/(\w+_proj)/MatMul(?:_Q\d+)?$")


# ---- 1. the PEFT adapter ------------------------------------------------------------------------
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


# ---- 2. the LoRA graph ----------------------------------------------------------------------------
def add_lora_inputs(model_path: Path, out_path: Path) -> dict[str, tuple[int, int]]:
    """Write ``out_path``: ``model_path`` with a per-row low-rank path on every decoder projection.

    ``y = x @ W`` (MatMul or MatMulNBits) becomes ``y + (x @ lora_A.m) @ lora_B.m``. The graph keeps
    pointing at the original external weights file (same directory). Returns ``{module: (in, out)}``.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    dims = {init.name: list(init.dims) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    targets = []
    for index, node in enumerate(graph.node):
        match = _GRAPH_NODE.search(node.name)
        if match is None or node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        if node.op_type == "MatMul":
            weight = dims.get(node.input[1])
            if weight is None or len(weight) != 2:
                continue
            fan_in, fan_out = weight
        else:
            attrs = {a.name: a.i for a in node.attribute}
            fan_in, fan_out = attrs["K"], attrs["N"]
        targets.append((index, node, f"layers.{match.group(1)}.{match.group(2)}", int(fan_in), int(fan_out)))
    if not targets:
        raise AdapterError(f"{model_path}: found no decoder projection MatMul to attach LoRA to")
    modules = {}
    for index, node, module, fan_in, fan_out in reversed(targets):
        y = node.output[0]
        low, delta, summed = f"{y}/lora_low", f"{y}/lora_delta", f"{y}/lora"
        for user in consumers.get(y, []):
            user.input[:] = [summed if name == y else name for name in user.input]
        new = [
            helper.make_node("MatMul", [node.input[0], a_input(module)], [low], name=f"{node.name}/lora_A"),
            helper.make_node("MatMul", [low, b_input(module)], [delta], name=f"{node.name}/lora_B"),
            helper.make_node("Add", [y, delta], [summed], name=f"{node.name}/lora_add"),
        ]
        for offset, extra in enumerate(new):
            graph.node.insert(index + 1 + offset, extra)
        rank = f"lora_rank_{module}"
        graph.input.append(helper.make_tensor_value_info(a_input(module), TensorProto.FLOAT, ["lora_rows", fan_in, rank]))
        graph.input.append(helper.make_tensor_value_info(b_input(module), TensorProto.FLOAT, ["lora_rows", rank, fan_out]))
        modules[module] = (fan_in, fan_out)
    onnx.save_model(model, str(out_path))
    return dict(sorted(modules.items()))


# ---- 3. conversion -------------------------------------------------------------------------------
def convert(adapter: PeftAdapter, modules: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The engine-format tensors ``{module.A: [in, r], module.B: [r, out]}`` for the graph's ``modules``."""
    tensors: dict[str, np.ndarray] = {}
    packed_of = {f"{m.rsplit('.', 1)[0]}.{part}": (m, i) for m in modules for i, part in
                 enumerate(PACKED.get(m.rsplit(".", 1)[1], ()))}
    grouped: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for module, (a, b) in adapter.weights.items():
        if module in modules:
            fan_in, fan_out = modules[module]
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise AdapterError(
                    f"adapter {adapter.path}: {module} maps {a.shape[1]} -> {b.shape[0]} features, this engine's "
                    f"{module} maps {fan_in} -> {fan_out}: wrong base model or wrong shapes"
                )
            tensors[f"{module}.A"] = np.ascontiguousarray(a.T)
            tensors[f"{module}.B"] = np.ascontiguousarray(b.T)
        elif module in packed_of:
            target, part = packed_of[module]
            grouped.setdefault(target, {})[part] = (a, b)
        else:
            raise AdapterError(f"adapter {adapter.path}: {module} has no matching projection in this engine's graph "
                               "(wrong base model: more layers or other projections)")
    for target, parts in grouped.items():
        tensors.update(_pack(adapter, target, parts, modules[target]))
    return tensors


def _pack(adapter: PeftAdapter, target: str, parts: dict, dims: tuple[int, int]) -> dict[str, np.ndarray]:
    """q/k/v (or gate/up) adapters of one packed projection: A stacked along the rank, B block-diagonal."""
    fan_in, fan_out = dims
    names = PACKED[target.rsplit(".", 1)[1]]
    outs = {i: b.shape[0] for i, (_, b) in parts.items()}
    if len(outs) < len(names):  # sizes of untargeted parts: the packed width minus the known ones, split evenly
        missing = [i for i in range(len(names)) if i not in outs]
        rest = fan_out - sum(outs.values())
        for i in missing:
            outs[i] = rest // len(missing)
    if sum(outs.values()) != fan_out or any(a.shape[1] != fan_in for a, _ in parts.values()):
        raise AdapterError(f"adapter {adapter.path}: {', '.join(names)} do not fit this engine's packed {target} "
                           f"({fan_in} -> {fan_out}): wrong base model or wrong shapes")
    rank = sum(a.shape[0] for a, _ in parts.values())
    a_all = np.zeros((fan_in, rank), np.float32)
    b_all = np.zeros((rank, fan_out), np.float32)
    r0, col = 0, 0
    for i in range(len(names)):
        if i in parts:
            a, b = parts[i]
            a_all[:, r0:r0 + a.shape[0]] = a.T
            b_all[r0:r0 + a.shape[0], col:col + outs[i]] = b.T
            r0 += a.shape[0]
        col += outs[i]
    return {f"{target}.A": a_all, f"{target}.B": b_all}


# ---- 4. the adapter's reference: PyTorch fp32 + PEFT -----------------------------------------------
def peft_reference(checkpoint: Path, adapter_dir: Path, base_reference):
    """The golden prompts of ``base_reference`` through PyTorch fp32 + PEFT: greedy tokens and first-step top-k."""
    import torch
    from peft import PeftModel

    from toolkit.export.golden import GoldenCase, Reference, top_k_of
    from toolkit.export.pytorch_check import load_pytorch_model

    model = PeftModel.from_pretrained(load_pytorch_model(checkpoint), str(adapter_dir)).eval()
    cases = []
    with torch.inference_mode():
        for base_case in base_reference.cases:
            out = model(input_ids=torch.tensor([base_case.prompt_ids]), use_cache=True)
            first = out.logits[0, -1].float().numpy()
            tokens = [int(first.argmax())]
            past = out.past_key_values
            while len(tokens) < base_reference.max_new_tokens:
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tokens.append(int(out.logits[0, -1].argmax()))
            ids, logits = top_k_of(first, base_reference.top_k)
            cases.append(GoldenCase(messages=base_case.messages, prompt_ids=list(base_case.prompt_ids),
                                    greedy_ids=tokens, first_topk_ids=ids, first_topk_logits=logits))
    return Reference(chat_format=base_reference.chat_format, max_new_tokens=base_reference.max_new_tokens,
                     top_k=base_reference.top_k, cases=cases, produced_by="pytorch fp32 + peft")


# ---- 5. validation --------------------------------------------------------------------------------
class _AdapterFeeds:
    """An onnxruntime session whose every run also gets one adapter's batch-1 LoRA inputs."""

    def __init__(self, session, feeds: dict[str, np.ndarray]):
        self._session, self._feeds = session, feeds

    def run(self, names, feeds):
        return self._session.run(names, {**feeds, **self._feeds})

    def __getattr__(self, name):
        return getattr(self._session, name)


def batch1_feeds(modules: dict[str, tuple[int, int]], tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LoRA inputs for one row with this adapter (rank 0 for modules it does not target)."""
    feeds = {}
    for module, (fan_in, fan_out) in modules.items():
        a = tensors.get(f"{module}.A", np.zeros((fan_in, 0), np.float32))
        b = tensors.get(f"{module}.B", np.zeros((0, fan_out), np.float32))
        feeds[a_input(module)], feeds[b_input(module)] = a[None], b[None]
    return feeds


def adapter_runner(engine_dir: Path, modules: dict, tensors: dict[str, np.ndarray]):
    """A validation runner (``OrtCausalLM``) over the engine's LoRA graph with the adapter applied."""
    from toolkit.export.ort_runner import OrtCausalLM

    runner = OrtCausalLM(engine_dir / LORA_MODEL_FILE)
    runner.session = _AdapterFeeds(runner.session, batch1_feeds(modules, tensors))
    runner.input_names -= set(batch1_feeds(modules, {}))
    return runner


# ---- 6. the whole command --------------------------------------------------------------------------
@dataclass
class LoraExportOutcome:
    name: str
    adapter_dir: Path
    info: AdapterInfo


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


def _check_layers(adapter: PeftAdapter, checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    layers = int(config.get("num_hidden_layers") or 0)
    deepest = max(int(m.split(".")[1]) for m in adapter.weights)
    if layers and deepest >= layers:
        raise AdapterError(f"adapter {adapter.path} has LoRA weights for layer {deepest}, the base model has {layers} "
                           "layers: wrong base model")


def _export_trtllm(adapter: PeftAdapter, engine_dir: Path, manifest: Manifest, name: str, out: Path | None,
                   checkpoint: Path, reporter) -> "LoraExportOutcome":
    from toolkit.export.golden import Reference
    from toolkit.export.validate import load_reference, validate_runner

    check_trtllm_lora(adapter, engine_dir, manifest)
    _check_layers(adapter, checkpoint)
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
        info.save(stage)
        if not result["passed"]:
            raise AdapterError(f"adapter {name!r} failed validation on {engine_dir}: {'; '.join(result['failures'])}")
        if target.exists():
            shutil.rmtree(target)
        stage.replace(target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _record(engine_dir, manifest, info, target)
    return LoraExportOutcome(name, target, info)


def ensure_lora_graph(engine_dir: Path, manifest: Manifest) -> dict[str, tuple[int, int]]:
    """The engine's LoRA graph (built on first use); ``{module: (in, out)}``."""
    if manifest.target != "onnx":
        raise AdapterError(f"{engine_dir} is a {manifest.target} engine; it has no ONNX LoRA graph")
    if manifest.precision not in ("fp32", "int8"):
        raise AdapterError(f"{engine_dir} is {manifest.precision}; LoRA adapters need an fp32 or int8 engine "
                           "(their low-rank path runs in fp32)")
    path = engine_dir / LORA_MODEL_FILE
    if path.is_file() and LORA_MODEL_FILE in manifest.files:
        from toolkit.artifact.lora import graph_modules
        from toolkit.artifact.onnx_session import create_session

        return graph_modules(create_session(path, threads=1))
    tmp = engine_dir / (LORA_MODEL_FILE + ".tmp")
    modules = add_lora_inputs(engine_dir / MODEL_FILE, tmp)
    tmp.replace(path)
    return modules


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
        return _export_trtllm(adapter, engine_dir, manifest, name, out, checkpoint, reporter)
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
        info.save(stage)
        if not result["passed"]:
            raise AdapterError(f"adapter {name!r} failed validation on {engine_dir}: {'; '.join(result['failures'])}")
        if target.exists():
            shutil.rmtree(target)
        stage.replace(target)
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
