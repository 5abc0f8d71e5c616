"""The command line on the embedded default model, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dsla_serve.model import HybridModel
from dsla_serve.ops import native


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dsla_serve.cli", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_embedded_all_attention_hybrid_equals_hugging_face(embedded):
    tok = embedded.tokenizer
    ids = tok("The lighthouse keeper wrote down the weather every evening.", return_tensors="pt").input_ids
    logits, _ = HybridModel(embedded.model)(ids)
    ref = embedded.model(ids, use_cache=False).logits
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conversion", ["0", "0.5"])
def test_generate_smoke(conversion):
    out = json.loads(run_cli("generate", "--prompt", "The capital of France is", "--conversion", conversion,
                             "--max-tokens", "8", "--json").stdout)  # fmt: skip
    assert set(out) >= {"text", "prompt_tokens", "completion_tokens", "prefill_s", "decode_ms_per_token",
                        "cache_bytes", "dsla_layers"}  # fmt: skip
    assert out["prompt_tokens"] == 5 and 1 <= out["completion_tokens"] <= 8
    assert len(out["dsla_layers"]) == (15 if conversion == "0.5" else 0)
    assert out["cache_bytes"] > 0 and out["prefill_s"] > 0
    if conversion == "0":
        assert "Paris" in out["text"]


def test_generate_plain_output_and_bad_input():
    proc = run_cli("generate", "--prompt", "Hi", "--dsla-layers", "0,29", "--max-tokens", "3")
    assert "ms/tok" in proc.stderr and "DSLA layers [0, 29]" in proc.stderr
    bad = run_cli("generate", "--prompt", "Hi", "--dsla-layers", "0,30", check=False)
    assert bad.returncode == 2 and "out of range" in bad.stderr
    both = run_cli("generate", "--prompt", "Hi", "--dsla-layers", "1", "--conversion", "0.5", check=False)
    assert both.returncode == 2 and "not both" in both.stderr


def test_bench_kernel_window_and_decode_attention_json():
    out = json.loads(run_cli("bench", "kernel", "--seq-len", "200", "--heads", "3", "--repeats", "2", "--window", "32",
                             "--decode-batch", "3", "--json").stdout)  # fmt: skip
    assert out["shape"]["window"] == 32 and out["decode_attention_ms"]["batch"] == 3
    assert all(out["decode_attention_ms"][k] > 0 for k in ("per_sequence_rows", "padded_batch"))


def test_bench_kernel_json():
    out = json.loads(run_cli("bench", "kernel", "--seq-len", "200", "--heads", "3", "--repeats", "2", "--json").stdout)
    assert out["shape"]["seq_len"] == 200
    assert out["chunk_dsla_s"] > 0 and out["sdpa_causal_s"] > 0 and out["naive_dsla_s"] > 0
    assert out["speedup_vs_sdpa"] == pytest.approx(out["sdpa_causal_s"] / out["chunk_dsla_s"])
    if native.available():  # the C++ scan is timed where it is built, and absent from the report otherwise
        assert out["scan_dsla_s"] > 0
        assert out["scan_speedup_vs_sdpa"] == pytest.approx(out["sdpa_causal_s"] / out["scan_dsla_s"])
    else:
        assert out["scan_dsla_s"] is None


def test_demote_rewrites_a_checkpoints_order_and_keeps_its_history(tmp_path):
    from dsla_serve.model.pretrained import shipped_checkpoint

    manifest = json.loads((shipped_checkpoint(None) / "manifest.json").read_text())
    manifest["order"] = before = [29, 25, 27, 22, 9, 10, 13, 11, 28, 12, 26, 6, *range(6), *range(14, 22), 7, 8, 23, 24]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    run_cli("demote", "9,11", "--checkpoint", str(tmp_path), "--past", "8", "--reason", "test")
    after = json.loads((tmp_path / "manifest.json").read_text())
    assert after["order"][:8] == [i for i in before if i not in (9, 11)][:8]
    assert set(after["order"][:10]) == set([i for i in before if i not in (9, 11)][:8]) | {9, 11}
    assert after["order_history"][-1]["order"] == before and after["order_history"][-1]["reason"] == "test"
    bad = run_cli("demote", "9,99", "--checkpoint", str(tmp_path), "--past", "8", "--reason", "x", check=False)
    assert bad.returncode == 2 and "distinct layers of the order" in bad.stderr
    assert json.loads((tmp_path / "manifest.json").read_text()) == after  # a refused change writes nothing
