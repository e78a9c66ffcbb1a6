"""Building the package's C sources (the LM head kernel, the attention operator) on the machine that runs them.

Each source is compiled once per source text, compiler and flags with the machine's C compiler
(``$CC``, else ``cc``) into ``$TOOLKIT_CACHE/native`` (default ``~/.cache/toolkit/native``) and then
loaded from there (ctypes, or onnxruntime's ``register_custom_ops_library``), as PyTorch's
``cpp_extension.load`` and CFFI's API mode build on first use. The sources use x86-64 intrinsics, so
other machines are refused before any compiler runs, and callers check the CPU's flags first.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from toolkit.artifact.layout import cache_dir


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where ``/proc/cpuinfo`` is absent, as off Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def is_x86_64() -> bool:
    """Whether this machine is x86-64, the only one the sources' intrinsics compile for."""
    return platform.machine().lower() in ("x86_64", "amd64")


def unavailable_reason(switch: str, required: frozenset[str], flags: frozenset[str] | None = None) -> str | None:
    """Why a native part switched by ``$switch`` and needing the CPU flags ``required`` cannot run here
    (``$switch=0``, not x86-64, flags missing; ``flags`` given: those instead of this CPU's, and the
    machine is not checked), or None when it can be tried."""
    if os.environ.get(switch, "").strip() == "0":
        return f"${switch}=0"
    if flags is None and not is_x86_64():
        return f"the machine is {platform.machine()}, not x86-64"
    missing = required - (cpu_flags() if flags is None else flags)
    return "the CPU lacks " + ", ".join(sorted(missing)) if missing else None


def build_error(library: Callable[[], Path]) -> str | None:
    """Why ``library()`` (a part's ``build_library`` call) fails here, or None when it builds."""
    try:
        library()
    except (RuntimeError, OSError) as exc:
        return str(exc)
    return None


def build_library(source: Path, cflags: tuple[str, ...], out_dir: Path | None = None) -> Path:
    """Compile ``source`` with ``cflags`` (once per source text, the headers beside it, compiler and flags)
    and return the shared library's path.

    Raises ``RuntimeError`` with the compiler's message when it fails or no compiler exists.
    """
    if not is_x86_64():
        raise RuntimeError(f"{source.name} is x86-64 code (AVX-512 intrinsics); this machine is {platform.machine()}")
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not on PATH)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # what its #include "..." can reach
    key = hashlib.sha256("\0".join([source.read_text(), *headers, version, *cflags]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir() / "native"
    target = out_dir / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # built aside, then renamed: concurrent builders are safe
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, *cflags, str(source), "-o", str(built)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target
