"""``dsla-serve serve`` (the OpenAI-compatible server) and ``dsla-serve control`` (manual override of a
running server's conversion level), registered on the main typer app by ``dsla_serve/cli.py``.

dsla-serve serve --policy adaptive --port 8000
DSLA_SERVE_ADMIN_KEY=... dsla-serve control --level 0.5 --convert-running
"""

from __future__ import annotations

import json
import logging

import typer
from rich.console import Console

from dsla_serve.config import DTYPE_HELP

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
        "auto",
        help="Adaptive caps by prompt length: paper (2048:0.125,4096:0.25,8192:0.375,inf:0.5), none, "
        "'tokens_below:level,...', or auto (paper without a speed profile, none with one).",
    ),
    profile: str = typer.Option(
        "auto",
        help="Speed profile: auto (the one `dsla-serve profile` cached for this model and machine), none, "
        "or a profile / `bench --json` file.",
    ),
    quality: str = typer.Option(None, help="Perplexity by level (`eval quality` / `eval ppl --json`) for the profile."),
    quality_budget: float = typer.Option(
        None, min=1.0, help="Largest perplexity ratio to all-attention a sequence may pay (needs quality data)."
    ),
    ttft_target_ms: float = typer.Option(
        2000.0, min=0.0, help="Time to first token the controller defends (0: ignore)."
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
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    threads: int = typer.Option(None, help="Torch threads (default: all cores)."),
    api_key: str = typer.Option(
        None,
        envvar="DSLA_SERVE_API_KEY",
        show_default=False,
        help="Key every endpoint but /health requires ('Authorization: Bearer KEY'); prefer the env variable.",
    ),
    admin_key: str = typer.Option(
        None,
        envvar="DSLA_SERVE_ADMIN_KEY",
        show_default=False,
        help="Key POST /v1/dsla requires; without it, that endpoint answers loopback clients only.",
    ),
    max_body_size: str = typer.Option("4MiB", help="Largest request body; larger ones get 413."),
    max_prompt_tokens: int = typer.Option(None, min=1, help="Longest prompt in tokens (default: the context)."),
) -> None:
    """Serve the hybrid model over an OpenAI-compatible HTTP API with adaptive DSLA conversion."""
    import uvicorn

    from dsla_serve.model import CheckpointError, ModelLoadError
    from dsla_serve.model.pretrained import load_hybrid, resolve_dtype, set_threads
    from dsla_serve.serving.api.auth import Keys
    from dsla_serve.serving.api.server import ApiConfig
    from dsla_serve.serving.controller import ControllerConfig, parse_caps
    from dsla_serve.serving.launch import build_app, parse_bytes
    from dsla_serve.serving.profile import resolve as resolve_profile
    from dsla_serve.serving.scheduler import SchedulerConfig

    logging.getLogger("dsla_serve").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        ctrl = ControllerConfig(
            policy=policy, conversion=conversion, max_conversion=max_conversion, caps=parse_caps(caps),
            tpot_target_s=tpot_target_ms / 1000 or None, ttft_target_s=ttft_target_ms / 1000 or None,
            quality_budget=quality_budget, cooldown_s=cooldown,
        )  # fmt: skip
        sched = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_waiting=max_waiting, memory_budget=parse_bytes(memory_budget),
            prefill_chunk=prefill_chunk, queue_timeout_s=queue_timeout,
        )  # fmt: skip
        api = ApiConfig(
            served_names=tuple(served_model_name or ()), default_max_tokens=default_max_tokens,
            keys=Keys(api_key, admin_key), max_body_bytes=parse_bytes(max_body_size),
            max_prompt_tokens=max_prompt_tokens,
        )  # fmt: skip
        set_threads(threads)
        dtype = resolve_dtype(dtype, model)
        hybrid, tok, info = load_hybrid(model, None if weights == "none" else weights, dtype)
        ctrl.profile = resolve_profile(profile, hybrid.base, dtype, quality)
    except (ModelLoadError, CheckpointError, ValueError) as e:
        _fail(str(e))
    log.info("model %s: %d layers, context %d; DSLA weights %s (distilled layers %s)", info.model,
             hybrid.num_layers, hybrid.config.max_position_embeddings, info.weights or "none",
             info.distilled or "none")  # fmt: skip
    try:
        app, _ = build_app(hybrid, tok, info, sched, ctrl, api)
    except ValueError as e:  # e.g. a tokenizer without a fast backend
        _fail(str(e))
    # NOTE(decisions): uvicorn's own SIGINT/SIGTERM handling stops accepting and waits for running
    # requests; the app's lifespan then drains the engine. A second signal forces exit.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=600)


def control(
    url: str = typer.Option("http://127.0.0.1:8000", help="The server's base URL."),
    policy: str = typer.Option(None, help="adaptive | static | off."),
    level: float = typer.Option(None, min=0.0, max=1.0, help="Conversion level for new sequences (sets static)."),
    convert_running: bool = typer.Option(False, help="Also fold running sequences up to the new level now."),
    api_key: str = typer.Option(
        None, envvar="DSLA_SERVE_API_KEY", show_default=False, help="The server's API key (to show its state)."
    ),
    admin_key: str = typer.Option(
        None, envvar="DSLA_SERVE_ADMIN_KEY", show_default=False, help="The server's admin key (to change it)."
    ),
) -> None:
    """Show (no options) or set a running server's conversion policy and level (POST /v1/dsla)."""
    import httpx

    def auth(key: str | None) -> dict:
        return {"Authorization": f"Bearer {key}"} if key else {}

    try:
        if policy is None and level is None:
            r = httpx.get(f"{url}/v1/dsla", timeout=30, headers=auth(api_key or admin_key))
        else:
            body = {"policy": policy, "level": level, "convert_running": convert_running}
            r = httpx.post(f"{url}/v1/dsla", json=body, timeout=150, headers=auth(admin_key or api_key))
    except httpx.HTTPError as e:
        _fail(f"could not reach {url}: {e}")
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        _fail(f"{r.status_code}: {message}")
    state = r.json()
    c = state["controller"]
    summary = {"policy": c["policy"], "level": c["level"], "layers_for_new_sequences": c["layers_for_new_sequences"],
               "running": len(state["sequences"]), "conversions": state["conversions"],
               "last_plan": c["last_plan"], "last_decision": c["decisions"][0] if c["decisions"] else None}  # fmt: skip
    print(json.dumps(summary, indent=2))
