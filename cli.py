"""The ``toolkit`` command line (Click). Subcommands import their heavy dependencies only when run."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from toolkit import __version__
from toolkit.recipes.registry import GRAPHS, PRECISIONS, TARGETS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="toolkit")
def main() -> None:
    """Export Hugging Face causal LMs to ONNX / TensorRT-LLM engines, validate and serve them."""


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--recipe", "recipe_name", default="default", show_default=True, help="Recipe name, HF id or alias.")
@click.option("--target", type=click.Choice(TARGETS), default="onnx", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="Default: the recipe's (int8).")
@click.option(
    "--graph",
    type=click.Choice(GRAPHS),
    default=None,
    help="ONNX graph: optimum's export, or GroupQueryAttention over a shared KV buffer (onnxruntime-genai's builder; fp32/int8). Default: the recipe's.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Engine directory to write.")
@click.option("--force", is_flag=True, help="Rebuild even if a validated export of the same inputs exists.")
@click.option("--logprobs", is_flag=True,
              help="trtllm only: serve logprobs/top_logprobs (gathers generation logits; slower). Recorded in the manifest.")
@click.option("--lora-rank", type=click.IntRange(1, 64), default=None,
              help="trtllm only: build the LoRA plugin in, for adapters up to this rank (serve them with export-lora + --lora).")
@click.option("--lora-target-modules", default=None, metavar="PROJ,...",
              help="trtllm only, with --lora-rank: projections adapters may target (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; default all).")
@click.option("--lora-max-loras", type=click.IntRange(min=1), default=None,
              help="trtllm only, with --lora-rank: adapters resident on the GPU at once (default 8).")
def export(
    checkpoint: Path | None, recipe_name: str, target: str, precision: str | None, graph: str | None, out_dir: Path | None,
    force: bool, logprobs: bool, lora_rank: int | None, lora_target_modules: str | None, lora_max_loras: int | None,
) -> None:
    """Export CHECKPOINT (a Hugging Face causal-LM directory) to a validated engine directory.

    Without CHECKPOINT, the embedded default model is exported (recipe `default`).
    """
    from rich.console import Console

    from toolkit.export.pipeline import ExportRequest, run_export
    from toolkit.export.progress import StageReporter
    from toolkit.export.report import print_export_summary
    from toolkit.recipes import get_recipe

    console = Console(stderr=True)
    try:
        recipe = get_recipe(recipe_name)
        if logprobs and target != "trtllm":
            raise click.UsageError("--logprobs is a TensorRT-LLM export option (--target trtllm); ONNX engines always serve logprobs")
        lora = _trtllm_lora_options(target, lora_rank, lora_target_modules, lora_max_loras)
        request = ExportRequest.resolve(recipe, target, precision, graph, out_dir, checkpoint, force, logprobs, lora)
        outcome = run_export(request, StageReporter(console))
    except _export_errors() as exc:
        raise click.ClickException(str(exc)) from None
    print_export_summary(console, outcome.engine_dir, outcome.manifest, outcome.reused)
    if not (outcome.manifest.validation or {}).get("passed"):
        sys.exit(1)


def _trtllm_lora_options(target: str, rank: int | None, modules: str | None, max_loras: int | None) -> dict | None:
    """``--lora-rank`` & co. as the TensorRT-LLM build plan's ``lora`` entry (ONNX engines get LoRA from export-lora)."""
    if rank is None:
        if modules or max_loras:
            raise click.UsageError("--lora-target-modules and --lora-max-loras need --lora-rank")
        return None
    if target != "trtllm":
        raise click.UsageError("--lora-rank is a TensorRT-LLM export option (--target trtllm); ONNX engines get their "
                               "LoRA graph from `toolkit export-lora`")
    from toolkit.export.trtllm_export import lora_build_options

    try:
        targets = tuple(m.strip() for m in modules.split(",") if m.strip()) if modules else None
        return lora_build_options(rank, targets, max_loras)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command("export-lora")
