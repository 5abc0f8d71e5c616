"""In-place conversion of attention layers to DSLA (and back), and DSLA weight files with a manifest.

A DSLA checkpoint is a directory: ``manifest.json`` plus one ``layer_<i>.safetensors`` per layer,
holding only the parameters DSLA adds (q/k/v/o stay the base model's). The manifest records the
base model's fingerprint, the DSLA config and each tensor's shape; loading against another base
model, another config or other shapes is refused with a message naming the mismatch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dsla_serve.config import DSLAConfig
from dsla_serve.layers import DSLAAttention
from dsla_serve.model.loader import check_architecture

MANIFEST = "manifest.json"
FORMAT = "dsla-serve/dsla-layers"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A DSLA checkpoint does not fit this model, or is missing or corrupted; the message says why."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a *ForCausalLM (or of its inner model)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers: not a Llama-family causal LM")
    return layers


def check_layers(model: nn.Module, layers: Iterable[int]) -> list[int]:
    n = len(decoder_layers(model))
    out = sorted(set(int(i) for i in layers))
    for i in out:
        if not 0 <= i < n:
            raise ValueError(f"layer {i} out of range [0, {n})")
    return out


def original_attention(model: nn.Module, i: int) -> nn.Module:
    """The attention module of layer i, whether or not the layer is converted now."""
    return unconverted(decoder_layers(model)[i].self_attn)


def unconverted(attn: nn.Module) -> nn.Module:
    """The attention a DSLA module replaced, or ``attn`` itself when it is one."""
    return attn.replaced if isinstance(attn, DSLAAttention) else attn


def converted_layers(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.self_attn, DSLAAttention)]


def convert(
    model: nn.Module,
    layers: Iterable[int],
    weights: str | Path | dict[int, dict[str, torch.Tensor]] | None = None,
    config: DSLAConfig | None = None,
) -> dict[int, DSLAAttention]:
    """Replace ``self_attn`` of the given layers by DSLA modules over the same q/k/v/o, in place.

    ``weights``: a DSLA checkpoint dir (its config is used and must cover every layer), or a dict
    layer -> state dict of DSLA parameters, or None for fresh (undistilled) layers.
    Already converted layers are left as they are. Returns the DSLA module of every given layer.
    """
    check_architecture(model.config)
    layer_ids = check_layers(model, layers)
    if isinstance(weights, (str, Path)):
        manifest = read_manifest(weights, model)
        config = DSLAConfig.from_dict(manifest["dsla_config"])
        missing = [i for i in layer_ids if str(i) not in manifest["layers"]]
        if missing:
            raise CheckpointError(
                f"{weights} has no weights for layers {missing} (it has {sorted(map(int, manifest['layers']))})"
            )
        weights = {i: load_layer(weights, manifest, i) for i in layer_ids}
    out = {}
    for i in layer_ids:
        decoder = decoder_layers(model)[i]
        if isinstance(decoder.self_attn, DSLAAttention):
            out[i] = decoder.self_attn
            continue
        dsla = DSLAAttention(decoder.self_attn, model.config, i, config)
        dsla.to(decoder.self_attn.q_proj.weight.device)
        if weights is not None and i in weights:
            load_dsla_state(dsla, weights[i])
        dsla.__dict__["replaced"] = decoder.self_attn  # kept outside the module tree, for revert
        decoder.self_attn = dsla
        out[i] = dsla
    return out


def revert(model: nn.Module, layers: Iterable[int] | None = None) -> None:
    """Put the original attention back in the given (default: all) converted layers, in place."""
    for i in check_layers(model, converted_layers(model) if layers is None else layers):
        decoder = decoder_layers(model)[i]
        if isinstance(decoder.self_attn, DSLAAttention):
            decoder.self_attn = decoder.self_attn.replaced


def load_dsla_state(dsla: DSLAAttention, state: dict[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in dsla.dsla_parameters().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise CheckpointError(f"layer {dsla.layer_idx}: DSLA tensors {got} do not match this model's {expected}")
    params = dsla.dsla_parameters()
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture plus a hash of every layer's q/k/v/o weights (which DSLA reuses).

    Weights are hashed after rounding to bfloat16, so a float32 and a bfloat16 copy of the same
    model share a fingerprint while any other model does not.
    """
    c = model.config
    arch = {
        "model_type": c.model_type,
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "vocab_size": c.vocab_size,
    }
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for i in range(len(decoder_layers(model))):
        attn = original_attention(model, i)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(attn, name).weight.detach().to("cpu", torch.bfloat16).contiguous()
            h.update(w.view(torch.int16).numpy().tobytes())
    return {**arch, "sha256": h.hexdigest()}


