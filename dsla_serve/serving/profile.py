"""What a conversion level buys and costs for one model on one machine: prefill and decode time by
level and length, and the perplexity ratio by level. The adaptive controller predicts each
sequence's time to first token and time per token from it.

dsla-serve profile                                   # measure the default model here; cached
dsla-serve profile --from-bench docs/bench/bench.json --quality docs/quality/quality.json

A profile is measured by the benchmark suites (``dsla_serve/bench/engine.py``: batch-1 prefill at
each level and prompt length, decode steps at each level and context, and a batch at one context)
or read from their JSON (``dsla-serve bench ... --json``). It is cached under the cache dir, keyed
by the model's fingerprint (architecture + attention weights), the machine (CPU and its instruction
sets, or GPU; cores, torch threads, torch version, dtype) and the engine's version (a hash of its
sources); ``dsla-serve serve`` finds it there by itself.

Decode model: one step of a batch costs a shared part (weights read once per step, per-op
overhead) plus each sequence's own part (its attention over its context, its states), so
``step = max(shared) + sum(own)``. Both come from the batch-1 and batch-B steps at one context;
without a batch point the shared part is 0 (every sequence costs its batch-1 step: pessimistic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import typer

from dsla_serve.bench.common import WARM_UP_S

log = logging.getLogger(__name__)

KIND = "dsla-serve profile"
VERSION = 1


class ProfileError(ValueError):
    """A profile or quality file is missing, malformed or for another model; the message says which."""


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Linear in x between points; beyond the last point, the last segment's slope (never negative)."""
    if len(xs) == 1 or x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
    return ys[-1] + slope * (x - xs[-1])


def _by_level(table: dict[float, object], level: float, fn) -> float:
    """fn(table[level]), linear between the two measured levels around it, the nearest beyond them."""
    levels = sorted(table)
    if level <= levels[0]:
        return fn(table[levels[0]])
    if level >= levels[-1]:
        return fn(table[levels[-1]])
    i = int(np.searchsorted(levels, level))
    lo, hi = levels[i - 1], levels[i]
    w = (level - lo) / (hi - lo)
    return (1 - w) * fn(table[lo]) + w * fn(table[hi])