@click.argument("adapter", type=click.Path(file_okay=False, path_type=Path))
@click.option("--engine", "engine_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The engine directory the adapter is for: ONNX fp32/int8, or TensorRT-LLM exported with --lora-rank.")
@click.option("--name", required=True, help="The adapter's name in requests (`lora`, `model`: NAME or BASE:NAME).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Write the adapter here instead of ENGINE/adapters/NAME (serve it with --lora NAME=OUT).")
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path), help="The base checkpoint (default: the one the engine was exported from).")
def export_lora_cmd(adapter: Path, engine_dir: Path, name: str, out_dir: Path | None, checkpoint: Path | None) -> None:
    """Convert and validate the PEFT LoRA ADAPTER (adapter_config.json + adapter_model.safetensors) for an engine."""
    from rich.console import Console

    from toolkit.artifact.lora import AdapterError
    from toolkit.export.lora import export_lora
    from toolkit.export.progress import StageReporter

    console = Console(stderr=True)
    try:
        outcome = export_lora(adapter, engine_dir, name, out_dir, checkpoint, StageReporter(console))
    except (AdapterError, *_export_errors()) as exc:
        raise click.ClickException(str(exc)) from None
    result = outcome.info.validation
    console.print(f"adapter {name!r} (rank {outcome.info.rank}, {', '.join(outcome.info.target_modules)}) → "
                  f"{outcome.adapter_dir}: validation passed, greedy agreement {result['greedy_agreement']:.3f}, "
                  f"top-1 {result['top1_agreement']:.3f}, max-abs diff {result['max_abs_diff']:.3g}")


def _export_errors() -> tuple[type[Exception], ...]:
    """What an export reports as a one-line message (bad recipe, target, checkpoint, tooling)."""
    from toolkit.artifact.manifest import EngineDirError
    from toolkit.artifact.trtllm import TrtLlmUnavailableError
    from toolkit.export.gqa_export import GraphBuildError
    from toolkit.export.sources import SourceError
    from toolkit.recipes import TargetNotSupportedError, UnknownRecipeError

    return (UnknownRecipeError, TargetNotSupportedError, SourceError, EngineDirError, TrtLlmUnavailableError, GraphBuildError)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the validation result as JSON on stdout.")
def validate(engine_dir: Path, as_json: bool) -> None:
    """Compare ENGINE_DIR with its stored fp32 onnxruntime reference outputs (exit 1 on failure)."""
    from toolkit.artifact.manifest import EngineDirError, load_manifest, update_validation
    from toolkit.artifact.trtllm import TrtLlmUnavailableError
    from toolkit.export.report import print_validation
    from toolkit.export.validate import validate_engine_dir

    console = _console()
    try:
        manifest = load_manifest(engine_dir)
        result = validate_engine_dir(engine_dir, manifest)
    except (EngineDirError, TrtLlmUnavailableError) as exc:
        if as_json:
            _print_json({"engine_dir": str(engine_dir), "passed": False, "error": str(exc)})
        else:
            console.print(f"[bold red]FAILED[/bold red]: {exc}")
        sys.exit(1)
    update_validation(engine_dir, result)
    if as_json:
        _print_json({"engine_dir": str(engine_dir), **result})
    else:
        print_validation(console, result)
    sys.exit(0 if result["passed"] else 1)


def _console():
    """A rich console; piped into another program (not a TTY) it never cuts lines to 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True)


def _print_json(data) -> None:
    """Machine-readable output: one JSON document on stdout."""
    import json

    click.echo(json.dumps(data, indent=2, default=str))


def _engine_dir_or_default(engine_dir: Path | None) -> Path:
    if engine_dir is not None:
        return engine_dir
    from rich.console import Console

    from toolkit.export.pipeline import ensure_default_engine
    from toolkit.export.progress import StageReporter

    return ensure_default_engine(StageReporter(Console(stderr=True)))


async def _stream_once(engine_dir: Path, params, messages, prompt, raw) -> tuple[str, int, int]:
    """Stream one request's text to stdout; returns (finish_reason, prompt_tokens, completion_tokens)."""
    from toolkit.runtime import load_engine
    from toolkit.runtime.types import GenerateRequest

    engine = load_engine(engine_dir)
    await engine.start()
    reason, prompt_tokens, completion_tokens = "", 0, 0
    try:
        request = GenerateRequest(engine.prompts.encode(messages=messages, prompt=prompt, raw=raw), params)
        async with await engine.generate(request) as stream:
            async for output in stream:
                for choice in output.choices:
                    sys.stdout.write(choice.text)
                    sys.stdout.flush()
                    reason = choice.finish_reason or reason
                prompt_tokens, completion_tokens = output.prompt_tokens, output.completion_tokens
    finally:
        await engine.stop()
    return reason, prompt_tokens, completion_tokens


