"""Adaptive conversion controller: load signals -> how many layers run as DSLA, with the reason why.

The controller owns one number, the *level*: the fraction of layers (a prefix of the conversion
order) that new sequences run as DSLA. Under the adaptive policy it moves that level one step at a
time from the engine's signals (queue depth, waiting prompt tokens, memory pressure, recent
per-token latency) and caps it per sequence by prompt length (the paper's buckets by default).
It never touches tensors: the engine applies its decisions between steps, folding the KV caches of
running sequences when a decision asks for it.

NOTE(decisions):
- Hysteresis: a step up needs one signal above its *high* threshold; a step down needs every
  signal below its *low* threshold, continuously for a whole cooldown. After any change the level
  holds for ``cooldown_s``. So one burst gives one step, not a flap.
- Running sequences are converted only when the trigger is memory or latency (the things that
  folding a running sequence's KV cache relieves now); a queue alone raises the level for new
  sequences. Going down never touches running sequences: a folded KV cache cannot be restored.
- Caps bind the adaptive policy only. ``static`` and manual levels are what the operator asked
  for (experiments, benchmarks) and apply to every sequence as given.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

POLICIES = ("adaptive", "static", "off")
# (prompt tokens below which the cap applies, max fraction): prompt < 2k: 12.5 %, < 4k: 25 %, < 8k: 37.5 %, else 50 %
PAPER_CAPS: tuple[tuple[float, float], ...] = ((2048, 0.125), (4096, 0.25), (8192, 0.375), (float("inf"), 0.5))


def parse_caps(text: str) -> tuple[tuple[float, float], ...]:
    """'2048:0.125,4096:0.25,inf:0.5' -> ((2048, 0.125), (4096, 0.25), (inf, 0.5)), validated."""
    caps = []
    for part in text.split(","):
        try:
            bound, frac = part.split(":")
            caps.append((float(bound), float(frac)))
        except ValueError:
            raise ValueError(f"caps must look like '2048:0.125,4096:0.25,inf:0.5', got {part!r}") from None
    bounds = [b for b, _ in caps]
    if bounds != sorted(bounds) or len(set(bounds)) != len(bounds) or bounds[-1] != float("inf"):
        raise ValueError(f"cap bounds must increase and end with 'inf', got {text!r}")
    if not all(0 <= f <= 1 for _, f in caps):
        raise ValueError(f"cap fractions must be in [0, 1], got {text!r}")
    return tuple(caps)


@dataclass
class ControllerConfig:
    policy: str = "adaptive"
    conversion: float = 0.25  # the level of the static policy
    max_conversion: float = 0.5  # ceiling of the adaptive policy
    step: float = 0.125  # one adaptive move, as a fraction of the layers
    caps: tuple[tuple[float, float], ...] = PAPER_CAPS
    queue_high: int = 4  # waiting requests
    queue_low: int = 0
    waiting_tokens_high: int = 8192  # prompt tokens waiting for admission
    waiting_tokens_low: int = 1024
    memory_high: float = 0.85  # reserved cache bytes / budget
    memory_low: float = 0.5
    tpot_target_s: float | None = 0.25  # recent per-token latency that counts as overload (None: ignore)
    tpot_low_ratio: float = 0.6  # ... and the fraction of it below which latency counts as calm
    cooldown_s: float = 10.0
    history: int = 50  # decisions kept for /v1/dsla

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("conversion", "max_conversion"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1], got {self.step}")
        if self.queue_low >= self.queue_high or self.memory_low >= self.memory_high:
            raise ValueError("each low threshold must be below its high threshold (hysteresis)")
        if self.waiting_tokens_low >= self.waiting_tokens_high:
            raise ValueError("waiting_tokens_low must be below waiting_tokens_high")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")


@dataclass
class Signals:
    """What the engine measured at a step boundary."""

    queue_depth: int = 0
    waiting_tokens: int = 0
    memory_pressure: float = 0.0  # reserved / budget, >= 1 when the queue head does not fit
    tpot_s: float | None = None  # median recent inter-token latency, None without recent decode


@dataclass
class Decision:
    time: float  # wall clock (time.time())
    policy: str
    from_level: float
    to_level: float
    trigger: str  # queue | waiting_tokens | memory | latency | load_fell | manual
    reason: str
    convert_running: bool
    signals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Controller:
    """Holds the policy and level; ``update`` moves it, ``layers_for`` applies it to one sequence."""

    def __init__(self, num_layers: int, config: ControllerConfig | None = None):
        self.n = num_layers
        self.config = config or ControllerConfig()
        c = self.config
        self.policy = c.policy
        self.level = {"adaptive": 0.0, "static": c.conversion, "off": 0.0}[c.policy]
        self.last_change = -float("inf")
        self.calm_since: float | None = None
        self.decisions: deque[Decision] = deque(maxlen=c.history)
        self.last_signals = Signals()

    def layers_at(self, fraction: float) -> int:
        return round(fraction * self.n)

    def cap(self, prompt_tokens: int) -> float:
        caps = self.config.caps
        return caps[bisect.bisect_right([b for b, _ in caps], prompt_tokens)][1]

    def layers_for(self, prompt_tokens: int) -> int:
        """How many layers (a prefix of the order) a sequence with this prompt runs as DSLA now."""
        if self.policy == "adaptive":
            return self.layers_at(min(self.level, self.cap(prompt_tokens)))
        return self.layers_at(self.level)

    def update(self, s: Signals, now: float | None = None) -> Decision | None:
        """Called by the engine at every step boundary; returns a decision when the level moves."""
        now = time.monotonic() if now is None else now
        self.last_signals = s
        if self.policy != "adaptive":
            return None
        c = self.config
        high = []  # (trigger, reason)
        if s.memory_pressure >= c.memory_high:
            high.append(("memory", f"memory pressure {s.memory_pressure:.2f} >= {c.memory_high}"))
        if c.tpot_target_s is not None and s.tpot_s is not None and s.tpot_s >= c.tpot_target_s:
            high.append(("latency", f"per-token latency {1000 * s.tpot_s:.0f} ms >= {1000 * c.tpot_target_s:.0f} ms"))
        if s.queue_depth >= c.queue_high:
            high.append(("queue", f"queue depth {s.queue_depth} >= {c.queue_high}"))
        if s.waiting_tokens >= c.waiting_tokens_high:
            high.append(("waiting_tokens", f"waiting prompt tokens {s.waiting_tokens} >= {c.waiting_tokens_high}"))
        calm = (
            s.memory_pressure < c.memory_low
            and s.queue_depth <= c.queue_low
            and s.waiting_tokens < c.waiting_tokens_low
            and (c.tpot_target_s is None or s.tpot_s is None or s.tpot_s < c.tpot_low_ratio * c.tpot_target_s)
        )
        self.calm_since = (self.calm_since if self.calm_since is not None else now) if calm else None
        if now - self.last_change < c.cooldown_s:
            return None
        if high and self.level < c.max_conversion:
            to = min(self.level + c.step, c.max_conversion)
            running = any(t in ("memory", "latency") for t, _ in high)
            return self._decide(now, to, high[0][0], "; ".join(r for _, r in high), running)
        if self.level > 0 and self.calm_since is not None and now - self.calm_since >= c.cooldown_s:
            reason = (
                f"load fell for {now - self.calm_since:.0f} s: queue {s.queue_depth}, waiting tokens "
                f"{s.waiting_tokens}, memory {s.memory_pressure:.2f}"
                + (f", per-token latency {1000 * s.tpot_s:.0f} ms" if s.tpot_s is not None else "")
            )
            return self._decide(now, max(self.level - c.step, 0.0), "load_fell", reason, False)
        return None

    def set(self, policy: str | None = None, level: float | None = None, convert_running: bool = False) -> Decision:
        """Manual override (POST /v1/dsla, ``dsla-serve control``): a policy, a level, or both."""
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if level is not None and not 0 <= level <= 1:
            raise ValueError(f"level must be in [0, 1], got {level}")
        if policy is None:
            policy = "static" if level is not None else self.policy
        if policy == "off":
            if level not in (None, 0):
                raise ValueError("policy 'off' runs every layer as attention: give no level (or 0)")
            level = 0.0
        self.policy = policy
        target = self.level if level is None else level
        what = f"policy {policy}" + (f", level {level}" if level is not None else "")
        return self._decide(time.monotonic(), target, "manual", f"manual: {what}", convert_running)

    def _decide(self, now: float, to: float, trigger: str, reason: str, convert_running: bool) -> Decision:
        d = Decision(
            time.time(), self.policy, self.level, to, trigger, reason, convert_running, asdict(self.last_signals)
        )
        self.level, self.last_change, self.calm_since = to, now, None
        self.decisions.append(d)
        log.info("conversion level %.3f -> %.3f (%s)%s", d.from_level, to, reason,
                 "; converting running sequences" if convert_running else "")  # fmt: skip
        return d

    def snapshot(self) -> dict:
        c = self.config
        return {
            "policy": self.policy,
            "level": self.level,
            "layers_for_new_sequences": self.layers_at(self.level),
            "max_conversion": c.max_conversion,
            "step": c.step,
            "caps": [{"prompt_tokens_below": None if b == float("inf") else int(b), "max_level": f} for b, f in c.caps],
            "caps_apply": self.policy == "adaptive",
            "cooldown_s": c.cooldown_s,
            "signals": asdict(self.last_signals),
            "decisions": [d.to_dict() for d in reversed(self.decisions)],
        }
