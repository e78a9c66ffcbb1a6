"""LoRA adapters served per request by the ONNX engine (see ``toolkit.artifact.lora`` for the graph contract).

``LoraAdapters`` keeps each loaded adapter's ``A``/``B`` as numpy and builds the LoRA graph's inputs:
per row ``A [rows, in, r]`` / ``B [rows, r, out]`` for every module, zeros for rows without an
adapter (and rank 0 for a module no row's adapter targets). A decode step's inputs are rebuilt only
when the batch's composition (the adapter of each row, in order) changes; a prefill's batch-1
inputs are cached per adapter.

Adapters load on first use in a worker thread (reading and checking the files never blocks the
engine loop; the request waits for its adapter, not the batch). At most ``max_loras`` stay loaded:
when another is loaded, the least recently used one that no queued or running request needs is
dropped (one that is in use is never dropped, so the bound can be exceeded while more distinct
adapters are in flight).
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from toolkit.artifact.lora import AdapterError, AdapterInfo, a_input, b_input, load_adapter_weights

DEFAULT_MAX_LORAS = 8

Weights = dict[str, tuple[np.ndarray, np.ndarray]]


def check_adapter_dir(directory: Path, base_sha256: str) -> AdapterInfo:
    """An exported adapter's record, refused when it was made for another base checkpoint."""
    info = AdapterInfo.load(directory)
    if info.base_sha256 != base_sha256:
        raise AdapterError(
            f"adapter {info.name!r} ({directory}) was exported for another base checkpoint "
            f"(SHA-256 {info.base_sha256[:12]}…, this engine's is {base_sha256[:12]}…)"
        )
    if info.validation is not None and not info.validation.get("passed"):
        raise AdapterError(f"adapter {info.name!r} ({directory}) failed its validation; re-run `toolkit export-lora`")
    return info


class LoraAdapters:
    """The engine's adapters: name → directory, the loaded ones (LRU), and the graph inputs they make."""

    def __init__(self, sources: dict[str, Path], modules: dict[str, tuple[int, int]], base_sha256: str,
                 max_loras: int = DEFAULT_MAX_LORAS, notify=None):
        if max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        self.modules = modules
        self.max_loras = max_loras
        self.infos = {name: check_adapter_dir(Path(path), base_sha256) for name, path in sources.items()}
        self.sources = {name: Path(path) for name, path in sources.items()}
        self._loaded: OrderedDict[str, Weights] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        self._rows_key: tuple | None = None
        self._rows_feeds: dict[str, np.ndarray] = {}
        self._single: dict[str | None, dict[str, np.ndarray]] = {}
        self._notify = notify  # called (from the worker thread) when a load finishes: wakes the engine loop
        self.loads = 0  # how many times an adapter was read from disk (for tests and logs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.infos)

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    # ---- loading (worker thread) and admission (engine thread) -----------------------------------
    def _read(self, name: str) -> Weights:
        return load_adapter_weights(self.sources[name], self.modules, self.infos[name].weights_sha256)

    def poll(self, name: str, in_use: set[str]) -> bool | Exception:
        """True when ``name`` is loaded (marking it used); else starts its load and returns False.

        Returns the load's exception when it failed. Call from the engine thread only.
        """
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return True
        future = self._loading.get(name)
        if future is None:
            self._loading[name] = future = self._executor.submit(self._read, name)
            if self._notify is not None:
                future.add_done_callback(lambda _: self._notify())
            return False
        if not future.done():
            return False
        del self._loading[name]
        if (error := future.exception()) is not None:
            return error
        self._loaded[name] = future.result()
        self.loads += 1
        self._trim(in_use | {name})
        return True

    def _trim(self, in_use: set[str]) -> None:
        for name in list(self._loaded):
            if len(self._loaded) <= self.max_loras:
                return
            if name not in in_use:
                del self._loaded[name]
                self._single.pop(name, None)

    # ---- graph inputs ----------------------------------------------------------------------------
    def single_feeds(self, name: str | None) -> dict[str, np.ndarray]:
        """The LoRA inputs of a batch-1 prefill for ``name`` (None: the base model)."""
        if name not in self._single:
            self._single[name] = self._build((name,))
        return self._single[name]

    def row_feeds(self, rows: tuple[str | None, ...]) -> dict[str, np.ndarray]:
        """The LoRA inputs of a decode step whose row i uses ``rows[i]``; rebuilt only when ``rows`` changes."""
        if rows != self._rows_key:
            self._rows_feeds, self._rows_key = self._build(rows), rows
        return self._rows_feeds

    def _build(self, rows: tuple[str | None, ...]) -> dict[str, np.ndarray]:
        weights = [self._loaded[name] if name is not None else None for name in rows]
        feeds = {}
        for module, (fan_in, fan_out) in self.modules.items():
            pairs = [w.get(module) if w is not None else None for w in weights]
            rank = max((a.shape[1] for a, _ in filter(None, pairs)), default=0)
            a_all = np.zeros((len(rows), fan_in, rank), np.float32)
            b_all = np.zeros((len(rows), rank, fan_out), np.float32)
            for row, pair in enumerate(pairs):
                if pair is not None:
                    a, b = pair
                    a_all[row, :, : a.shape[1]] = a
                    b_all[row, : b.shape[0]] = b
            feeds[a_input(module)], feeds[b_input(module)] = a_all, b_all
        return feeds

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