@main.command()
@click.argument("engine_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--prompt", help="Plain prompt (the recipe's BOS is added unless --raw).")
@click.option("--message", "messages", multiple=True, metavar="ROLE:TEXT", help="Chat message, repeatable.")
@click.option("--raw", is_flag=True, help="Send --prompt exactly as given, no BOS.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--min-p", type=float, default=None)
@click.option("--repetition-penalty", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string, repeatable.")
def generate(engine_dir: Path | None, prompt, messages, raw, max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop) -> None:
    """Stream one completion from ENGINE_DIR (default: the embedded default model)."""
    from toolkit.runtime.errors import EngineError
    from toolkit.runtime.sampling_params import InvalidParameterError, SamplingParams

    if bool(prompt) == bool(messages):
        raise click.UsageError("give exactly one of --prompt or --message")
    chat = None
    if messages:
        chat = []
        for item in messages:
            role, sep, text = item.partition(":")
            if not sep:
                raise click.UsageError(f"--message must look like ROLE:TEXT, got {item!r}")
            chat.append({"role": role.strip(), "content": text})
    try:
        params = SamplingParams.with_defaults(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop) or None,
        )
        reason, prompt_tokens, completion_tokens = asyncio.run(
            _stream_once(_engine_dir_or_default(engine_dir), params, chat, prompt, raw))
    except (InvalidParameterError, EngineError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"\n[finish_reason={reason} prompt_tokens={prompt_tokens} completion_tokens={completion_tokens}]", err=True)


@main.command()
@click.argument("url", required=False)
@click.option("--offline", is_flag=True, help="Benchmark the engine alone, without HTTP.")
@click.option("--engine", "engine_dir", type=click.Path(file_okay=False, path_type=Path), help="Engine dir for --offline (default: the default model).")
@click.option("--model", default="default", show_default=True, help="Model name sent to URL.")
@click.option("--schema", type=click.Choice(["openai", "workers-ai"]), default="openai", show_default=True)
@click.option("--concurrency", default="1,4,16", show_default=True, help="Comma-separated concurrency levels (max in flight in --rate mode).")
@click.option("--rate", type=float, default=None, help="Poisson arrivals at this many requests/s instead of closed-loop concurrency.")
@click.option("--requests", "requests_per_level", type=int, default=None, help="Requests per level over HTTP (default: 2 x concurrency, at least 8).")
@click.option("--prompt-tokens", type=int, default=108, show_default=True)
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--ignore-eos", is_flag=True, help="Send ignore_eos (servers that accept it generate exactly --max-tokens).")
@click.option("--api-key", default=None, envvar="TOOLKIT_API_KEY")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads for --offline (default: all cores).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the saved JSON (meta + results) on stdout instead of the table.")
def bench(url, offline, engine_dir, model, schema, concurrency, rate, requests_per_level, prompt_tokens, max_tokens,
          ignore_eos, api_key, threads, out_dir, as_json) -> None:
    """Measure TTFT, inter-token latency and throughput of URL (any OpenAI-compatible server) or, with --offline, of an engine.

    Prints a table and saves JSON and a PNG plot under --out.
    """

    from toolkit.bench.report import results_table, save_results

    levels = [int(x) for x in concurrency.split(",") if x.strip()]
    if offline == bool(url):
        raise click.UsageError("give a server URL, or --offline to benchmark an engine without HTTP")
    meta = {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens}
    if offline:
        from toolkit.bench.offline import bench_offline

        engine_dir = _engine_dir_or_default(engine_dir)
        results = asyncio.run(bench_offline(engine_dir, levels, prompt_tokens, max_tokens, threads))
        title, name, meta = f"Offline engine benchmark: {engine_dir.name}", f"offline-{engine_dir.name}", {**meta, "engine_dir": str(engine_dir), "threads": threads}
    else:
        from toolkit.bench.loadgen import run_http_bench

        per_level = requests_per_level or max(8, 2 * max(levels))
        results = asyncio.run(run_http_bench(
            url, model, levels, mode="rate" if rate else "concurrency", rate=rate, requests_per_level=per_level,
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, api_key=api_key, schema=schema, ignore_eos=ignore_eos,
        ))
        title, name, meta = f"HTTP benchmark: {url} ({model})", "http-" + model.replace("/", "_").replace("@", ""), {**meta, "url": url, "model": model, "schema": schema, "rate": rate}
    json_path, png_path = save_results(out_dir, name, meta, results)
    if as_json:
        click.echo(json_path.read_text(), nl=False)
        click.echo(f"saved {json_path} and {png_path}", err=True)
        return
    console = _console()
    console.print(results_table(title, results))
    console.print(f"saved {json_path} and {png_path}")


