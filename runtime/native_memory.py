"""glibc malloc: how much freed memory it holds, and handing it back to the kernel (``malloc_trim``).

Measured on the default model (int8 gqa engine, 12 streaming clients, prefix cache off, 150 s):
the server's resident set settled ~1.55-1.60 GB with glibc holding 500-590 MB of *freed* heap
(``mallinfo2().fordblks``) left by onnxruntime's and numpy's short-lived buffers of changing
sizes; ``MALLOC_ARENA_MAX=2`` and onnxruntime's arena off changed neither. ``malloc_trim(0)``
every 5 s kept the same load at 1.08-1.10 GB. So the engine trims on a timer: ``Trimmer`` calls
``malloc_trim(0)`` (https://man7.org/linux/man-pages/man3/malloc_trim.3.html) from its own
thread every ``interval_s`` (``toolkit serve --malloc-trim-s``). Elsewhere than glibc (musl,
macOS) both functions are absent and this module does nothing.

Big buffers whose sizes change (the KV cache's pools and arenas) stay off glibc's heap altogether:
``anonymous_map`` gives them memory maps of their own, whose pages go straight back to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
import time

import numpy as np


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (or glibc < 2.33, which lacks mallinfo2)
        return None


_LIBC = _libc()


def malloc_free_bytes() -> int | None:
    """Bytes glibc holds freed in its heaps (``mallinfo2().fordblks``), or None without glibc."""
    return int(_LIBC.mallinfo2().fordblks) if _LIBC is not None else None


def malloc_trim() -> bool:
    """Hand glibc's freed heap pages back to the kernel; True when some were."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


def anonymous_map(nbytes: int, populate: bool = False) -> mmap.mmap:
    """A private anonymous memory map of ``nbytes`` (https://man7.org/linux/man-pages/man2/mmap.2.html), every
    page faulted in for writing up front when ``populate`` (``MAP_POPULATE``; elsewhere one write per page).

    Private, not shared: a shared anonymous map is shmem, whose pages ``MADV_DONTNEED`` would not free.
    """
    populated = getattr(mmap, "MAP_POPULATE", 0) if populate else 0
    memory = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populated)
    if populate and not populated:
        np.frombuffer(memory, np.uint8)[:: mmap.PAGESIZE] = 0
    return memory


class Trimmer:
    """A daemon thread that calls ``malloc_trim`` every ``interval_s`` seconds (none for 0)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.trims = 0
        self.seconds = 0.0  # time spent trimming, in total
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval_s > 0 and _LIBC is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            started = time.perf_counter()
            malloc_trim()
            self.seconds += time.perf_counter() - started
            self.trims += 1
