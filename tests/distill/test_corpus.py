"""The multi-domain corpus: each decoder on tiny inputs in the real formats, then a whole build
(mixture caps, manifest, reserved slices kept out of training, deterministic split) and its reading
by ``load_data``. No network: every source is given as an already-unpacked path."""

from __future__ import annotations

import gzip
import json
import struct
import zipfile
import zlib

import pytest
import torch

from dsla_serve.distill.corpus import build_corpus, manifest_digest, parse_weights, sha256_file
from dsla_serve.distill.data import RESERVED_DIR, DataError, is_corpus, is_validation, load_data, to_blocks
from dsla_serve.distill.sources import (
    B64,
    austen_documents,
    bible_documents,
    chitchat_documents,
    foldoc_documents,
    fortune_documents,
    source_documents,
    strip_licence_header,
    tree_files,
    zip_files,
)
from dsla_serve.distill.teacher import corpus_requests

# --- writers of the real formats ----------------------------------------------------------------


def r_int(v: int) -> bytes:
    return struct.pack(">i", v)


def r_char(s: str) -> bytes:
    raw = s.encode()
    return r_int(9 | (1 << 15)) + r_int(len(raw)) + raw  # CHARSXP, UTF-8 flag in the levels


def r_strings(xs: list[str]) -> bytes:
    return r_int(16) + r_int(len(xs)) + b"".join(r_char(x) for x in xs)


def r_named_list(items: dict[str, bytes]) -> bytes:
    """VECSXP with a names attribute: the pairlist (tag 'names', STRSXP) follows the elements."""
    body = r_int(19 | (1 << 9)) + r_int(len(items)) + b"".join(items.values())
    names_attr = r_int(2 | (1 << 10)) + r_int(1) + r_char("names") + r_strings(list(items)) + r_int(254)
    return body + names_attr


def r_serialise(obj: bytes) -> bytes:
    return b"X\n" + r_int(2) + r_int(0x040200) + r_int(0x020300) + obj


def write_rdata(folder, novels: dict[str, list[str]]) -> None:
    """Rdata.rdb (zlib records, 4-byte length first) + a gzip Rdata.rdx index, as R's lazy-load DB."""
    folder.mkdir(parents=True)
    rdb, index = b"", {}
    for name, lines in novels.items():
        raw = r_serialise(r_strings(lines))
        record = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = r_int(13) + r_int(2) + r_int(len(rdb)) + r_int(len(record))
        rdb += record
    idx = r_named_list({"variables": r_named_list(index), "references": r_int(254), "compressed": r_int(10) + r_int(1) + r_int(1)})  # fmt: skip
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(r_serialise(idx)))


def novel(title: str, chapters: int) -> list[str]:
    lines = [title.upper(), "", "VOLUME I", ""]
    for c in range(chapters):
        lines += [
            f"CHAPTER {'I' * (c + 1)}",
            "",
            f"{title} chapter {c} opens with a long",
            "wrapped line of prose.",
            "",
        ]
        lines += [f"A second paragraph of chapter {c} of {title}.", ""]
    return lines


def write_sword(folder, chapters: int) -> None:
    """A zText module: ot.bzz zlib blocks, ot.bzs (offset, size, raw size) and ot.bzv (block, offset, size)."""
    folder.mkdir(parents=True)
    entries = ["", '<div osisID="Gen" sID="b1" type="book"/>']
    for c in range(1, chapters + 1):
        entries.append(f'<chapter n="{c}" osisID="Gen.{c}" sID="Gen.{c}"/>')
        entries.append(f'<w lemma="x">God</w><note placement="foot">a note</note><w>created</w> chapter {c}.')
        entries.append(f'<div sID="p{c}" type="x-p"/>Second verse &amp; more of {c}.')
    block = b"".join(e.encode() for e in entries)
    comp = zlib.compress(block)
    offsets, pos = [], 0
    for e in entries:
        offsets.append(struct.pack("<IIH", 0, pos, len(e.encode())))
        pos += len(e.encode())
    (folder / "ot.bzz").write_bytes(comp)
    (folder / "ot.bzs").write_bytes(struct.pack("<III", 0, len(comp), len(block)))
    (folder / "ot.bzv").write_bytes(b"".join(offsets))


