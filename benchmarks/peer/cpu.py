"""The CPU a measurement ran on, from ``lscpu``: every speed figure of the peer comparison names it.

Issue 13 measured the same code at 1.17-1.54x llama-server on an AVX-512 VNNI EPYC and at
0.90-0.97x on an AVX2-only machine: the int8 kernels of both sides depend on the vector
extensions, so the report carries the model name and the flags that decide which kernels run.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field

# The flags that pick int8/bf16 kernels in onnxruntime's MatMulNBits and in ggml's CPU backend.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass
class CpuInfo:
    """What ``lscpu`` says about the machine, reduced to what the report needs."""

    model: str
    cpus: int | None
    threads_per_core: int | None
    hypervisor: str | None
    flags: list[str] = field(default_factory=list)

    @property
    def kernel_flags(self) -> list[str]:
        """The flags of ``KERNEL_FLAGS`` that this CPU has, in that order."""
        present = set(self.flags)
        return [flag for flag in KERNEL_FLAGS if flag in present]

    def summary(self) -> str:
        """One line: model, logical CPUs, and the kernel-relevant flags present / absent."""
        present = self.kernel_flags
        absent = [flag for flag in KERNEL_FLAGS if flag not in present]
        vm = f", {self.hypervisor} VM" if self.hypervisor else ""
        return (f"{self.model}, {self.cpus if self.cpus is not None else '?'} logical CPUs{vm}; "
                f"flags: {' '.join(present) or 'none of interest'}; absent: {' '.join(absent) or 'none'}")

    def as_dict(self) -> dict:
        return {**asdict(self), "kernel_flags": self.kernel_flags, "summary": self.summary()}


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def parse_lscpu(text: str) -> CpuInfo:
    """``lscpu``'s ``Key: value`` lines (C locale) as a :class:`CpuInfo`; missing keys stay unknown."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return CpuInfo(
        model=fields.get("Model name") or "unknown CPU",
        cpus=_int_or_none(fields.get("CPU(s)")),
        threads_per_core=_int_or_none(fields.get("Thread(s) per core")),
        hypervisor=fields.get("Hypervisor vendor"),
        flags=fields.get("Flags", "").split(),
    )


def read_cpu() -> CpuInfo:
    """This machine's :class:`CpuInfo` (``lscpu`` in the C locale; an unknown CPU without it)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False,
                              env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}).stdout
    except OSError:
        text = ""
    return parse_lscpu(text)
