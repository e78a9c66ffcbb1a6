"""GPU smoke test of the TensorRT-LLM path (issue #10): one run, under 10 minutes on one GPU.

    .venv/bin/python benchmarks/trtllm_smoke.py [--out trtllm-smoke] [--port 8123]

Steps (each one a row of the table and an entry of ``<out>/trtllm_smoke.json``):

1. ``tensorrt_llm`` imports (else: one sentence and exit status 2, before any work);
2. export the default recipe with ``--target trtllm`` at int8 and at fp16 (the recipe's 16-bit dtype,
   bfloat16 for Gemma 3), ``--logprobs`` on the fp16 one; each export validates against the fp32
   onnxruntime reference, long golden prompts included (``manifest.validation.passed``);
3. serve the int8 engine; a 9,000-token prompt completes (past max_num_tokens 8,192: chunked prefill);
4. two unseeded temperature-1 requests return different text (a fresh seed per request);
5. ``top_logprobs`` is a 400 on the int8 engine (no --logprobs) and answered by the fp16 one;
6. ``toolkit bench`` at concurrency 1, 16, 64: throughput and TTFT.

A pass is every row "pass"; the exit status is 0 then, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TOOLKIT = [str(Path(sys.executable).with_name("toolkit"))]  # the console script beside this interpreter
LONG_PROMPT_TOKENS = 9000
CONCURRENCY = "1,16,64"


def _toolkit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOLKIT, *args], capture_output=True, text=True, timeout=timeout)


def _post(port: int, path: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _wait_ready(port: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"toolkit serve did not answer on port {port} within {timeout_s:.0f} s")


def check_tensorrt_llm() -> str | None:
    """None when TensorRT-LLM imports, else the one sentence saying why this script stops."""
    from toolkit.artifact.trtllm import TrtLlmUnavailableError, import_tensorrt_llm

    try:
        import_tensorrt_llm()
    except TrtLlmUnavailableError:
        return ("trtllm_smoke: stopped before any work because TensorRT-LLM 1.2.x is not importable here "
                "(it needs Linux, an NVIDIA GPU and CUDA); run it on a GPU machine with tensorrt_llm installed.")
    return None


def _export(out: Path, precision: str, logprobs: bool) -> dict:
    engine_dir = out / f"default-trtllm-{precision}"
    args = ["export", "--target", "trtllm", "--precision", precision, "--out", str(engine_dir), "--force"]
    done = _toolkit(*args, *(["--logprobs"] if logprobs else []))
    manifest = {}
    if (engine_dir / "manifest.json").is_file():
        manifest = json.loads((engine_dir / "manifest.json").read_text())
    validation = manifest.get("validation") or {}
    return {"step": f"export+validate {precision}", "pass": done.returncode == 0 and bool(validation.get("passed")),
            "engine_dir": str(engine_dir), "dtype": (manifest.get("export_options") or {}).get("dtype"),
            "validation": {k: validation.get(k) for k in ("top1_agreement", "min_cosine", "max_abs_diff", "failures")},
            "stderr_tail": done.stderr[-800:]}


def _serve_checks(engine_dirs: list[str], port: int, out: Path) -> list[dict]:
    server = subprocess.Popen([*TOOLKIT, "serve", *engine_dirs, "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=open(out / "serve.log", "w"))
    rows = []
    try:
        _wait_ready(port)
        int8, fp16 = (Path(d).name for d in engine_dirs)
        words = " ".join(f"w{i}" for i in range(LONG_PROMPT_TOKENS))  # about one token per word piece or more
        status, body = _post(port, "/v1/completions", {"model": int8, "prompt": words, "max_tokens": 8, "temperature": 0})
        usage = body.get("usage") or {}
        rows.append({"step": f"{LONG_PROMPT_TOKENS}-token prompt completes", "status": status,
                     "prompt_tokens": usage.get("prompt_tokens"),
                     "pass": status == 200 and (usage.get("prompt_tokens") or 0) >= LONG_PROMPT_TOKENS})
        texts = []
        for _ in range(2):
            status, body = _post(port, "/v1/completions", {"model": int8, "prompt": "Once upon a time",
                                                            "max_tokens": 48, "temperature": 1.0})
            texts.append((body.get("choices") or [{}])[0].get("text"))
        rows.append({"step": "two unseeded temperature-1 requests differ", "pass": None not in texts and texts[0] != texts[1],
                     "texts": texts})
        refused, _ = _post(port, "/v1/chat/completions", {"model": int8, "messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 4, "logprobs": True, "top_logprobs": 2})
        answered, body = _post(port, "/v1/chat/completions", {"model": fp16, "messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 4, "logprobs": True, "top_logprobs": 2})
        rows.append({"step": "logprobs: 400 without --logprobs, answered with it", "pass": refused == 400 and answered == 200,
                     "statuses": [refused, answered]})
        bench_dir = out / "bench"
        done = _toolkit("bench", f"http://127.0.0.1:{port}", "--model", int8, "--concurrency", CONCURRENCY,
                        "--max-tokens", "128", "--out", str(bench_dir), "--json", timeout=300)
        results = []
        try:
            results = json.loads(done.stdout).get("results", [])
        except ValueError:
            pass
        rows.append({"step": f"toolkit bench at {CONCURRENCY}", "pass": done.returncode == 0 and len(results) == 3,
                     "results": [{k: r.get(k) for k in ("concurrency", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}
                                 for r in results]})
    finally:
        server.terminate()
        server.wait(timeout=60)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("trtllm-smoke"))
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args(argv)
    if (reason := check_tensorrt_llm()) is not None:
        print(reason)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = [_export(args.out, "int8", logprobs=False), _export(args.out, "fp16", logprobs=True)]
    if all(r["pass"] for r in rows):
        rows += _serve_checks([rows[0]["engine_dir"], rows[1]["engine_dir"]], args.port, args.out)
    report = {"seconds": round(time.perf_counter() - started, 1), "passed": all(r["pass"] for r in rows),
              "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "rows": rows}
    (args.out / "trtllm_smoke.json").write_text(json.dumps(report, indent=1))
    width = max(len(r["step"]) for r in rows)
    for row in rows:
        print(f"{row['step']:<{width}}  {'pass' if row['pass'] else 'FAIL'}")
    print(f"{'total':<{width}}  {'pass' if report['passed'] else 'FAIL'}  ({report['seconds']} s)")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