def b64(n: int) -> str:
    digits = ""
    while True:
        digits = B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def write_foldoc(folder, entries: dict[str, str]) -> None:
    folder.mkdir(parents=True)
    body, index = b"", []
    for head, text in {"00-database-short": "   The dictionary", **entries}.items():
        entry = f"{head}\n\n{text}\n\n".encode()
        index.append(f"{head}\t{b64(len(body))}\t{b64(len(entry))}")
        if head == "keyboard":  # a second headword for the same entry
            index.append(f"kbd\t{b64(len(body))}\t{b64(len(entry))}")
        body += entry
    (folder / "foldoc.dict.dz").write_bytes(gzip.compress(body))
    (folder / "foldoc.index").write_text("\n".join(sorted(index)) + "\n")


LICENCE = "/*\n * Copyright (c) 2020 Someone.\n * Licensed under the MIT License.\n */\n"


def write_sources(root) -> dict:
    """Unpacked inputs of every source, in their real formats; returns key -> path."""
    write_rdata(root / "austen", {"emma": novel("Emma", 5), "persuasion": novel("Persuasion", 3)})
    write_sword(root / "bible", 6)
    convs = {f"{i:02x}c0ffee": {"messages": [[{"sender": "u1", "text": f"Hello {i}"}, {"sender": "u1", "text": "hi"}],
                                            [{"sender": "u2", "text": f"Fine thanks, conversation {i}."}]]}
             for i in range(10)}  # fmt: skip
    (root / "chitchat").mkdir()
    (root / "chitchat" / "dataset.json").write_text(json.dumps(convs))
    topics = ["bit", "byte", "compiler", "debugger", "editor", "file", "kernel", "keyboard", "query", "router"]
    write_foldoc(root / "foldoc", {t: f"   <programming> A {t} is a {{thing}} in computing about {t}.\n\n   (2001-02-03)" for t in topics})  # fmt: skip
    (root / "fortunes").mkdir()
    (root / "fortunes" / "wisdom").write_text("\n%\n".join(f"Fortune number {i}.\n\t\t-- Someone" for i in range(12)) + "\n%\n")  # fmt: skip
    (root / "fortunes" / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (root / "fortunes" / "wisdom.u8").symlink_to("wisdom")
    for lang, names in {"cpp": ["vector", "map", "set", "bits/stl_list.h", "bits/a.h", "bits/b.h", "bits/c.h"],
                        "javascript": ["a.js", "b.js", "c.js", "d.js", "x.min.js", "semver/classes/range.js", "e.js"]}.items():  # fmt: skip
        for n in names:
            (root / lang / n).parent.mkdir(parents=True, exist_ok=True)
            (root / lang / n).write_text(LICENCE + f"// {n}: keep this comment\nint f_{len(n)}() {{ return 1; }}\n")
    with zipfile.ZipFile(root / "src.zip", "w") as z:
        for n in ["util/StringJoiner", "util/List", "util/Map", "lang/String", "lang/Math", "io/File", "io/Path"]:
            z.writestr(f"java.base/java/{n}.java", LICENCE + f"package java.{n.split('/')[0]};\nclass {n[5:]} {{}}\n")
        z.writestr("java.desktop/java/awt/Frame.java", "class Frame {}\n")  # outside java.base: skipped
    (root / "pydoc").mkdir()
    for i in range(8):
        (root / "pydoc" / f"page{i}.rst.txt").write_text(f"Page {i}\n======\n\nThe os module, section {i}.\n")
    return {"austen": root / "austen", "bible": root / "bible", "chitchat": root / "chitchat" / "dataset.json",
            "foldoc": root / "foldoc", "fortunes": root / "fortunes", "cpp": root / "cpp",
            "javascript": root / "javascript", "java": root / "src.zip", "pydoc": root / "pydoc"}  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("sources"))


# --- decoders ------------------------------------------------------------------------------------


def test_austen_rdata_chapters_reflowed_and_persuasion_reserved(sources):
    docs = austen_documents(sources["austen"])
    emma = [d for d in docs if d.name.startswith("austen/emma/")]
    assert len(emma) == 6  # the title page, then 5 chapters
    assert "Emma chapter 2 opens with a long wrapped line of prose." in emma[3].text  # lines joined
    assert all(d.reserved == d.name.startswith("austen/persuasion/") for d in docs)
    assert sum(d.reserved for d in docs) == 4


def test_bible_ztext_chapters_without_markup(sources):
    docs = bible_documents(sources["bible"])
    assert [d.name for d in docs] == [f"bible/Gen.{c}" for c in range(1, 7)]
    assert docs[0].text == "God created chapter 1.\nSecond verse & more of 1."  # note dropped, words kept apart


