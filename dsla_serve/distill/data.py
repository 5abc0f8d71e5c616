"""Training and validation text: local files tokenised into fixed-length blocks, split by document.

Accepted sources: a .txt/.md/.rst file, a .jsonl file (a "text" field per line), a .parquet file
(a "text" column), a directory of any of them (recursive, sorted), ``hf:NAME[:SPLIT]`` for a
Hugging Face dataset (needs the ``datasets`` package and a network), or several of these joined
by commas.

Offline English text on Debian machines: the reST sources of the Python documentation
(``fetch_python_docs``; PSF licence), ~11 MB and ~2.7 M tokens; and a multi-domain corpus built by
``dsla-serve data corpus`` (``corpus.py``): a directory of ``<domain>/{train,val}.jsonl`` with a
``manifest.json``, whose own split is used as written and whose domains are interleaved by share.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".md", ".rst")
CORPUS_FORMAT = "dsla-serve corpus 1"  # manifest.json "format" of a `dsla-serve data corpus` directory
RESERVED_DIR = "reserved"  # a corpus's evaluation-only documents: never read as training text
PYDOC_PACKAGE = "python3.11-doc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


class DataError(ValueError):
    """Training data could not be read; the message names the file."""


@dataclass
class TextData:
    train: Tensor  # (N, seq_len) token ids
    val: Tensor  # (M, seq_len)
    fingerprint: str  # sha256 over both splits' tokens and the settings
    source: str
    documents: int

    def describe(self) -> dict:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "documents": self.documents,
            "train_blocks": self.train.shape[0],
            "val_blocks": self.val.shape[0],
            "seq_len": self.train.shape[1],
        }


def fetch_python_docs(out: str | Path) -> Path:
    """Unpack Debian's python3.11-doc reST sources under ``out`` (apt-get download + dpkg -x, no install)."""
    out = Path(out)
    target = out / PYDOC_SOURCES
    if target.is_dir():
        return target
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", PYDOC_PACKAGE], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob(f"{PYDOC_PACKAGE}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(out)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as e:
            raise DataError(f"could not fetch {PYDOC_PACKAGE} with apt-get/dpkg (Debian only): {e}") from e
    if not target.is_dir():
        raise DataError(f"{PYDOC_PACKAGE} did not contain {PYDOC_SOURCES}")
    return target


def read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix in TEXT_SUFFIXES:
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)[text_field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON object with a {text_field!r} field ({e})") from e
        return docs
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path}: no {text_field!r} column (columns: {table.column_names})")
        return [str(x) for x in table.column(text_field).to_pylist() if x]
    raise DataError(f"{path}: unsupported file type (use {', '.join(TEXT_SUFFIXES)}, .jsonl or .parquet)")


