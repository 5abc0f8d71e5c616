"""The fused C++ decode step (``csrc/dsla_step.cpp``), built on first use and cached per machine.

Batch-1 decode is bound by per-op dispatch: the Python DSLA step (``DSLAAttention.step`` over
``step_dsla``) issues about 120 more small tensor ops per layer than attention does, so a DSLA layer
decoded slower than the attention it replaced at every context measured. The fused step does the
layer's token mixing after the q/k/v projection in one call, in place on the state pool.

The Python step stays the reference the kernel is tested against (and the path on machines without
a C++ compiler: the build failing logs one warning). ``DSLA_SERVE_NATIVE=0`` turns the kernel off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "dsla_step.cpp"
_lock = threading.Lock()
_module: object | None = None
_failed: str | None = None


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def build_dir() -> Path:
    """Per source, torch version and CPU (the build uses -march=native): a cache dir shared across
    machines never loads code built for another CPU."""
    from dsla_serve.model.loader import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    return cache_dir() / "native" / key


def load() -> object | None:
    """The compiled extension, or None where it cannot be built (logged once) or is turned off."""
    global _module, _failed
    if os.environ.get("DSLA_SERVE_NATIVE", "1") == "0":
        return None
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load as build

                out = build_dir()
                out.mkdir(parents=True, exist_ok=True)
                flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
                _module = build("dsla_native", [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                build_directory=str(out), verbose=False)  # fmt: skip
            except Exception as e:  # no compiler, no headers: the Python step still works
                _failed = f"{type(e).__name__}: {e}"
                log.warning("fused DSLA decode step unavailable, using the Python step (%s)", _failed.splitlines()[0])
    return _module


def available() -> bool:
    return load() is not None


@dataclass(frozen=True)
class StepParams:
    """A DSLA layer's parameters as the fused step reads them (contiguous, in the state dtype but the
    gates, which keep the layer's dtype); empty tensors stand for a missing adapter or output gate.
    Adapters are (A (r, in), B transposed (r, out)); the output gate's weight is transposed."""

    gate_w: Tensor  # (nG·Hkv·D, 2·Hkv·D), columns [k of every head | v of every head]
    gate_b: Tensor  # (nG·Hkv·D,)
    ak: Tensor
    bk: Tensor
    av: Tensor
    bv: Tensor
    aq: Tensor
    bq: Tensor
    ao: Tensor
    bo: Tensor
    mix: Tensor  # (Hq, 2|3)
    gain: Tensor  # (Hq, D)
    og_w: Tensor  # (D, D)
    og_b: Tensor  # (Hq, D)


def decode_step(
    qkv: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, lcos: Tensor, lsin: Tensor, pos: Tensor, slots: Tensor,
    states: Tensor, ring_k: Tensor, ring_v: Tensor, p: StepParams, *, heads: tuple[int, int, int],
    gate_normalizer: float, gate_min: float, eps: float, normalize: bool, rope: bool,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """One decode token for B pooled sequences of a DSLA layer; states and rings updated in place.

    qkv (B, (Hq + 2·Hkv)·D) un-rotated; hidden (B, hidden) the layer input (read by a q adapter);
    cos/sin (B, D) of the new token, lcos/lsin (B, D) of the token leaving the window; pos (B,) the
    new token's position; slots (B,) pool slots of ``states`` (S, 2, Hkv, D, D) and the rings
    (S, Hkv, W, D). Returns the mixed read-out (B, Hq·D) before o_proj and the o adapter's output
    (B, hidden), or None without one.
    """
    Hq, Hkv, D = heads
    o, extra = load().dsla_decode_step(
        qkv, hidden, cos, sin, lcos, lsin, pos, slots, states, ring_k, ring_v, p.gate_w, p.gate_b, p.ak, p.bk, p.av,
        p.bv, p.aq, p.bq, p.ao, p.bo, p.mix, p.gain, p.og_w, p.og_b, Hq, Hkv, D, gate_normalizer, gate_min, eps,
        normalize, rope, D**-0.5, D**-0.5,
    )  # fmt: skip
    return o, (extra if extra.numel() else None)