def test_foldoc_entries_clean_and_k_q_reserved(sources):
    docs = {
        d.name: d for d in foldoc_documents(sources["foldoc"] / "foldoc.index", sources["foldoc"] / "foldoc.dict.dz")
    }
    assert "foldoc/00-database-short" not in docs and len(docs) == 10
    assert docs["foldoc/bit"].text == "bit\n\nA bit is a thing in computing about bit."  # tag, braces, date gone
    assert {n for n, d in docs.items() if d.reserved} == {"foldoc/kernel", "foldoc/keyboard", "foldoc/query"}


def test_fortunes_chitchat_and_licence_headers(sources):
    fortunes = fortune_documents(sources["fortunes"])
    assert len(fortunes) == 12 and fortunes[0].text == "Fortune number 0.\n\t\t-- Someone"  # no .dat, no link
    chats = {d.name: d for d in chitchat_documents(sources["chitchat"])}
    assert chats["chitchat/01c0ffee"].text == "A: Hello 1\nA: hi\nB: Fine thanks, conversation 1."
    assert {n for n, d in chats.items() if d.reserved} == {"chitchat/00c0ffee"}
    gcc = "// <vector> -*- C++ -*-\n\n// Copyright (C) 2001 FSF\n//\n// GNU General Public License\n\n#include <x>\n"
    assert strip_licence_header(gcc) == "// <vector> -*- C++ -*-\n\n#include <x>\n"
    assert strip_licence_header("#!/usr/bin/env node\n" + LICENCE + "run()\n") == "#!/usr/bin/env node\nrun()\n"
    js = source_documents(tree_files(sources["javascript"], "*.js", (".min.js",)), "javascript", ["semver/classes/range.js"])  # fmt: skip
    assert len(js) == 6 and all("Copyright" not in d.text and "keep this comment" in d.text for d in js)
    assert [d.name for d in js if d.reserved] == ["javascript/semver/classes/range.js"]
    java = source_documents(zip_files(sources["java"], "java.base/", ".java"), "java")
    assert len(java) == 7 and java[0].text.startswith("package java.")


# --- the build -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(sources, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    manifest = build_corpus(out, tokenizer, tokens=60, weights={"java": 0.5, "cpp": 0}, val_percent=40,
                            val_tokens=10_000, given=sources, command="test")  # fmt: skip
    return out, manifest


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_layout_caps_and_manifest(built, sources):
    out, manifest = built
    assert is_corpus(out) and not (out.parent / "corpus.partial").exists()
    domains = ["prose", "dialogue", "encyclopedia", "fortunes", "javascript", "java", "python_docs"]
    assert list(manifest["domains"]) == domains  # cpp: weight 0, dropped
    for d in domains:
        train, val = rows(out / d / "train.jsonl"), rows(out / d / "val.jsonl")
        cap = round(60 * manifest["weights"][d])
        assert train and val and manifest["domains"][d]["train"]["tokens"] == sum(r["tokens"] for r in train)
        assert sum(r["tokens"] for r in train[:-1]) < cap  # documents taken only until the cap is reached
        assert all(is_validation(r["name"], 40) for r in val) and not any(is_validation(r["name"], 40) for r in train)
    assert manifest["weights"]["python_docs"] == 0.8 and manifest["weights"]["java"] == 0.5
    assert manifest["sources"]["java"]["sha256"] == sha256_file(sources["java"])
    written = json.loads((out / "manifest.json").read_text())
    assert written["manifest_sha256"] == manifest_digest(written)
    assert set(manifest["domains"]["prose"]["sources"]) == {"austen", "bible"}


def test_reserved_slices_never_in_training(built):
    out, manifest = built
    names = {r["name"] for p in out.glob("*/*.jsonl") if p.parent.name != RESERVED_DIR for r in rows(p)}
    reserved = {r["name"] for p in (out / RESERVED_DIR).glob("*.jsonl") for r in rows(p)}
    assert {"chitchat/00c0ffee", "foldoc/kernel", "foldoc/query", "javascript/semver/classes/range.js",
            "java/java.base/java/util/StringJoiner.java", "austen/persuasion/001"} <= reserved  # fmt: skip
    assert not names & reserved
    assert not any(n.startswith(("austen/persuasion", "foldoc/k", "foldoc/q", "chitchat/00")) for n in names)
    assert manifest["reserved"]["slices"]["foldoc"]["documents"] == 3


