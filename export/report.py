"""Rich tables for the end of ``toolkit export`` and for ``toolkit validate``."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolkit.artifact.manifest import Manifest


def _size(engine_dir: Path, manifest: Manifest) -> str:
    total = sum(info["size"] for info in manifest.files.values())
    return f"{total / 1e6:,.1f} MB"


def validation_table(validation: dict) -> Table:
    """Per-prompt and overall metrics next to the precision's pass bars."""
    bars = validation["thresholds"]
    table = Table(title=f"Validation vs fp32 onnxruntime reference ({validation['precision']})")
    for column in ("prompt", "greedy agreement", "top-1 agreement", "logits cosine", "max-abs diff"):
        table.add_column(column, justify="right")
    for i, case in enumerate(validation["cases"]):
        table.add_row(
            str(i),
            f"{case['greedy_agreement']:.3f}",
            f"{case['top1_agreement']:.3f}",
            f"{case['cosine']:.6f}",
            f"{case['max_abs_diff']:.4g}",
        )
    table.add_row(
        "[bold]all",
        f"[bold]{validation['greedy_agreement']:.3f} (≥ {bars['min_greedy_agreement']})",
        f"[bold]{validation['top1_agreement']:.3f} (≥ {bars['min_top1_agreement']})",
        f"[bold]{validation['min_cosine']:.6f} (≥ {bars['min_cosine']})",
        f"[bold]{validation['max_abs_diff']:.4g} (≤ {bars['max_abs_diff']})",
    )
    for case in validation.get("long_cases") or []:  # judged as their own group against the same bars
        table.add_row(
            f"[bold]long ({case['prompt_tokens']:,} tokens)",
            f"[bold]{case['greedy_agreement']:.3f}",
            f"[bold]{case['top1_agreement']:.3f}",
            f"[bold]{case['cosine']:.6f}",
            f"[bold]{case['max_abs_diff']:.4g}",
        )
    batched = validation.get("batched")
    if batched:  # the short chats as one decode batch (export/validate.py), judged against the same bars
        table.add_row(
            f"[bold]batched ({batched['rows']} rows)",
            "[bold]–",  # teacher-forced only: the free-running greedy bar is the batch-1 row's
            f"[bold]{batched['top1_agreement']:.3f} (worst row {batched['worst_top1_agreement']:.3f})",
            f"[bold]{batched['min_cosine']:.6f}",
            f"[bold]{batched['max_abs_diff']:.4g}",
        )
    return table


def print_validation(console: Console, validation: dict) -> None:
    """The validation table, the PyTorch check and the verdict."""
    console.print(validation_table(validation))
    check = validation.get("pytorch_check") or {}
    if check:
        console.print(
            f"fp32 ONNX vs PyTorch (teacher-forced, {check['positions']} positions): "
            f"max-abs diff {check['max_abs_diff']:.3g} (atol {check['atol']}), argmax agreement {check['argmax_agreement']:.3f}"
        )
    if validation["passed"]:
        console.print("[bold green]PASSED[/bold green]")
    else:
        console.print("[bold red]FAILED[/bold red]: " + "; ".join(validation["failures"]))


def print_export_summary(console: Console, engine_dir: Path, manifest: Manifest, reused: bool) -> None:
    """One screen: what was built, where, how big, how long, and the validation verdict."""
    table = Table(title="Export summary" + (" (reused)" if reused else ""), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    validation = manifest.validation or {}
    verdict = "[green]passed[/green]" if validation.get("passed") else "[red]failed[/red]"
    rows = [
        ("engine dir", str(engine_dir)),
        ("recipe", manifest.recipe),
        ("architecture", manifest.architecture),
        ("target / precision", f"{manifest.target} / {manifest.precision}"),
        ("context length", f"{manifest.context_length:,}"),
        ("size on disk", _size(engine_dir, manifest)),
        ("export time", f"{manifest.export_seconds:.1f} s"),
        ("greedy / top-1 agreement", f"{validation.get('greedy_agreement', 0):.3f} / {validation.get('top1_agreement', 0):.3f}"),
        ("validation", verdict),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