@dataclass
class Profile:
    """Rows as measured, and interpolating look-ups the controller calls.

    prefill: {"level", "tokens", "s"}: a batch-1 prompt of ``tokens`` to its first token.
    decode: {"level", "context", "batch", "s"}: one decode step of ``batch`` sequences at ``context``.
    quality: level -> perplexity ratio to all-attention (level 0), from ``dsla-serve eval``.
    """

    prefill: list[dict]
    decode: list[dict]
    quality: dict[float, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # model, fingerprint, machine, dtype, source

    def __post_init__(self) -> None:
        self._pre: dict[float, tuple[list[float], list[float]]] = {}
        for r in sorted(self.prefill, key=lambda r: (r["level"], r["tokens"])):
            xs, ys = self._pre.setdefault(float(r["level"]), ([0.0], [0.0]))  # no prompt, no time
            xs.append(float(r["tokens"]))
            ys.append(float(r["s"]))
        self._dec: dict[float, tuple[list[float], list[float]]] = {}
        for r in sorted(self.decode, key=lambda r: (r["level"], r["context"])):
            if r["batch"] == 1:
                xs, ys = self._dec.setdefault(float(r["level"]), ([], []))
                xs.append(float(r["context"]))
                ys.append(float(r["s"]))
        if 0.0 not in self._pre or 0.0 not in self._dec:
            raise ProfileError("a profile needs batch-1 prefill and decode rows at level 0 (all attention)")
        self._shared: dict[float, float] = {}
        for r in sorted(self.decode, key=lambda r: r["batch"]):  # the largest batch of a level is the last word
            level = float(r["level"])
            if r["batch"] > 1 and level in self._dec:
                one = _interp(r["context"], *self._dec[level])  # batch 1 at the same context
                own = max((float(r["s"]) - one) / (r["batch"] - 1), 0.0)
                self._shared[level] = min(max(one - own, 0.0), one)
        self.quality = {float(k): float(v) for k, v in self.quality.items()}

    # ---- look-ups (seconds)
    def prefill_s(self, level: float, tokens: int, start: int = 0) -> float:
        """Reading prompt tokens start .. start+tokens at this level (a chunk of a longer prompt)."""

        def total(n: float) -> float:
            return _by_level(self._pre, level, lambda t: _interp(n, *t))

        return max(total(start + tokens) - total(start), 0.0)

    def decode_shared_s(self, level: float) -> float:
        return _by_level(self._shared, level, float) if self._shared else 0.0

    def decode_own_s(self, level: float, context: int) -> float:
        """One sequence's part of a decode step at this context (at least a tenth of its batch-1 step)."""
        one = _by_level(self._dec, level, lambda t: _interp(context, *t))
        return max(one - self.decode_shared_s(level), 0.1 * one)

    def step_s(self, seqs: Iterable[tuple[float, int]]) -> float:
        """One decode step of a batch of (level, context) sequences; 0 for none."""
        seqs = list(seqs)
        if not seqs:
            return 0.0
        return max(self.decode_shared_s(lv) for lv, _ in seqs) + sum(self.decode_own_s(lv, c) for lv, c in seqs)

    def ppl_ratio(self, level: float) -> float | None:
        """Perplexity ratio to all-attention at this level (linear between measured levels); None unknown."""
        if not self.quality:
            return None
        xs = sorted(self.quality)
        return float(np.interp(level, xs, [self.quality[x] for x in xs]))

    # ---- I/O
    def to_json(self) -> dict:
        return {"kind": KIND, "version": VERSION, **self.meta, "prefill": self.prefill, "decode": self.decode,
                "quality": [{"level": k, "ppl_ratio": v} for k, v in sorted(self.quality.items())]}  # fmt: skip

    def summary(self) -> dict:
        """For GET /v1/dsla and the logs: where it came from and what it covers."""
        return {
            "source": self.meta.get("source"),
            "model": self.meta.get("model"),
            "machine_key": self.meta.get("machine_key"),
            "levels": sorted(self._pre),
            "prefill_tokens": sorted({r["tokens"] for r in self.prefill}),
            "decode_contexts": sorted({r["context"] for r in self.decode}),
            "shared_decode": bool(self._shared),
            "quality": {f"{k:g}": round(v, 4) for k, v in sorted(self.quality.items())},
            "quality_source": self.meta.get("quality_source"),
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "") -> Profile:
        """A profile's own JSON, or the JSON of ``dsla-serve bench prefill|decode|all --json``."""
        try:
            if data.get("kind") == KIND:
                meta = {k: v for k, v in data.items() if k not in ("kind", "version", "prefill", "decode", "quality")}
                quality = {r["level"]: r["ppl_ratio"] for r in data.get("quality") or []}
                return cls(data["prefill"], data["decode"], quality, meta)
            ours = [r for r in data.get("prefill", []) + data.get("decode", []) if r.get("engine") == "dsla-serve"]
            pre = [{"level": r["level"], "tokens": r["context"], "s": r["median_s"]}
                   for r in ours if r["suite"] == "prefill" and r["batch"] == 1]  # fmt: skip
            dec = [{"level": r["level"], "context": r["context"], "batch": r["batch"], "s": r["median_s"]}
                   for r in ours if r["suite"] == "decode"]  # fmt: skip
            machine = data.get("machine") or {}
            dtype = (data.get("settings") or {}).get("dtype", "float32")
            meta = {"model": data.get("model"), "machine": machine, "dtype": dtype,
                    "machine_key": machine_key(machine, dtype), "source": f"bench JSON {source}".strip()}  # fmt: skip
            return cls(pre, dec, {}, meta)
        except (KeyError, TypeError, AttributeError) as e:
            raise ProfileError(f"{source or 'profile'}: not a profile or bench JSON (missing {e})") from None


def read_ppl(path: str | Path) -> dict[float, float]:
    """{level: perplexity} from quality.json of ``dsla-serve eval quality`` (its DSLA rows) or the JSON
    of ``dsla-serve eval ppl --json``."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["ppl_dsla"] if "ppl_dsla" in data else data["levels"]
        return {float(r["conversion"]): float(r["ppl"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProfileError(
            f"{path}: expected quality.json of `dsla-serve eval quality` or `dsla-serve eval ppl --json` ({e})"
        ) from None


def ppl_ratios(ppl: dict[float, float], source: str = "") -> dict[float, float]:
    if 0.0 not in ppl or ppl[0.0] <= 0:
        raise ProfileError(f"{source or 'quality'}: needs the perplexity at level 0 (all attention) as the reference")
    return {k: v / ppl[0.0] for k, v in sorted(ppl.items())}


def machine_key(machine: dict, dtype: str) -> str:
    """What makes timings comparable: the processor and its instruction sets, cores, torch threads, torch
    version, the engine's version (``runtime.engine_version``: a profile measured before the engine changed
    is not used), dtype."""
    names = ("cpu", "isa", "cores", "torch_threads", "torch", "gpu", "engine_version")
    keys = {k: machine.get(k) for k in names} | {"dtype": dtype}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def this_machine() -> dict:
    from dsla_serve.runtime import machine_info

    info = machine_info()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def profile_path(fingerprint: str, key: str) -> Path:
    from dsla_serve.model.loader import cache_dir

    return cache_dir() / "profiles" / f"{fingerprint[:16]}-{key}.json"


def load(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProfileError(f"{path}: cannot read a profile ({e})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: not a profile or bench JSON")
    return Profile.from_json(data, str(path))


def save(profile: Profile, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1))
    tmp.replace(path)  # a server starting meanwhile never reads half a file
    return path


def fingerprint_of(base_model) -> str | None:
    """The model's sha256 fingerprint, or None where it cannot be taken (int4-quantised projections)."""
    from dsla_serve.model import base_fingerprint

    try:
        return base_fingerprint(base_model)["sha256"]
    except Exception as e:  # a quantised or unusual module: no cache key, not a failure to serve
        log.warning("no model fingerprint (%s): the profile cache is not used", e)
        return None