@main.command()
@click.argument("engine_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", "api_keys", multiple=True, help="Accepted Bearer key (repeatable; also $TOOLKIT_API_KEY, comma-separated). None: open server.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), help="Also serve every engine directory directly under DIR.")
@click.option("--grace", "grace_s", type=float, default=10.0, show_default=True, help="Seconds to finish in-flight requests on shutdown.")
@click.option("--max-body-mib", type=float, default=2.0, show_default=True, help="Request body limit (larger: 413).")
@click.option("--request-timeout", "request_timeout_s", type=float, default=600.0, show_default=True, help="Abort a generation after this many seconds (408).")
@click.option("--public-metrics", is_flag=True, help="Serve /metrics without the API key (for a Prometheus scraper).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allowed CORS origin, repeatable ('*' for any). Default: CORS off.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
@click.option("--lora", "loras", multiple=True, metavar="NAME[=PATH]", help="Serve a LoRA adapter (repeatable): NAME from an engine's `toolkit export-lora`, or NAME=PATH of an adapter exported with --out.")
@click.option("--max-loras", type=click.IntRange(min=1), default=None, help="LoRA adapters kept loaded per engine (least recently used dropped). Default: 8.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve through Ray Serve: replicas of the app, one engine each, behind one endpoint (needs toolkit[ray]; README: Scaling out).")
@click.option("--address", "ray_address", help="With --ray: the Ray cluster to join (e.g. ray://head:10001). Default: start a local one.")
@click.option("--replicas", type=int, default=1, show_default=True, help="With --ray: replica count (the start when autoscaling).")
@click.option("--min-replicas", type=int, help="With --ray: autoscale, never below N replicas.")
@click.option("--max-replicas", type=int, help="With --ray: autoscale, never above N replicas.")
@click.option("--target-ongoing-requests", type=float, default=8.0, show_default=True, help="With --ray, autoscaling: requests per replica (running + queued) to steer towards.")
@click.option("--threads", type=int, help="With --ray: onnxruntime threads per replica, also the CPUs each replica reserves (default 1 CPU).")
@click.option("--no-prefix-cache", "no_prefix_cache", is_flag=True, help="Do not reuse the KV of prompt prefixes shared between requests (ONNX: the prefix cache; TensorRT-LLM: KV block reuse; README: Prefix caching).")
@click.option("--step-budget-ms", type=click.FloatRange(min=0), default=None, help="ONNX engines: model time per step while streams decode; prompt chunks are cut to fit (smoother inter-token latency, later first tokens). 0: token budget only. Default: SchedulerConfig's (README: Smooth streams).")
@click.option("--max-batch-size", type=click.IntRange(1, 256), default=None, help="ONNX engines: most sequences decoded together (vLLM's --max-num-seqs); more requests wait for a row. Default: SchedulerConfig's, 32.")
@click.option("--waiting-served-ratio", type=click.FloatRange(min=0), default=None, help="ONNX engines: when requests still prefilling have this many times the rows decoding, a step runs prompts only (text-generation-inference's option of that name): a burst of new requests gets its first tokens sooner, the streams already running wait one longer step. 0: never. Default: SchedulerConfig's, 2 (README: Smooth streams).")
@click.option("--queued-step-budget-ms", type=click.FloatRange(min=0), default=None, help="ONNX engines: model time per step while requests wait for a free row (the batch is full): longer prompt chunks, more throughput, longer gaps between the running streams' tokens. 0: --step-budget-ms then too. Default: SchedulerConfig's, 150 (README: Smooth streams).")
@click.option("--prompt-lookup/--no-prompt-lookup", "prompt_lookup", default=None, help="ONNX engines: prompt-lookup (n-gram) speculative decoding on / off for every request. Default: on where verify runs are bitwise plain decoding (fp32 engines; int8 gqa engines on our attention operator), off elsewhere (README: Speculative decoding).")
@click.option("--predicted-outputs/--no-predicted-outputs", "predicted_outputs", default=None, help="ONNX engines: speculate from a request's OpenAI `prediction` (and its prompt) on / off. Off, `prediction` is accepted and changes nothing. Default: as --prompt-lookup; off, where it could change the output (README: Speculative decoding).")
@click.option("--max-draft-tokens", type=click.IntRange(min=1, max=32), default=None, help="ONNX engines: most draft tokens verified per step (prompt lookup and `prediction`). Default: SpeculativeConfig's.")
@click.option("--kv-cache-gib", type=click.FloatRange(min=0, min_open=True), default=None, help="ONNX engines: KV cache budget in GiB, shared by the decode batch, prompts in prefill and the prefix cache. Default: a tenth of the machine's memory, at least one full-context sequence (README: Memory); with --ray, per replica, and the default is shared by the replicas on a machine (README: Scaling out).")
@click.option("--prefix-cache-share", type=click.FloatRange(0, 1, max_open=True), default=0.25, show_default=True, help="ONNX engines: the part of the KV budget cached prompt prefixes may hold, committed at start and set aside from what requests can reserve (README: Memory).")
@click.option("--ort-arena-mib", type=click.IntRange(min=0), default=None, help="onnxruntime CPU arena: one arena shared by the sessions, at most N MiB, grown by what is asked; 0: no arena (malloc). Default: onnxruntime's own per session.")
@click.option("--kv-cache-dtype", type=click.Choice(["float16", "float32"]), default=None, help="ONNX gqa engines on our attention operator: the KV cache's element type. Default: float16 for quantized engines, float32 for fp32 ones ($TOOLKIT_KV_CACHE_DTYPE; README: Attention on our own operator).")
@click.option("--malloc-trim-s", type=click.FloatRange(min=0), default=10.0, show_default=True, help="ONNX engines: hand glibc's freed heap back to the kernel every N seconds (0: never).")
def serve(engine_dirs, host, port, api_keys, models_dir, grace_s, max_body_mib, request_timeout_s, public_metrics, cors_origins, log_level, loras, max_loras,
          use_ray, ray_address, replicas, min_replicas, max_replicas, target_ongoing_requests, threads, no_prefix_cache,
          step_budget_ms, max_batch_size, waiting_served_ratio, queued_step_budget_ms, prompt_lookup, predicted_outputs, max_draft_tokens, kv_cache_gib, prefix_cache_share, ort_arena_mib,
          kv_cache_dtype, malloc_trim_s) -> None:
    """Serve ENGINE_DIRs over the OpenAI and Workers AI APIs.

    With no ENGINE_DIR and no --models-dir, serves the embedded default model (exported first if needed).
    """
    from toolkit.artifact.onnx_session import ARENA_ENV
    from toolkit.server.serve import ServeError, engine_dirs_to_serve, engine_options
    from toolkit.server.serve import serve as run_server

    if ort_arena_mib is not None:  # read by create_session, like $TOOLKIT_THREADS (Ray replicas get it in their spec)
        os.environ[ARENA_ENV] = str(ort_arena_mib)
    engines = engine_options(no_prefix_cache, step_budget_ms, prompt_lookup, max_draft_tokens, kv_cache_gib,
                             prefix_cache_share, malloc_trim_s, predicted_outputs, max_batch_size,
                             waiting_served_ratio, queued_step_budget_ms, kv_cache_dtype)

    try:
        dirs = engine_dirs_to_serve(engine_dirs, models_dir)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    if not dirs:  # the embedded default model, exported (with progress) on first use
        from rich.console import Console

        from toolkit.export.pipeline import ensure_default_engine
        from toolkit.export.progress import StageReporter

        try:
            dirs = [ensure_default_engine(StageReporter(Console(stderr=True)))]
        except _export_errors() as exc:
            raise click.ClickException(str(exc)) from None
    if use_ray:
        _serve_on_ray(dirs, host, port, api_keys, ray_address, grace_s=grace_s, replicas=replicas,
                      min_replicas=min_replicas, max_replicas=max_replicas,
                      target_ongoing_requests=target_ongoing_requests, threads=threads,
                      max_body_bytes=int(max_body_mib * 1024 * 1024), log_level=log_level,
                      request_timeout_s=request_timeout_s, public_metrics=public_metrics,
                      cors_origins=tuple(cors_origins), loras=tuple(loras), max_loras=max_loras,
                      engine_options=engines, ort_arena_mib=ort_arena_mib)
        return
    try:
        run_server(
            dirs, host, port, api_keys, grace_s=grace_s,
            max_body_bytes=int(max_body_mib * 1024 * 1024), log_level=log_level, request_timeout_s=request_timeout_s,
            public_metrics=public_metrics, cors_origins=tuple(cors_origins), loras=tuple(loras), max_loras=max_loras,
            **engines,
        )
    except ServeError as exc:
        raise click.ClickException(str(exc)) from None



def _serve_on_ray(dirs, host, port, api_keys, address, *, grace_s, replicas, min_replicas, max_replicas,
                  target_ongoing_requests, threads, **app_options) -> None:
    """``toolkit serve --ray``: the same app as Ray Serve replicas (toolkit.scale.ray_serve)."""
    from toolkit.scale.options import ScaleOptions, ScaleOptionsError, check_local_kv, engine_capacity
    from toolkit.server.serve import api_keys_from_env

    try:
        options = ScaleOptions(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                               target_ongoing_requests=target_ongoing_requests, threads=threads, grace_s=grace_s,
                               max_ongoing_requests=engine_capacity(app_options["engine_options"].get("max_batch_size")))
        if address is None:  # a local cluster: every replica on this machine, so their KV budgets must fit in it
            check_local_kv(dirs, options, app_options["engine_options"]["memory"].get("kv_budget_bytes"))
    except ScaleOptionsError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        from toolkit.scale.ray_serve import serve_on_ray
    except ImportError as exc:
        raise click.ClickException(f"--ray needs Ray Serve: pip install 'toolkit[ray]' ({exc})") from None
    serve_on_ray(dirs, host, port, api_keys_from_env(api_keys), options, address=address, grace_s=grace_s, **app_options)

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the recipes as JSON on stdout.")
def recipes(as_json: bool) -> None:
    """List the recipes and what each supports."""
    from rich.table import Table

    from toolkit.recipes import all_recipes

    if as_json:
        _print_json([{"name": r.name, "hf_id": r.hf_id, "aliases": list(r.aliases), "architecture": r.architecture,
                      "context_window": r.context_window, "embedded": r.embedded, "fim": bool(r.fim),
                      "targets": {t: list(p) for t, p in r.supported_targets().items()},
                      "trtllm_tensor_parallel_size": r.trtllm.tensor_parallel_size,
                      "price_per_million_tokens": r.price_per_million_tokens} for r in all_recipes()])
        return
    table = Table(title="Recipes")
    for column in ("recipe", "Hugging Face id", "aliases", "arch", "context", "onnx", "trtllm (tp)", "$/M in/out"):
        table.add_column(column)
    for r in all_recipes():
        tp = ", ".join(f"{p}×{r.trtllm.tensor_parallel_size.get(p, 1)}" for p in r.trtllm.precisions)
        price = r.price_per_million_tokens
        table.add_row(
            r.name + (" (embedded)" if r.embedded else ""),
            r.hf_id,
            "\n".join(r.aliases),
            r.architecture,
            f"{r.context_window:,}",
            ", ".join(r.onnx_precisions),
            tp,
            f"{price['input']}/{price['output']}",
        )
    _console().print(table)


if __name__ == "__main__":
    main()
