"""The application's state (:class:`AppState`): served models, metrics, API keys, readiness and
engine start/stop, shared by every handler of one app and stored as ``app.state.ctx``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from litestar.connection import ASGIConnection
from toolkit.server.errors import ApiError
from toolkit.server.metrics import Metrics
from toolkit.server.registry import ModelEntry, ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """Everything a handler needs besides the request; stored as ``app.state.ctx``."""

    models: ModelRegistry
    metrics: Metrics
    api_keys: tuple[str, ...] = ()
    shutdown_grace_s: float = 5.0
    request_timeout_s: float | None = None
    public_metrics: bool = False
    ready: bool = False
    start_error: str | None = None
    _start_task: asyncio.Task | None = field(default=None, repr=False)

    def resolve(self, name: str, param: str = "model") -> ModelEntry:
        """The served model called ``name``, or an ``unknown_model`` error listing the known ones."""
        entry = self.models.resolve(name)
        if entry is None:
            known = ", ".join(self.models.known_names()) or "none"
            shown = name if not isinstance(name, str) or len(name) <= 128 else name[:128] + "..."
            raise ApiError("unknown_model", f"the model {shown!r} is not served here; served models: {known}",
                           param)
        return entry

    def require_ready(self) -> None:
        """Raise ``unavailable`` until every engine has started (and after shutdown began)."""
        if not self.ready:
            detail = f" (start failed: {self.start_error})" if self.start_error else ""
            raise ApiError("unavailable", f"the model is not ready yet{detail}; retry in a few seconds",
                           retry_after_s=1)

    async def start_engines(self) -> None:
        """Start every engine, then mark the server ready; a failure is logged and kept for /health."""
        try:
            for entry in self.models.entries:
                await entry.engine.start()
                log.info("engine %s started (names: %s)", entry.key, ", ".join(entry.names))
        except Exception as exc:  # noqa: BLE001 - reported by /health, the server stays up
            self.start_error = str(exc) or type(exc).__name__
            log.exception("starting the engines failed")
            return
        self.ready = True

    async def stop_engines(self) -> None:
        """Mark the server not ready, then stop every engine within the grace period."""
        self.ready = False
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
        for entry in self.models.entries:
            try:
                await entry.engine.stop(self.shutdown_grace_s)
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("stopping engine %s failed", entry.key)


def state_of(connection: ASGIConnection) -> AppState:
    """The app's :class:`AppState`."""
    return connection.app.state.ctx