def test_build_is_deterministic(built, sources, tokenizer, tmp_path):
    out, manifest = built
    again = build_corpus(tmp_path / "c", tokenizer, tokens=60, weights={"java": 0.5, "cpp": 0}, val_percent=40,
                         val_tokens=10_000, given=sources, command="test")  # fmt: skip
    for d in manifest["domains"]:
        for split in ("train", "val"):
            assert (tmp_path / "c" / d / f"{split}.jsonl").read_bytes() == (out / d / f"{split}.jsonl").read_bytes()
    with pytest.raises(DataError, match="unknown domains"):
        build_corpus(tmp_path / "d", tokenizer, weights={"poetry": 1.0}, given=sources)
    with pytest.raises(DataError, match="DOMAIN=FACTOR"):
        parse_weights(["java:0.5"])
    assert not (tmp_path / "d").exists() and again["train_tokens"] == manifest["train_tokens"]


def test_load_data_honours_the_corpus_split(built, tokenizer):
    out, manifest = built
    data = load_data(out, tokenizer, seq_len=16, val_percent=50)
    val_ids = []
    for d in manifest["domains"]:
        for r in rows(out / d / "val.jsonl"):
            val_ids += [*tokenizer(r["text"], add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    # every val block comes from the corpus's val files (val_percent is ignored for a corpus)
    val_text = torch.tensor(val_ids)
    for block in data.val:
        assert any(torch.equal(val_text[i : i + 16], block) for i in range(len(val_text) - 15))
    assert data.documents == sum(v["train"]["documents"] + v["val"]["documents"] for v in manifest["domains"].values())
    assert torch.equal(load_data(out, tokenizer, seq_len=16).train, data.train)  # val_percent plays no part
    # training blocks of each domain are spread evenly: any prefix holds the build's mixture
    owner = {}
    for d in manifest["domains"]:
        for block in to_blocks([r["text"] for r in rows(out / d / "train.jsonl")], tokenizer, 16):
            owner[tuple(block.tolist())] = d
    order = [owner[tuple(b.tolist())] for b in data.train]
    half = order[: len(order) // 2]
    for d in manifest["domains"]:
        assert abs(half.count(d) - order.count(d) / 2) <= 1, (d, half.count(d), order.count(d))
    requests = corpus_requests(out)
    assert len(requests) == sum(min(200, v["train"]["documents"]) for v in manifest["domains"].values())
    assert any("Fortune number" in r for r in requests) and any("class " in r for r in requests)


def test_cli_builds_from_given_sources(sources, tmp_path):
    from tests.test_cli import run_cli

    given = ["--source", f"fortunes={sources['fortunes']}", "--source", f"pydoc={sources['pydoc']}"]
    out = json.loads(run_cli("data", "corpus", "--out", str(tmp_path / "c"), "--only", "fortunes,pydoc", "--tokens",
                             "50", "--weight", "fortunes=2", "--val-percent", "40", *given).stdout)  # fmt: skip
    assert set(out["domains"]) == {"fortunes", "python_docs"} and is_corpus(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["weights"]["fortunes"] == 2.0 and manifest["sources"]["fortunes"]["version"] == "given"
    bad = run_cli("data", "corpus", "--out", str(tmp_path / "d"), "--source", "poems=/x", check=False)
    assert bad.returncode == 2 and "poems" in bad.stderr and not (tmp_path / "d").exists()


def test_teacher_prompts_from_the_corpus(built, tokenizer, tmp_path):
    from dsla_serve.distill.teacher import generate_samples
    from dsla_serve.model import HybridModel
    from tests.conftest import tiny_llama
    from tests.test_cli import run_cli

    out, _ = built
    model = HybridModel(tiny_llama(vocab_size=len(tokenizer)))
    generate_samples(model, tokenizer, 20, tmp_path, batch=2, max_new=4, requests=corpus_requests(out))
    samples = rows(tmp_path / "teacher.jsonl")
    openings = [r["text"][:20] for p in out.glob("*/train.jsonl") for r in rows(p)]
    assert len(samples) >= 2 and all(any(o in s["text"] for o in openings) for s in samples)
    bad = run_cli("data", "teacher", "--out", str(tmp_path), "--prompts-from", str(tmp_path), check=False)
    assert bad.returncode == 2 and "not a `dsla-serve data corpus`" in bad.stderr