def resolve(spec: str | None, base_model, dtype: str, quality: str | Path | None = None) -> Profile | None:
    """The server's profile: 'auto' (the cached one for this model and machine, if any), 'none', or a
    path to a profile or bench JSON; ``quality`` (an eval JSON) replaces its perplexity ratios."""
    profile = None
    if spec not in (None, "none", "auto"):
        profile = load(spec)
        theirs = profile.meta.get("fingerprint")
        if theirs is not None and theirs != fingerprint_of(base_model):
            log.warning("the profile %s was measured on another model: its predictions are a guess here", spec)
        if profile.meta.get("machine_key") != machine_key(this_machine(), dtype):
            log.warning("the profile %s was measured on another machine or dtype: the controller scales its "
                        "timings by the decode speed it measures", spec)  # fmt: skip
    elif spec == "auto":
        fp = fingerprint_of(base_model)
        path = profile_path(fp, machine_key(this_machine(), dtype)) if fp else None
        if path is not None and path.is_file():
            profile = load(path)
        else:
            log.warning("no speed profile for this model on this machine (run `dsla-serve profile` once): the "
                        "adaptive policy moves on load thresholds and the paper's caps by prompt length")  # fmt: skip
    if profile is not None and quality is not None:
        profile.quality = ppl_ratios(read_ppl(quality), str(quality))
        profile.meta["quality_source"] = str(quality)
    if profile is not None:
        log.info("speed profile: %s", profile.summary())
    return profile


def measure(
    model: str | None, weights: str | None, dtype: str, levels: list[float], contexts: list[int], batch: int,
    batch_context: int, decode_tokens: int, repeats: int, warm_up_s: float,
) -> tuple[Profile, str | None]:  # fmt: skip
    """Run the prefill and decode suites (no outside baselines) and return (profile, model fingerprint)."""
    from dsla_serve.bench.engine import BenchSettings, Engines, bench_decode, bench_prefill

    s = BenchSettings(
        contexts=contexts, batches=sorted({1, batch}), levels=levels, batch_levels=levels, repeats=repeats,
        decode_tokens=decode_tokens, batch_context=batch_context, dtype=dtype, model=model, weights=weights,
        baselines=[], warm_up_s=warm_up_s,
    )  # fmt: skip
    e = Engines(replace(s, batches=[1]))  # prefill at batch 1 only: the batch point is for decode
    e.warm_up()
    prefill = bench_prefill(e)
    e.s = s
    data = {"prefill": prefill, "decode": bench_decode(e), "model": e.info.model, "machine": this_machine(),
            "settings": {"dtype": dtype}}  # fmt: skip
    profile = Profile.from_json(data)
    profile.meta["source"] = "measured: " + shlex.join(["dsla-serve", *sys.argv[1:]])
    return profile, fingerprint_of(e.model.base)


