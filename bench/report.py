"""Print, save (JSON) and plot (PNG) benchmark results; shared by the offline and HTTP benchmarks."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

COLUMNS = (
    ("concurrency", "conc", "{:d}"),
    ("output_tokens_per_s", "out tok/s", "{:.1f}"),
    ("ttft_ms_p50", "TTFT p50 ms", "{:.0f}"),
    ("ttft_ms_p99", "TTFT p99 ms", "{:.0f}"),
    ("itl_ms_p50", "ITL p50 ms", "{:.1f}"),
    ("itl_ms_p99", "ITL p99 ms", "{:.1f}"),
    ("e2e_s_p50", "E2E p50 s", "{:.2f}"),
)


def results_table(title: str, results: list[dict]):
    """A rich table of the levels (plus engine overhead when measured)."""
    from rich.table import Table

    table = Table(title=title)
    columns = list(COLUMNS)
    if any(r.get("overhead_pct") is not None for r in results):
        columns.append(("overhead_pct", "sched+sample %", "{:.1f}"))
    if any("errors" in r for r in results):
        columns.append(("errors", "errors", "{:d}"))
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(*[fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in columns])
    return table


def save_results(out_dir: Path, name: str, meta: dict, results: list[dict]) -> tuple[Path, Path]:
    """Write ``NAME.json`` (results + machine/meta) and ``NAME.png`` (latency vs throughput)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), **meta}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    png_path = out_dir / f"{name}.png"
    plot_results(png_path, {name: results})
    return json_path, png_path


def plot_results(path: Path, series: dict[str, list[dict]]) -> None:
    """Throughput vs concurrency and ITL p50 vs throughput, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, results in series.items():
        conc = [r["concurrency"] for r in results]
        tput = [r["output_tokens_per_s"] for r in results]
        left.plot(conc, tput, marker="o", label=label)
        right.plot(tput, [r["itl_ms_p50"] for r in results], marker="o", label=label)
    left.set(xlabel="concurrent requests", ylabel="output tokens/s", xscale="log", title="Throughput")
    right.set(xlabel="output tokens/s", ylabel="inter-token latency p50 (ms)", title="Latency vs throughput")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
