"""Decoders for the corpus's sources: each turns an unpacked package into named plain-text documents.

Every extractor takes the already-unpacked file or directory (so tests can point it at tiny fake
inputs) and returns ``Document``s. A document's name is stable across builds: it decides the
held-out split (by hash) and, with ``reserved``, which documents are evaluation-only.

Formats: R lazy-load databases (``Rdata.rdb``/``.rdx``: zlib records of R-serialised objects),
SWORD zText Bible modules (zlib blocks + little-endian index files, OSIS markup), dictd
dictionaries (``.dict.dz`` gzip + a tab-separated index with base-64 offsets), fortune files
(entries split by ``%`` lines), a JSON dialogue dataset and source trees (licence headers removed).
"""

from __future__ import annotations

import bz2
import gzip
import html
import json
import lzma
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


class SourceError(ValueError):
    """A source file is missing or not in the expected format; the message names it."""


@dataclass(frozen=True)
class Document:
    name: str  # stable, e.g. "austen/emma/012"; hashed for the train/val split
    text: str
    reserved: bool = False  # evaluation-only: never written to a training split


def reflow(text: str) -> str:
    """Join hard-wrapped lines inside paragraphs (blank-line separated): text as a chat model sees it."""
    paras = (" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if p)


# --- R lazy-load databases (janeaustenr) -------------------------------------------------------

R_NIL, R_REF, R_SYM, R_LIST, R_CHAR, R_LGL, R_INT, R_REAL, R_STR, R_VEC = 254, 255, 1, 2, 9, 10, 13, 14, 16, 19
R_SPECIAL = {242, 241, 253, 252, 251, 250}  # empty/base/global env, unbound, missing arg, base namespace
R_LATIN1 = 1 << 2  # CHARSXP "levels" bit: the bytes are latin-1


class RUnserializer:
    """Reads the subset of R's XDR serialisation (format 2 or 3) that data objects use."""

    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where, self.refs = data, 0, where, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def read(self):
        if self.data[:2] != b"X\n":
            raise SourceError(f"{self.where}: not an R XDR serialisation (starts {self.data[:2]!r})")
        self.pos = 2
        version = self.int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            self.pos += 4 + self.int()  # native encoding name
        elif version != 2:
            raise SourceError(f"{self.where}: R serialisation version {version} is not supported")
        return self.item()

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == R_NIL or kind in R_SPECIAL:
            return None
        if kind == R_REF:
            return self.refs[(flags >> 8) - 1]
        if kind == R_SYM:
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if kind == R_LIST:  # pairlist: attributes, tag, value, rest
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head, rest = self.item(), self.item()
            del attrs
            return [(tag[1] if tag else None, head), *(rest or [])]
        if kind == R_CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & R_LATIN1 else "utf-8", errors="replace")
        if kind in (R_LGL, R_INT):
            n = self.int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == R_REAL:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (R_STR, R_VEC):
            value = [self.item() for _ in range(self.int())]
        else:
            raise SourceError(f"{self.where}: R object type {kind} at byte {self.pos - 4} is not supported")
        if has_attr:
            names = dict(self.item() or []).get("names")
            if kind == R_VEC and names:
                return dict(zip(names, value, strict=True))
        return value


def read_rdata(data_dir: str | Path) -> dict[str, object]:
    """All objects of an R package's ``data/Rdata.rdb`` (the ``.rdx`` index says where each record is)."""
    data_dir = Path(data_dir)
    rdx_path, rdb_path = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    for p in (rdx_path, rdb_path):
        if not p.is_file():
            raise SourceError(f"{p} does not exist")
    raw_index = rdx_path.read_bytes()
    try:  # saved gzip-compressed (R's gzfile); plain zlib accepted too
        raw_index = gzip.decompress(raw_index) if raw_index[:2] == b"\x1f\x8b" else zlib.decompress(raw_index)
    except (OSError, EOFError, zlib.error) as e:
        raise SourceError(f"{rdx_path}: not a compressed R index ({e})") from e
    index = RUnserializer(raw_index, str(rdx_path)).read()
    if not isinstance(index, dict) or "variables" not in index:
        raise SourceError(f"{rdx_path}: no 'variables' index")
    compressed = (index.get("compressed") or [1])[0]
    rdb = rdb_path.read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[offset : offset + length]  # 4-byte big-endian raw length, then the compressed bytes
        try:
            if compressed in (2, 3):  # bzip2 / xz carry a one-byte type tag after the length
                tag, body = record[4:5], record[5:]
                raw = bz2.decompress(body) if tag == b"2" else lzma.decompress(body) if tag == b"X" else body
            else:
                raw = zlib.decompress(record[4:])
        except (zlib.error, OSError, lzma.LZMAError) as e:
            raise SourceError(f"{rdb_path}: record {name!r} does not decompress ({e})") from e
        objects[name] = RUnserializer(raw, f"{rdb_path}:{name}").read()
    return objects


