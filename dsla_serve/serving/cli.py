"""``dsla-serve serve`` (the OpenAI-compatible server) and ``dsla-serve control`` (manual override of a
running server's conversion level), registered on the main typer app by ``dsla_serve/cli.py``.

dsla-serve serve --policy adaptive --port 8000
dsla-serve control --level 0.5 --convert-running
"""

from __future__ import annotations

import json
import logging

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)  # no hard wraps: logs and pipes read whole lines
log = logging.getLogger("dsla_serve.serve")


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def serve(
    model: str = typer.Option(
        None, help="Base model: checkpoint dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)."
    ),
    weights: str = typer.Option("auto", help="DSLA checkpoint dir; 'auto' uses the one shipped for the default model."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, min=1, max=65535),
    policy: str = typer.Option("adaptive", help="adaptive | static | off."),
    conversion: float = typer.Option(0.25, min=0.0, max=1.0, help="Level of the static policy (fraction of layers)."),
    max_conversion: float = typer.Option(0.5, min=0.0, max=1.0, help="Ceiling of the adaptive policy."),
    caps: str = typer.Option(
        "2048:0.125,4096:0.25,8192:0.375,inf:0.5", help="Adaptive per-prompt-length caps: 'tokens_below:level,...'."
    ),
    memory_budget: str = typer.Option("4GiB", help="Cache memory (KV + DSLA state) the engine may hold."),
    max_num_seqs: int = typer.Option(16, min=1, help="Running sequences (decode batch)."),
    max_waiting: int = typer.Option(64, min=1, help="Queued requests beyond which new ones get 429."),
    prefill_chunk: int = typer.Option(512, min=1, help="Prompt tokens read per step while others decode."),
    queue_timeout: float = typer.Option(120.0, min=0.001, help="Seconds a request may wait before a 503."),
    tpot_target_ms: float = typer.Option(250.0, min=0.0, help="Per-token latency the controller defends (0: ignore)."),
    cooldown: float = typer.Option(10.0, min=0.0, help="Seconds the controller holds a level after a change."),
    default_max_tokens: int = typer.Option(256, min=1, help="Chat max_tokens when the request gives none."),
    served_model_name: list[str] = typer.Option(None, help="Name(s) clients use for the model (default: its id)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (int4 when the engine supports it)."),
    threads: int = typer.Option(None, help="Torch threads (default: all cores)."),
) -> None:
    """Serve the hybrid model over an OpenAI-compatible HTTP API with adaptive DSLA conversion."""
    import uvicorn

    from dsla_serve.model import CheckpointError, ModelLoadError
    from dsla_serve.model.pretrained import load_hybrid, set_threads
    from dsla_serve.serving.controller import ControllerConfig, parse_caps
    from dsla_serve.serving.launch import build_app, parse_bytes
    from dsla_serve.serving.scheduler import SchedulerConfig

    logging.getLogger("dsla_serve").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        ctrl = ControllerConfig(
            policy=policy, conversion=conversion, max_conversion=max_conversion, caps=parse_caps(caps),
            tpot_target_s=tpot_target_ms / 1000 or None, cooldown_s=cooldown,
        )  # fmt: skip
        sched = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_waiting=max_waiting, memory_budget=parse_bytes(memory_budget),
            prefill_chunk=prefill_chunk, queue_timeout_s=queue_timeout,
        )  # fmt: skip
        set_threads(threads)
        hybrid, tok, info = load_hybrid(model, None if weights == "none" else weights, dtype)
    except (ModelLoadError, CheckpointError, ValueError) as e:
        _fail(str(e))
    log.info("model %s: %d layers, context %d; DSLA weights %s (distilled layers %s)", info.model,
             hybrid.num_layers, hybrid.config.max_position_embeddings, info.weights or "none",
             info.distilled or "none")  # fmt: skip
    app, _ = build_app(hybrid, tok, info, sched, ctrl, served_model_name or None, default_max_tokens)
    # NOTE(decisions): uvicorn's own SIGINT/SIGTERM handling stops accepting and waits for running
    # requests; the app's lifespan then drains the engine. A second signal forces exit.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=600)


def control(
    url: str = typer.Option("http://127.0.0.1:8000", help="The server's base URL."),
    policy: str = typer.Option(None, help="adaptive | static | off."),
    level: float = typer.Option(None, min=0.0, max=1.0, help="Conversion level for new sequences (sets static)."),
    convert_running: bool = typer.Option(False, help="Also fold running sequences up to the new level now."),
) -> None:
    """Show (no options) or set a running server's conversion policy and level (POST /v1/dsla)."""
    import httpx

    try:
        if policy is None and level is None:
            r = httpx.get(f"{url}/v1/dsla", timeout=30)
        else:
            body = {"policy": policy, "level": level, "convert_running": convert_running}
            r = httpx.post(f"{url}/v1/dsla", json=body, timeout=150)
    except httpx.HTTPError as e:
        _fail(f"could not reach {url}: {e}")
    if r.status_code != 200:
        _fail(r.json().get("error", {}).get("message", r.text))
    state = r.json()
    c = state["controller"]
    summary = {"policy": c["policy"], "level": c["level"], "layers_for_new_sequences": c["layers_for_new_sequences"],
               "running": len(state["sequences"]), "conversions": state["conversions"],
               "last_decision": c["decisions"][0] if c["decisions"] else None}  # fmt: skip
    print(json.dumps(summary, indent=2))