def _floats(text: str, kind: type, option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option} expects comma-separated numbers, got {text!r}") from None


# NOTE(decisions): the profile's defaults take the median of 3 prefill runs and 16 decode steps a point.
# With 1 run and 8 steps (the earlier defaults) a profile on the 2-core AMD EPYC development machine read
# 1.05 / 1.01 / 1.10 / 0.95 / 0.96 s for a 1024-token prefill at levels 0 / 0.125 / 0.25 / 0.375 / 0.5
# (machine noise of ~5 %): a profile that says 25 % costs time at 1k tokens, where the bench measures 50 %
# saving 15 %, steers the controller away from a level that pays.
def profile_command(
    model: str = typer.Option(None, help="Base model (default: embedded SmolLM2-135M-Instruct)."),
    weights: str = typer.Option("auto", help="DSLA checkpoint dir, 'auto' or 'none' (speed does not depend on it)."),
    dtype: str = typer.Option("auto", help="The dtype the server will run (its default: auto)."),
    threads: int = typer.Option(None, help="Torch threads, as the server will run (default: all cores)."),
    levels: str = typer.Option("0,0.125,0.25,0.375,0.5", help="Conversion levels to time (must include 0)."),
    contexts: str = typer.Option("256,1024,4096", help="Prompt lengths / decode contexts to time."),
    batch: int = typer.Option(4, min=1, help="Decode batch timed at --batch-context (splits shared and own cost)."),
    batch_context: int = typer.Option(1024, min=2, help="Context of the batch point."),
    decode_tokens: int = typer.Option(16, min=2, help="Decode steps per point (median)."),
    repeats: int = typer.Option(3, min=1, help="Timed prefill runs per point (median; the levels take turns)."),
    warm_up: float = typer.Option(WARM_UP_S, min=0, help="Seconds of decoding (levels 0 and 1) before any timing."),
    from_bench: Path = typer.Option(None, help="Take the timings from `dsla-serve bench ... --json` output instead."),
    quality: Path = typer.Option(
        None, help="Perplexity by level: quality.json of `eval quality` or `eval ppl --json`."
    ),
    out: Path = typer.Option(None, help="Write here instead of the cache (where `dsla-serve serve` looks)."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
) -> None:
    """Measure (or import) what each conversion level buys and costs here; cache it for `dsla-serve serve`."""
    from dsla_serve.model import CheckpointError, ModelLoadError
    from dsla_serve.model.loader import load_base
    from dsla_serve.model.pretrained import resolve_dtype, set_threads
    from dsla_serve.model.quant import QUANTIZERS

    set_threads(threads)
    dtype = resolve_dtype(dtype, model)  # as the server resolves it: the cache key names the real dtype
    shipped = Path("docs/quality/quality.json")  # the shipped checkpoint's, from the repository root
    quality = quality or (shipped if model is None and weights == "auto" and shipped.is_file() else None)
    try:
        ratios = ppl_ratios(read_ppl(quality), str(quality)) if quality is not None else {}  # before any timing
        if from_bench is not None:
            prof = load(from_bench)
            model = model or (json.loads(from_bench.read_text()).get("settings") or {}).get("model")
            fp = fingerprint_of(load_base(model, "bfloat16" if dtype in QUANTIZERS else dtype).model)
        else:
            prof, fp = measure(model, None if weights == "none" else weights, dtype, _floats(levels, float, "--levels"),
                               _floats(contexts, int, "--contexts"), batch, batch_context, decode_tokens, repeats,
                               warm_up)  # fmt: skip
    except (ProfileError, ModelLoadError, CheckpointError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    prof.meta["fingerprint"] = fp
    if ratios:
        prof.quality, prof.meta["quality_source"] = ratios, str(quality)
    if out is None:
        if fp is None:
            typer.echo("error: no model fingerprint to key the cache by: give --out", err=True)
            raise typer.Exit(2)
        out = profile_path(fp, prof.meta["machine_key"])
        if prof.meta["machine_key"] != machine_key(this_machine(), dtype):
            typer.echo("warning: these timings come from another machine, dtype or engine version: `dsla-serve serve` "
                       "here will not find this profile by itself (pass it with --profile)", err=True)  # fmt: skip
    typer.echo(f"wrote {save(prof, out)}", err=True)
    if as_json:
        print(json.dumps(prof.to_json()))
