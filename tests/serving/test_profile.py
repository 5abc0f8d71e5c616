"""Speed profiles: from bench JSON, the decode split into shared and own cost, interpolation by level
and length, quality ratios, the cache keyed by model and machine, and ``dsla-serve profile`` on a tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dsla_serve.cli import app
from dsla_serve.model.loader import load_base
from dsla_serve.runtime import ISA_FLAGS
from dsla_serve.serving.profile import (
    Profile,
    ProfileError,
    fingerprint_of,
    load,
    machine_key,
    profile_path,
    resolve,
    save,
    this_machine,
)


def bench_json() -> dict:
    """What `dsla-serve bench all --json` writes (our engine's rows, plus a baseline's to be ignored)."""
    ours = {"engine": "dsla-serve"}
    prefill = [ours | {"suite": "prefill", "level": lv, "context": n, "batch": 1, "median_s": n * 1e-3 * (1 - lv)}
               for lv in (0.0, 0.5) for n in (1000, 2000)]  # fmt: skip
    decode = [ours | {"suite": "decode", "level": lv, "context": c, "batch": 1, "median_s": 0.05 + 1e-5 * c * (1 - lv)}
              for lv in (0.0, 0.5) for c in (1000, 3000)]  # fmt: skip
    decode += [ours | {"suite": "decode", "level": 0.0, "context": 2000, "batch": 4, "median_s": 0.05 + 4 * 0.02}]
    decode += [{"suite": "decode", "engine": "hf-generate", "level": 0.0, "context": 1000, "batch": 1, "median_s": 9}]
    return {"model": "m", "machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "t"},
            "settings": {"dtype": "float32"}, "prefill": prefill, "decode": decode}  # fmt: skip


def test_profile_from_bench_json_interpolates_by_level_and_length():
    p = Profile.from_json(bench_json(), "bench.json")
    assert p.prefill_s(0.0, 1500) == pytest.approx(1.5) and p.prefill_s(0.5, 1000) == pytest.approx(0.5)
    assert p.prefill_s(0.25, 1000) == pytest.approx(0.75)  # linear between measured levels
    assert p.prefill_s(0.0, 4000) == pytest.approx(4.0)  # beyond the last length: the last segment's slope
    assert p.prefill_s(0.0, 500, start=1000) == pytest.approx(0.5)  # a chunk of a longer prompt
    # batch 4 at 2000 tokens: 0.13 s against 0.07 s alone -> own 0.02 s per sequence, shared 0.05 s
    assert p.decode_shared_s(0.0) == pytest.approx(0.05) and p.decode_own_s(0.0, 2000) == pytest.approx(0.02)
    assert p.step_s([(0.0, 2000)] * 3) == pytest.approx(0.05 + 3 * 0.02) and p.step_s([]) == 0
    assert p.decode_own_s(0.5, 3000) == pytest.approx(0.015)  # the only batch point's shared part, for all levels
    assert p.ppl_ratio(0.5) is None and p.meta["machine_key"] == machine_key(bench_json()["machine"], "float32")
    with pytest.raises(ProfileError, match="level 0"):
        Profile([{"level": 0.5, "tokens": 10, "s": 1.0}], [{"level": 0.5, "context": 10, "batch": 1, "s": 1.0}])
    with pytest.raises(ProfileError, match=r"x\.json: not a profile"):
        Profile.from_json({"kind": "dsla-serve profile"}, "x.json")


def test_save_load_and_resolve_from_the_cache(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("DSLA_SERVE_CACHE", str(tmp_path / "cache"))
    quality = tmp_path / "ppl.json"
    quality.write_text(json.dumps({"levels": [{"conversion": 0.0, "ppl": 10.0}, {"conversion": 0.5, "ppl": 13.0}]}))
    assert resolve("auto", tiny, "float32") is None  # nothing cached yet: the server runs without one
    p = Profile.from_json(bench_json())
    older = {**this_machine(), "engine_version": "0" * 12}  # measured with another version of the engine: unused
    save(p, profile_path(fingerprint_of(tiny), machine_key(older, "float32")))
    assert this_machine()["engine_version"] != older["engine_version"] and resolve("auto", tiny, "float32") is None
    isa = this_machine()["isa"]
    assert set(isa) <= set(ISA_FLAGS)
    other_isa = {
        **this_machine(),
        "isa": [f for f in isa if f != "amx_bf16"] if "amx_bf16" in isa else [*isa, "amx_bf16"],
    }
    assert machine_key(other_isa, "float32") != machine_key(this_machine(), "float32")
    path = save(p, profile_path(fingerprint_of(tiny), machine_key(this_machine(), "float32")))
    found = resolve("auto", tiny, "float32", quality)
    assert found.prefill == p.prefill and found.decode == p.decode
    assert found.ppl_ratio(0.25) == pytest.approx(1.15) and found.summary()["quality_source"] == str(quality)
    assert resolve("auto", tiny, "bfloat16") is None  # another dtype is another machine key
    assert resolve("none", tiny, "float32") is None
    assert load(path).to_json()["prefill"] == p.prefill  # round trip
    with pytest.raises(ProfileError, match="cannot read"):
        resolve(str(tmp_path / "missing.json"), tiny, "float32")


def test_profile_command_measures_a_tiny_model_into_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DSLA_SERVE_CACHE", str(tmp_path))
    quality = tmp_path / "ppl.json"
    quality.write_text(json.dumps({"levels": [{"conversion": 0.0, "ppl": 4.0}, {"conversion": 1.0, "ppl": 6.0}]}))
    args = ["profile", "--model", str(tiny_checkpoint), "--weights", "none", "--dtype", "float32", "--levels", "0,0.5", "--contexts",
            "16,48", "--batch", "2", "--batch-context", "16", "--decode-tokens", "2", "--warm-up", "0.2", "--quality",
            str(quality)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    base = load_base(str(tiny_checkpoint)).model
    p = resolve("auto", base, "float32")  # what `dsla-serve serve --model ...` finds
    assert p is not None and p.meta["fingerprint"] == fingerprint_of(base)
    assert {(r["level"], r["tokens"]) for r in p.prefill} == {(lv, n) for lv in (0.0, 0.5) for n in (16, 48)}
    assert {(r["context"], r["batch"]) for r in p.decode} == {(16, 1), (48, 1), (16, 2)}
    assert all(r["s"] > 0 for r in p.prefill + p.decode) and p.ppl_ratio(0.5) == pytest.approx(1.25)
    bad = CliRunner().invoke(app, [*args[:-2], "--quality", str(tmp_path / "nope.json")])
    assert bad.exit_code == 2 and "nope.json" in bad.output
