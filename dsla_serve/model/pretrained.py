"""Build a ready HybridModel: base model + DSLA weights (shipped, given, or fresh) + the conversion order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from dsla_serve.config import DSLAConfig
from dsla_serve.model.convert import calibrate_gains, convert, read_manifest
from dsla_serve.model.hybrid import HybridModel
from dsla_serve.model.loader import DEFAULT_MODEL, gguf_linear_types, gguf_source, load_base
from dsla_serve.model.quant import QUANTIZERS, quantize_model
from dsla_serve.ops import native

log = logging.getLogger(__name__)

SHIPPED = {DEFAULT_MODEL: "smollm2-135m-instruct"}  # model name -> dir under dsla_serve/checkpoints


def shipped_checkpoint(model: str | None) -> Path | None:
    name = SHIPPED.get(model or DEFAULT_MODEL)
    if name is None:
        return None
    path = Path(str(resources.files("dsla_serve") / "checkpoints" / name))
    return path if (path / "manifest.json").is_file() else None


def calibration_text() -> str:
    return (resources.files("dsla_serve") / "data" / "calibration.txt").read_text()


@dataclass
class HybridInfo:
    """What was loaded, for the CLI's output, /v1/models and the logs."""

    model: str
    weights: str | None  # DSLA checkpoint dir, or None
    order: list[int]  # conversion order: level f converts the first round(f * n) layers
    order_source: str
    distilled: list[int] = field(default_factory=list)  # layers with trained DSLA weights
    undistilled: list[int] = field(default_factory=list)  # layers with fresh, calibrated-only weights

    def layers_for(self, conversion: float | None = None, dsla_layers: list[int] | None = None) -> list[int]:
        """The DSLA layers for a --conversion fraction or an explicit --dsla-layers list."""
        if dsla_layers is not None:
            return sorted(set(dsla_layers))
        if conversion is None:
            return []
        if not 0 <= conversion <= 1:
            raise ValueError(f"conversion must be in [0, 1], got {conversion}")
        return sorted(self.order[: round(conversion * len(self.order))])

    def note(self, layers: list[int]) -> str | None:
        fresh = sorted(set(layers) & set(self.undistilled))
        if not fresh:
            return None
        return f"DSLA layers {fresh} are not distilled (fresh weights, calibrated only): expect poor output"


def fallback_order(n: int) -> list[int]:
    """Order used when no distilled checkpoint gives one: last layer first."""
    return list(range(n - 1, -1, -1))


AUTO_DTYPE = "int8"
"""NOTE(decisions): the engine's default on CPUs with bfloat16 instructions (AVX512-BF16 or AMX) for
models whose weights are not already 4-bit: the fastest mode within the perplexity limits in
``dsla-serve bench precision`` (docs/bench/precision.json). Models whose every decoder matrix is Q4_1
in their GGUF (the embedded default) run ``int4``: their weights sit on that 4-bit grid already, so
the int4 kernel runs exactly the weights shipped (up to bf16 rounding of the block scales)."""

EXACT_INT4 = {"Q4_1"}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); the low-precision modes need it to pay."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, model: str | None = None) -> str:
    """ "auto": where the CPU has bfloat16 instructions ``int4`` for a model whose GGUF stores its
    matrices as Q4_1, else ``AUTO_DTYPE``; float32 elsewhere. Other names as given."""
    if dtype != "auto":
        return dtype
    if not cpu_has_bf16():
        return "float32"
    try:
        gguf = gguf_source(model)
        types = gguf_linear_types(gguf) if gguf is not None else set()
    except Exception as e:  # an unreadable file: loading it reports the error; the dtype need not guess
        log.debug("no GGUF types for %s: %s", model, e)
        types = set()
    return "int4" if types and types <= EXACT_INT4 else AUTO_DTYPE


def load_hybrid(
    model: str | None = None, weights: str | Path | None = "auto", dtype: str = "float32",
    config: DSLAConfig | None = None,
) -> tuple[HybridModel, object, HybridInfo]:  # fmt: skip
    """Base model with every layer convertible: distilled layers from ``weights`` ("auto": the
    checkpoint shipped for the default model, if any), the rest fresh and gain-calibrated.

    ``dtype``: "float32", "bfloat16", "int8" or "int4" (bfloat16 activations with int8/int4 weight-only
    decoder linears and an int8 lm_head), or "auto" (``resolve_dtype``).
    """
    dtype = resolve_dtype(dtype, model)
    loaded = load_base(model, "bfloat16" if dtype in QUANTIZERS else dtype)
    base, tok = loaded.model, loaded.tokenizer
    n = base.config.num_hidden_layers
    path = shipped_checkpoint(model) if weights == "auto" else (Path(weights) if weights else None)
    distilled: list[int] = []
    order, source = fallback_order(n), "fallback (last layer first; no distilled checkpoint)"
    if path is not None:
        manifest = read_manifest(path, base)
        distilled = sorted(int(i) for i in manifest["layers"])
        convert(base, distilled, weights=path)
        config = DSLAConfig.from_dict(manifest["dsla_config"])
        if manifest.get("order"):
            head = [i for i in manifest["order"] if i in distilled]
            order, source = head + [i for i in order if i not in head], f"{path}/manifest.json"
    fresh = [i for i in range(n) if i not in distilled]
    if fresh:
        convert(base, fresh, config=config)
        ids = tok(calibration_text(), return_tensors="pt").input_ids[:, :512].to(base.device)
        calibrate_gains(base, ids, fresh)
        log.info("DSLA layers %s have no distilled weights: fresh gates, calibrated gains only", fresh)
    if dtype in QUANTIZERS:  # after loading DSLA weights: the checkpoint's fingerprint is of the unquantised base
        quantize_model(base, dtype)
    info = HybridInfo(loaded.name, str(path) if path else None, order, source, distilled, fresh)
    if base.device.type == "cpu":
        native.load()  # build (first run on this machine: ~40 s) or load the C++ kernels now, not mid-request
    return HybridModel(base), tok, info


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
