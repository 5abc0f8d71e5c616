"""Process-level settings for fast CPU inference, applied by the CLI and the server at start-up."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_allocator_tuned = False


def tune_allocator() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS (glibc only).

    PyTorch's CPU allocator is plain malloc, and glibc serves blocks above 128 KiB with fresh mmap
    pages that are unmapped again on free: every large temporary then page-faults all its memory.
    Measured on the chunked DSLA kernel at 8192 tokens: 315 ms -> 99 ms. Set
    DSLA_SERVE_NO_MALLOPT=1 to opt out.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("DSLA_SERVE_NO_MALLOPT"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        _allocator_tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False
    return _allocator_tuned


ENGINE_SOURCES = ("ops", "layers", "model", "config.py", "runtime.py", "serving/engine.py", "serving/runner.py",
                  "serving/scheduler.py")  # fmt: skip


def engine_files(root: Path) -> list[Path]:
    files = []
    for name in ENGINE_SOURCES:
        path = root / name
        files += [path] if path.suffix else [*path.rglob("*.py"), *path.rglob("*.cpp")]
    return sorted(f for f in files if f.is_file())


@functools.cache
def engine_version() -> str:
    """A hash of the engine's source files (kernels, layers, model, config, the serving loop): timings
    taken with another version (a cached speed profile) are not this engine's; "unknown" where the
    sources cannot be read."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    try:
        for f in engine_files(root):
            digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    except OSError:
        return "unknown"
    return digest.hexdigest()[:12]


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
"""The instruction sets the engine's speed depends on (bfloat16 GEMMs run on AMX where it exists):
a model name such as "Intel(R) Xeon(R) Processor" does not tell them apart. x86 flags only: other
architectures record none, and their profiles are told apart by the model name alone."""


def machine_info() -> dict:
    """What a benchmark ran on, for its JSON output (with the engine version it measured)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except OSError:
        pass
    return {
        "cpu": cpu,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "allocator_tuned": _allocator_tuned,
        "engine_version": engine_version(),
    }
