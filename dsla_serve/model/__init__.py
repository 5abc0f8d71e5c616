"""Loading, converting and running hybrid attention/DSLA models."""

from dsla_serve.model.cache import HybridCache, KVLayer, SequenceCache, StateLayer
from dsla_serve.model.convert import (
    CheckpointError,
    base_fingerprint,
    calibrate_gains,
    convert,
    converted_layers,
    read_manifest,
    revert,
    save_dsla,
)
from dsla_serve.model.hybrid import HybridModel
from dsla_serve.model.loader import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_base

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "HybridCache",
    "HybridModel",
    "KVLayer",
    "LoadedModel",
    "ModelLoadError",
    "SequenceCache",
    "StateLayer",
    "base_fingerprint",
    "calibrate_gains",
    "convert",
    "converted_layers",
    "load_base",
    "read_manifest",
    "revert",
    "save_dsla",
]
