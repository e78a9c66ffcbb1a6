"""Stage-by-stage progress for long commands (rich): a spinner while a stage runs, a tick and its time after."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console


def quiet_libraries() -> None:
    """Silence library chatter (tracer warnings, tokenizer notices, tqdm bars) that would bury the stages."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TracerWarning.*")
    try:
        from torch.jit import TracerWarning

        warnings.filterwarnings("ignore", category=TracerWarning)
    except ImportError:
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("optimum", "onnxruntime", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


class StageReporter:
    """Prints one line per finished stage and keeps each stage's duration."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.durations: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        """Run the body as one named stage with a spinner."""
        start = time.perf_counter()
        status = contextlib.nullcontext() if self.quiet else self.console.status(f"[bold]{title}…")
        try:
            with status:
                yield
        except BaseException:
            if not self.quiet:
                self.console.print(f"[red]✗[/red] {title} (failed after {time.perf_counter() - start:.1f}s)")
            raise
        elapsed = time.perf_counter() - start
        self.durations[title] = elapsed
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {title} [dim]({elapsed:.1f}s)[/dim]")

    def note(self, text: str) -> None:
        """A progress line inside the current stage."""
        if not self.quiet:
            self.console.print(f"  [dim]{text}[/dim]")