CHAPTER = re.compile(r"^\s*chapter\s+[0-9ivxlcdm]+\.?\s*$", re.IGNORECASE)


def austen_documents(data_dir: str | Path, reserved_novels: Iterable[str] = ("persuasion",)) -> list[Document]:
    """One document per chapter of each novel (character vectors, one element per line)."""
    docs = []
    for novel, lines in sorted(read_rdata(data_dir).items()):
        if not isinstance(lines, list) or not all(isinstance(x, (str, type(None))) for x in lines):
            continue
        chapters: list[list[str]] = [[]]
        for line in lines:
            if line and CHAPTER.match(line):
                chapters.append([])
            chapters[-1].append(line or "")
        for i, chapter in enumerate(chapters):
            text = reflow("\n".join(chapter))
            if text:
                docs.append(Document(f"austen/{novel}/{i:03d}", text, novel in reserved_novels))
    return docs


# --- SWORD zText (World English Bible) ---------------------------------------------------------


def bible_documents(module_dir: str | Path) -> list[Document]:
    """One document per chapter; OSIS markup stripped, notes dropped, paragraphs and verse lines kept."""
    module_dir = Path(module_dir)
    entries = []
    for testament in ("ot", "nt"):
        paths = [module_dir / f"{testament}.{ext}" for ext in ("bzs", "bzz", "bzv")]
        if not all(p.is_file() for p in paths):
            continue
        bzs, bzz, bzv = (p.read_bytes() for p in paths)
        # bzs: per block (offset, compressed size, raw size) as <III; bzv: per entry (block, offset, size) as <IIH
        blocks = [zlib.decompress(bzz[o : o + c]) for o, c, _ in struct.iter_unpack("<III", bzs)]
        entries += [blocks[b][o : o + n].decode("utf-8", "replace") for b, o, n in struct.iter_unpack("<IIH", bzv) if n]
    if not entries:
        raise SourceError(f"{module_dir}: no ot/nt .bzs/.bzz/.bzv files (a SWORD zText module)")
    docs, name, parts = [], None, []
    for raw in entries:
        for piece in re.split(r'(<chapter\b[^>]*\bsID="[^"]*"[^>]*/>)', raw):
            m = re.match(r'<chapter\b[^>]*\bosisID="([^"]+)"', piece)
            if m:
                if name and parts:
                    docs.append(Document(f"bible/{name}", osis_text(" ".join(parts))))
                name, parts = m.group(1), []
            elif name:
                parts.append(piece)
    if name and parts:
        docs.append(Document(f"bible/{name}", osis_text(" ".join(parts))))
    return [d for d in docs if d.text]


def osis_text(raw: str) -> str:
    raw = re.sub(r"<note\b.*?</note>", " ", raw, flags=re.S)  # a note may be the only gap between words
    raw = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\1\n", raw, flags=re.S)
    raw = re.sub(r'<(?:div|p|lg|l)\b[^>]*\bsID="[^"]*"[^>]*/>|<lb\b[^>]*/>', "\n", raw)
    text = html.unescape(re.sub(r"<[^>]+>", "", raw))
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:!?’”])", r"\1", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{2,}", "\n", text).strip()


# --- dictd (FOLDOC) ----------------------------------------------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_number(text: str) -> int:
    """dictd index numbers: base 64, most significant digit first."""
    n = 0
    for ch in text:
        n = n * 64 + B64.index(ch)
    return n


def foldoc_documents(index: str | Path, dict_dz: str | Path, reserved_initials: str = "kq") -> list[Document]:
    """One document per entry (several headwords may share one); a {cross ref} keeps its words.

    Reserved (evaluation-only): entries with any headword starting with one of ``reserved_initials``.
    """
    index, dict_dz = Path(index), Path(dict_dz)
    try:
        body = gzip.decompress(dict_dz.read_bytes())
        lines = index.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError) as e:
        raise SourceError(f"cannot read the dictionary {dict_dz} / {index}: {e}") from e
    heads: dict[tuple[int, int], list[str]] = {}
    for n, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) < 3:
            raise SourceError(f"{index}:{n}: expected 'headword<TAB>offset<TAB>length'")
        if fields[0].startswith("00-database"):
            continue  # dictd's own metadata entries
        heads.setdefault((b64_number(fields[1]), b64_number(fields[2])), []).append(fields[0])
    docs = []
    for (offset, length), words in sorted(heads.items()):
        title, _, rest = body[offset : offset + length].decode("utf-8", "replace").partition("\n")
        text = re.sub(r"<[^<>\n]+>\s*", "", rest)  # <domain> tags
        text = re.sub(r"\{([^{}]*)\}", r"\1", text)  # {cross refs}
        text = re.sub(r"\s*\(\d{4}-\d{2}-\d{2}\)\s*$", "", text)  # trailing "last updated" date
        text = reflow(text)
        if not text:
            continue
        reserved = any(w[:1].lower() in reserved_initials for w in [title.strip(), *words])
        docs.append(Document(f"foldoc/{title.strip()}", f"{title.strip()}\n\n{text}", reserved))
    return docs


