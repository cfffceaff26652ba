"""The machine the engine runs on: its CPU (model, ISA flags, cores) and the libraries' view of it.

Machines of one kind differ (an AVX2-only AMD EPYC next to an Intel with AVX-512 and AMX), and the fastest
weight format or dtype differs with them, so benchmarks record this with every figure and the engine's setup
choice (engine/setup.py) is cached per CPU. Environment variables that hold torch, oneDNN, MKL or our own
kernel to a lower instruction set (to emulate another CPU) are part of the record: an emulated run is a
different machine.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

# ISA features that decide which kernels are fast; the rest of /proc/cpuinfo's flags are left out
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")
# Variables that cap the instruction set a library uses (see shared/FACTS.md: emulating an AVX2-only CPU)
ISA_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "TRADEOFF_NATIVE_MARCH")


@dataclass(frozen=True)
class CPU:
    model: str  # the marketing name, e.g. "AMD EPYC 7B13"
    family: str | None  # x86 family and model numbers (25/1 is Zen 3), as /proc/cpuinfo gives them
    model_number: str | None
    arch: str  # x86_64, aarch64, ...
    flags: tuple[str, ...]  # the ISA_FLAGS it has
    cores: int  # usable by this process
    torch_capability: str  # the kernels torch dispatches to (DEFAULT, AVX2, AVX512, ...)
    overrides: tuple[tuple[str, str], ...]  # ISA_OVERRIDES that are set

    @property
    def key(self) -> str:
        """One line that tells CPUs apart for a cache of per-CPU choices."""
        over = ",".join(f"{k}={v}" for k, v in self.overrides)
        return f"{self.model}|{self.family}/{self.model_number}|{self.arch}|{' '.join(self.flags)}|{self.torch_capability}|{over}"

    def short(self) -> str:
        """'AMD EPYC 7B13 (avx2 fma f16c; torch AVX2)' for a status line."""
        shown = [f for f in self.flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")]
        emulated = f", emulating {dict(self.overrides)}" if self.overrides else ""
        return f"{self.model} ({' '.join(shown) or 'no SIMD flags'}; torch {self.torch_capability}{emulated})"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


@functools.cache
def cpu() -> CPU:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return CPU(
        model=info.get("model name") or info.get("Model") or platform.processor() or "unknown CPU",
        family=info.get("cpu family"), model_number=info.get("model"), arch=platform.machine(),
        flags=tuple(f for f in ISA_FLAGS if f in flags), cores=cores,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        overrides=tuple((k, os.environ[k]) for k in ISA_OVERRIDES if os.environ.get(k)),
    )


def machine() -> dict:
    """What a benchmark's JSON records about where it ran."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": asdict(cpu())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