def save_dsla(
    path: str | Path, model: nn.Module, layers: Iterable[int] | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write the DSLA parameters of the given (default: all converted) layers plus a manifest.

    Layers already in an existing manifest for the same base model are kept (so a distillation
    run can add layers one by one); ``extra`` is merged into the manifest's top level.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layer_ids = check_layers(model, converted_layers(model) if layers is None else layers)
    modules = {i: decoder_layers(model)[i].self_attn for i in layer_ids}
    if any(not isinstance(m, DSLAAttention) for m in modules.values()):
        raise ValueError(
            f"layers {[i for i, m in modules.items() if not isinstance(m, DSLAAttention)]} are not converted"
        )
    fingerprint = base_fingerprint(model)
    manifest: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "layers": {}}
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path, fingerprint=fingerprint)
    configs = {m.config for m in modules.values()}
    if len(configs) > 1:
        raise ValueError("layers saved together must share one DSLA config")
    config = configs.pop() if configs else DSLAConfig()
    if manifest["layers"] and DSLAConfig.from_dict(manifest["dsla_config"]) != config:
        raise CheckpointError(f"{path} holds layers of another DSLA config: {manifest.get('dsla_config')}")
    manifest.update(base_model=fingerprint, dsla_config=config.to_dict())
    replaced = []
    for i, m in modules.items():
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in m.dsla_parameters().items()}
        old = manifest["layers"].get(str(i), {}).get("file")
        # a layer the manifest already lists is written under a new name and swapped in with the manifest,
        # so a crash at any point leaves a manifest whose files all match it
        file = f"layer_{i}.safetensors" if old != f"layer_{i}.safetensors" else f"layer_{i}.b.safetensors"
        save_file(tensors, str(path / file), metadata={"layer": str(i), "base_sha256": fingerprint["sha256"]})
        manifest["layers"][str(i)] = {
            "file": file,
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "sha256": hashlib.sha256((path / file).read_bytes()).hexdigest(),
        }
        if old and old != file:
            replaced.append(path / old)
    manifest.update(extra or {})
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(path / MANIFEST)
    for f in replaced:
        f.unlink(missing_ok=True)
    return path


def read_manifest(
    path: str | Path, model: nn.Module | None = None, fingerprint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read and check a manifest against ``model`` (or a precomputed fingerprint)."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path} is not a DSLA checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is corrupted: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format version {manifest.get('version')}, this dsla-serve reads {FORMAT_VERSION}"
        )
    if model is not None or fingerprint is not None:
        fingerprint = fingerprint or base_fingerprint(model)
        theirs = manifest.get("base_model", {})
        if theirs != fingerprint:
            diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
            raise CheckpointError(
                f"{path} was made for another base model (differs in {', '.join(diff)}): "
                f"it was distilled from {theirs.get('model_type')} with {theirs.get('num_hidden_layers')} layers, "
                f"sha256 {str(theirs.get('sha256'))[:12]}; this model has sha256 {fingerprint['sha256'][:12]}"
            )
    return manifest


def load_layer(path: str | Path, manifest: dict[str, Any], i: int) -> dict[str, torch.Tensor]:
    entry = manifest["layers"][str(i)]
    file = Path(path) / entry["file"]
    if not file.is_file():
        raise CheckpointError(f"{file} (layer {i}) is missing")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{file} (layer {i}) is corrupted: its sha256 does not match the manifest")
    tensors = load_file(str(file))
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if shapes != entry["shapes"]:
        raise CheckpointError(f"{file}: shapes {shapes} differ from the manifest's {entry['shapes']}")
    return tensors


@torch.no_grad()
def calibrate_gains(model: nn.Module, input_ids: torch.Tensor, layers: Iterable[int] | None = None) -> None:
    """Set each DSLA layer's output gain to the per-channel RMS of its attention's output on ``input_ids``.

    RMS-normalised read-outs have unit scale; attention outputs do not. Starting from the attention's
    own scale makes an undistilled layer start close to it (the base model runs all-attention here).
    """
    layer_ids = converted_layers(model) if layers is None else check_layers(model, layers)
    dsla = {i: decoder_layers(model)[i].self_attn for i in layer_ids}
    revert(model, layer_ids)
    stats: dict[int, torch.Tensor] = {}
    hooks = []
    for i, m in dsla.items():

        def hook(mod, args, i=i, heads=m.num_heads):
            x = args[0].float().reshape(-1, heads, args[0].shape[-1] // heads)  # (tokens, Hq, D)
            stats[i] = x.pow(2).mean(0).sqrt()

        hooks.append(m.o_proj.register_forward_pre_hook(hook))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for i, m in dsla.items():
            decoder_layers(model)[i].self_attn = m
    for i, m in dsla.items():
        m.gain.copy_(stats[i].clamp(min=1e-3).to(m.gain.dtype))