def read_documents(source: str | Path, text_field: str = "text") -> list[tuple[str, str]]:
    """(name, text) pairs from a file, a directory or ``hf:NAME[:SPLIT]``."""
    source = str(source)
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as e:
            raise DataError("hf: datasets need the `datasets` package (pip install datasets) and a network") from e
        name, _, split = source[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        return [(f"{name}/{i}", row[text_field]) for i, row in enumerate(ds)]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet"))
        if not files:
            raise DataError(f"{path} holds no .txt/.md/.rst/.jsonl/.parquet files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path} does not exist")
    docs = []
    for f in files:
        name = str(f.relative_to(path)) if path.is_dir() else f.name
        docs += [(f"{name}#{i}", text) for i, text in enumerate(read_file(f, text_field)) if text.strip()]
    return docs


def is_validation(name: str, val_percent: float) -> bool:
    """Deterministic split by document name: the same document always lands on the same side."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10000 < val_percent * 100


def to_blocks(docs: list[str], tokenizer, seq_len: int) -> Tensor:
    """Concatenate documents (EOS between them) and cut into (N, seq_len) blocks; the remainder is dropped."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in docs:
        ids += [*tokenizer(text, add_special_tokens=False).input_ids, eos]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_data(
    source: str | Path,
    tokenizer,
    seq_len: int = 1024,
    val_percent: float = 5.0,
    max_train_blocks: int | None = None,
    max_val_blocks: int | None = None,
    seed: int = 0,
    text_field: str = "text",
) -> TextData:
    """Tokenised blocks of held-in and held-out documents; training blocks shuffled with ``seed``.

    ``source`` may list several sources separated by commas: each is split and cut into blocks on
    its own (a document lands on the same side as when its source is used alone), and the blocks
    of the sources alternate, so a small source is not drowned by a large one.
    """
    gen = torch.Generator().manual_seed(seed)
    trains, vals, count = [], [], 0
    for part in [s for s in str(source).split(",") if s]:
        if is_corpus(part):
            train, val, n = corpus_blocks(part, tokenizer, seq_len, gen)
            trains.append(train)
            vals.append(val)
            count += n
            continue
        docs = read_documents(part, text_field)
        count += len(docs)
        train_docs = [t for n, t in docs if not is_validation(n, val_percent)]
        val_docs = [t for n, t in docs if is_validation(n, val_percent)]
        if not val_docs or not train_docs:
            raise DataError(f"{part}: {len(docs)} documents give an empty train or validation split; add more text")
        train, val = to_blocks(train_docs, tokenizer, seq_len), to_blocks(val_docs, tokenizer, seq_len)
        if len(train) == 0 or len(val) == 0:
            raise DataError(f"{part}: too little text for one {seq_len}-token block per split")
        trains.append(train[torch.randperm(len(train), generator=gen)])
        vals.append(val)
    train, val = interleave(trains)[:max_train_blocks], interleave(vals)[:max_val_blocks]
    h = hashlib.sha256(f"{seq_len}:{val_percent}:{seed}".encode())
    h.update(train.numpy().tobytes())
    h.update(val.numpy().tobytes())
    return TextData(train, val, h.hexdigest(), str(source), count)


def interleave(parts: list[Tensor]) -> Tensor:
    """Blocks of several sources in turn (a, b, a, b, ..., then the rest of the longer ones)."""
    rows = [p[i] for i in range(max(len(p) for p in parts)) for p in parts if i < len(p)]
    return torch.stack(rows)


def is_corpus(path: str | Path) -> bool:
    """A directory written by ``dsla-serve data corpus`` (its manifest names the format)."""
    manifest = Path(path).expanduser() / "manifest.json"
    try:
        return manifest.is_file() and json.loads(manifest.read_text()).get("format") == CORPUS_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def corpus_split(path: str | Path, split: str) -> dict[str, list[str]]:
    """Texts of one split ("train" or "val") per domain of a corpus, in the manifest's domain order."""
    path = Path(path).expanduser()
    domains = json.loads((path / "manifest.json").read_text())["domains"]
    out = {}
    for domain in domains:
        file = path / domain / f"{split}.jsonl"
        if not file.is_file():
            raise DataError(f"{file} is missing (the manifest lists domain {domain!r}); rebuild the corpus")
        out[domain] = read_file(file, "text")
    return out


def corpus_blocks(path: str | Path, tokenizer, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """A corpus's train blocks (shuffled per domain, spread by share) and val blocks (domains in turn).

    Spreading block i of a domain with n blocks at (i + 0.5) / n keeps every prefix of the training
    blocks at the mixture the build's weights chose, so --train-blocks N samples all domains.
    """
    trains, vals, count = {}, {}, 0
    for split, into in (("train", trains), ("val", vals)):
        for domain, texts in corpus_split(path, split).items():
            count += len(texts)
            into[domain] = to_blocks(texts, tokenizer, seq_len)
            if len(into[domain]) == 0:
                raise DataError(f"{path}/{domain}/{split}.jsonl: too little text for one {seq_len}-token block")
    keyed = []
    for d, blocks in enumerate(trains.values()):
        blocks = blocks[torch.randperm(len(blocks), generator=gen)]
        keyed += [((i + 0.5) / len(blocks), d, blocks[i]) for i in range(len(blocks))]
    train = torch.stack([b for *_, b in sorted(keyed, key=lambda x: x[:2])])
    return train, interleave(list(vals.values())), count


def corpus_val_blocks(
    path: str | Path, tokenizer, seq_len: int, max_blocks: int, domains: list[str] | None = None
) -> dict[str, Tensor]:
    """Each domain's held-out blocks (N <= max_blocks, seq_len), for per-domain evaluation."""
    out = {}
    for domain, texts in corpus_split(path, "val").items():
        if domains and domain not in domains:
            continue
        out[domain] = to_blocks(texts, tokenizer, seq_len)[:max_blocks]
        if len(out[domain]) == 0:
            raise DataError(f"{path}/{domain}/val.jsonl: too little text for one {seq_len}-token block")
    if domains and (missing := sorted(set(domains) - set(out))):
        raise DataError(f"{path} has no domains {missing} (it has {sorted(corpus_split(path, 'val'))})")
    return out


def cached_python_docs() -> Path:
    """Python docs under the dsla-serve cache dir, fetched on first use."""
    from dsla_serve.model.loader import cache_dir

    out = cache_dir() / "data" / "pydoc"
    try:
        return fetch_python_docs(out)
    except DataError:
        shutil.rmtree(out, ignore_errors=True)
        raise