# --- fortunes, chit-chat ----------------------------------------------------------------------


def fortune_documents(directory: str | Path) -> list[Document]:
    """One document per fortune; ``*.dat`` indexes, links and sub-directories are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError(f"{directory} is not a directory of fortune files")
    docs = []
    for f in sorted(directory.iterdir()):
        if f.is_symlink() or not f.is_file() or f.suffix in (".dat", ".u8"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for i, entry in enumerate(re.split(r"\n%\n", "\n" + text)):
            entry = entry.strip("\n%")
            if entry.strip():
                docs.append(Document(f"fortunes/{f.name}/{i:05d}", entry.rstrip()))
    return docs


def chitchat_documents(dataset_json: str | Path, reserved_prefix: str = "00") -> list[Document]:
    """One document per conversation, an 'A: ...' / 'B: ...' line per message; ids starting '00' are reserved."""
    path = Path(dataset_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot read {path}: {e}") from e
    docs = []
    for cid, conv in sorted(data.items()):
        speakers: dict[str, str] = {}
        lines = []
        try:
            for turn in conv["messages"]:
                sender = speakers.setdefault(turn[0]["sender"], "AB"[len(speakers) % 2])
                lines += [f"{sender}: {m['text'].strip()}" for m in turn if m["text"].strip()]
        except (KeyError, TypeError, IndexError) as e:
            raise SourceError(f"{path}: conversation {cid!r} is not {{'messages': [[{{sender, text}}]]}} ({e})") from e
        if lines:
            docs.append(Document(f"chitchat/{cid}", "\n".join(lines), cid.startswith(reserved_prefix)))
    return docs


# --- source code ---------------------------------------------------------------------------------

LICENCE_WORDS = re.compile(
    r"copyright|licen[cs]e|permission is hereby granted|SPDX-License|GNU General Public|\bGPL\b|warranty"
    r"|Free Software Foundation|all rights reserved",
    re.IGNORECASE,
)
LEADING_COMMENT = re.compile(r"\A(\s*)(/\*.*?\*/|(?://[^\n]*(?:\n[ \t]*//[^\n]*)*))", re.S)


def strip_licence_header(text: str) -> str:
    """Drop the licence comments before the first line of code (other leading comments stay)."""
    kept, rest = [], text
    prefix = ""
    if rest.startswith("#!"):  # a shebang line stays first
        prefix, _, rest = rest.partition("\n")
        prefix += "\n"
    while m := LEADING_COMMENT.match(rest):
        if not LICENCE_WORDS.search(m.group(2)):
            kept.append(m.group(2))
        rest = rest[m.end() :]
    return prefix + "".join(c + "\n\n" for c in kept) + rest.lstrip("\n")


def source_documents(
    files: Iterable[tuple[str, bytes]], prefix: str, reserved_paths: Iterable[str] = (), max_bytes: int = 200_000
) -> list[Document]:
    """Source files (name, bytes) to documents without licence headers; big (generated) files skipped."""
    reserved = tuple(reserved_paths)
    docs = []
    for name, data in sorted(files):
        if len(data) > max_bytes or b"\0" in data[:4096]:
            continue
        text = strip_licence_header(data.decode("utf-8", errors="replace")).strip()
        if text:
            docs.append(Document(f"{prefix}/{name}", text, name.endswith(reserved)))
    return docs


def tree_files(root: str | Path, pattern: str = "*", skip: tuple[str, ...] = ()) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of the regular files under root matching ``pattern`` (no links followed)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root} is not a directory")
    for p in sorted(root.rglob(pattern)):
        if p.is_file() and not p.is_symlink() and not p.name.endswith(skip):
            yield str(p.relative_to(root)), p.read_bytes()


def zip_files(path: str | Path, under: str, suffix: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the zip members under ``under`` ending in ``suffix`` (a JDK's src.zip)."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                if info.filename.startswith(under) and info.filename.endswith(suffix) and not info.is_dir():
                    yield info.filename, z.read(info)
    except (OSError, zipfile.BadZipFile) as e:
        raise SourceError(f"cannot read {path}: {e}") from e
