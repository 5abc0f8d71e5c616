"""Adaptive conversion controller: load signals -> how many layers each sequence runs as DSLA, and why.

The controller owns the *level* (a fraction of the layers, a prefix of the conversion order), which
moves with hysteresis from the engine's signals: memory pressure, decode time per token, the step time
sequences see, time to first token (measured, and predicted for the queue head), queue depth and
waiting prompt tokens. Each new sequence gets its own level, chosen at admission:

- with a speed profile (``profile.py``), planned up to the top, not under the level: the lowest
  level whose predicted TTFT and time per token meet the SLO targets (the nearest if none does);
  under load (the level above 0) with requests queued behind it, the level that serves it fastest
  (its service time is what they wait for); never above ``max_conversion``, the quality budget (the
  largest perplexity ratio allowed) nor the request's own ``max_level``; the level is then the
  controller's load state;
- without one: the level, capped by prompt length (the paper's caps).

It never touches tensors. Its decisions carry per-sequence targets (layers to fold running
sequences up to); the engine applies them between steps without asking back.

NOTE(decisions):
- Signals are timestamped and expire after ``window_s``; with nothing decoding there is no latency
  signal at all. A level raised by a burst therefore steps down once the burst is over.
- Decode time per token is the batched decode call alone; prefill chunks read in the same step
  (other requests' prompts) are a separate signal. Folding running sequences speeds up decode only,
  so only memory pressure or slow decode converts running sequences; slow steps from prefill
  interference, long waits and queues raise the level only (without a profile, new sequences'
  ceiling), since new sequences' prompts are what they measure.
- With a profile, new sequences are planned up to the top, not under the level: planned under it, a
  long prompt that arrived while the server was calm (level stepped down) was read all-attention
  however late that made it, and held the server when the next burst came. 64 requests of the
  paper's prompt mix at U = 0.9 on the 2-core AMD EPYC: planned under the level, 2.47x lower mean
  end-to-end latency than all-attention (78 % of the sequence-time at 50 %); planned up to the top,
  3.08x (90 %); every request at 50 %, 3.41x. Single runs: replays this close to saturation spread
  widely (the same requests, planned up to the top, also read 1.83x and 2.62x; docs/replay/README.md).
- The fastest service for a request with others queued behind it only while the level is above 0:
  a calm server keeps the quality its SLOs allow. At U = 0.3 the rule seldom has a queue to act on
  (requests are admitted at the next step boundary); what converts there is the SLO rule.
- Hysteresis: a rise needs one signal above its high threshold; a step down needs every signal
  below its low threshold for a whole cooldown; any change holds for ``cooldown_s``.
- Caps by prompt length (``--caps paper``) bind the adaptive policy only; by default they apply only
  without a profile. ``static`` and manual levels are what the operator asked for (experiments,
  benchmarks), capped only by each request's ``max_level``.
- Going down never touches running sequences: a folded KV cache cannot be restored.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from dsla_serve.serving.profile import Profile

log = logging.getLogger(__name__)

POLICIES = ("adaptive", "static", "off")
Caps = tuple[tuple[float, float], ...]
# (prompt tokens below which the cap applies, max fraction): prompt < 2k: 12.5 %, < 4k: 25 %, < 8k: 37.5 %, else 50 %
PAPER_CAPS: Caps = ((2048, 0.125), (4096, 0.25), (8192, 0.375), (float("inf"), 0.5))


def parse_caps(text: str) -> Caps | None:
    """'paper', 'none', 'auto' (None: the paper's without a profile, none with one), or
    '2048:0.125,4096:0.25,inf:0.5' -> ((2048, 0.125), (4096, 0.25), (inf, 0.5)), validated."""
    named = {"paper": PAPER_CAPS, "none": (), "auto": None}
    if text.strip() in named:
        return named[text.strip()]
    caps = []
    for part in text.split(","):
        try:
            bound, frac = part.split(":")
            caps.append((float(bound), float(frac)))
        except ValueError:
            raise ValueError(f"caps must be paper, none, auto or like '2048:0.125,inf:0.5', got {part!r}") from None
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
    step: float = 0.125  # one adaptive move, and the grid of per-sequence levels, as a fraction of the layers
    caps: Caps | None = None  # None: PAPER_CAPS without a profile, none with one
    profile: Profile | None = None  # what each level buys (speed) and costs (perplexity)
    quality_budget: float | None = None  # largest perplexity ratio to all-attention a sequence may pay
    ttft_target_s: float | None = 2.0  # SLO: time to first token (None: ignore)
    tpot_target_s: float | None = 0.25  # SLO: time per output token (None: ignore)
    low_ratio: float = 0.6  # a latency below this fraction of its target counts as calm
    queue_high: int = 4  # waiting requests
    queue_low: int = 0
    waiting_tokens_high: int = 8192  # prompt tokens waiting for admission
    waiting_tokens_low: int = 1024
    memory_high: float = 0.85  # reserved cache bytes / budget
    memory_low: float = 0.5
    cooldown_s: float = 10.0
    window_s: float = 5.0  # signals older than this expire
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
        if not 0 < self.low_ratio < 1:
            raise ValueError(f"low_ratio must be in (0, 1), got {self.low_ratio}")
        if self.quality_budget is not None and self.quality_budget < 1:
            raise ValueError(f"quality_budget is a perplexity ratio to all-attention, >= 1; got {self.quality_budget}")
        if self.cooldown_s < 0 or self.window_s <= 0:
            raise ValueError(f"need cooldown_s >= 0 and window_s > 0, got {self.cooldown_s}, {self.window_s}")

    @property
    def active_caps(self) -> Caps:
        return self.caps if self.caps is not None else (() if self.profile is not None else PAPER_CAPS)


@dataclass
class Signals:
    """What the engine measured, as of ``time`` (time.monotonic()); None: nothing to measure now."""

    time: float = 0.0
    queue_depth: int = 0
    waiting_tokens: int = 0
    memory_pressure: float = 0.0  # reserved / budget, >= 1 when the queue head does not fit
    decoding: int = 0  # sequences past their prompt
    decode_s: float | None = None  # median batched decode call over the window: time per token of decoding alone
    step_s: float | None = None  # ... with the prefill chunks read in the same steps: the gap sequences see
    ttft_s: float | None = None  # median TTFT of the sequences whose first token came in the window
    queue_wait_s: float | None = None  # how long the queue head has waited so far
    head_ttft_s: float | None = None  # predicted TTFT of the queue head: waited + until admitted + its prefill
    prefill_tps: float | None = None  # prompt tokens per second of prefill (a speed: kept past the window)


@dataclass(frozen=True)
class SeqLoad:
    """A running sequence as the controller sees it."""

    id: str
    prompt_tokens: int
    context: int  # tokens in its cache now
    remaining: int  # tokens it may still generate
    prefill_left: int  # prompt tokens not read yet
    dsla_count: int  # layers it runs as DSLA now
    max_level: float = 1.0  # its request's own ceiling ("dsla": {"max_level": ...})


def load_of(req) -> SeqLoad:
    """SeqLoad of an engine ``Request`` (plain numbers only)."""
    made = len(req.output_ids)
    return SeqLoad(req.id, req.prompt_len, req.num_computed + made, max(req.params.max_tokens - made, 0),
                   req.prompt_len - req.num_computed, req.dsla_count, req.params.dsla_max_level)  # fmt: skip


@dataclass
class Decision:
    time: float  # wall clock (time.time())
    policy: str
    from_level: float
    to_level: float
    trigger: str  # memory | latency | interference | wait | queue | waiting_tokens | load_fell | manual
    reason: str
    convert_running: bool
    targets: dict[str, int] = field(default_factory=dict)  # running sequence id -> DSLA layers to fold up to
    signals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class SignalMeter:
    """The engine's timings, timestamped; ``signals`` reads the last ``window_s`` seconds only."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._steps: deque[tuple[float, float, float]] = deque()  # (time, decode call s, whole step s)
        self._ttft: deque[tuple[float, float]] = deque()
        self.prefill_tps: float | None = None  # moving average of prefill speed

    def record_step(self, now: float, decode_s: float | None, prefill_s: float, prefill_tokens: int) -> None:
        if decode_s is not None:
            self._steps.append((now, decode_s, decode_s + prefill_s))
        if prefill_tokens >= 32 and prefill_s > 0:  # a few tokens time per-call overhead, not speed
            tps = prefill_tokens / prefill_s
            self.prefill_tps = tps if self.prefill_tps is None else 0.8 * self.prefill_tps + 0.2 * tps

    def record_ttft(self, now: float, ttft_s: float) -> None:
        self._ttft.append((now, ttft_s))

    def signals(self, now: float, sched) -> Signals:
        """Signals from the scheduler's plain numbers (queues, bytes) and the recent timings."""
        for q in (self._steps, self._ttft):
            while q and now - q[0][0] > self.window_s:
                q.popleft()
        decoding = sum(1 for r in sched.running if r.prefilled)
        s = Signals(now, len(sched.waiting), sched.waiting_tokens(), sched.memory_pressure(), decoding)
        if decoding and self._steps:  # no latency signal while nothing decodes
            s.decode_s = statistics.median(d for _, d, _ in self._steps)
            s.step_s = statistics.median(w for _, _, w in self._steps)
        if self._ttft and (sched.running or sched.waiting):  # an idle server has no waits to speak of
            s.ttft_s = statistics.median(t for _, t in self._ttft)
        s.prefill_tps = self.prefill_tps
        if sched.waiting:
            head = sched.waiting[0]
            s.queue_wait_s = now - head.arrival
            s.head_ttft_s = s.queue_wait_s + self._head_rest(sched, head, s.step_s)
        return s

    def _head_rest(self, sched, head, step_s: float | None) -> float:
        """Predicted seconds from now to the queue head's first token: until a running sequence's end
        frees a slot and its bytes, then the prompts still unread (theirs and its own) at prefill speed.
        Sequences are assumed to run to max_tokens, so this errs long."""
        c = sched.config

        def steps_left(r) -> int:
            return (
                r.params.max_tokens - len(r.output_ids) + math.ceil((r.prompt_len - r.num_computed) / c.prefill_chunk)
            )

        slots, free, need = c.max_num_seqs - len(sched.running), c.memory_budget - sched.used, sched.blocked_need
        steps = 0
        if slots < 1 or need > free:
            for r in sorted(sched.running, key=steps_left):
                slots, free, steps = slots + 1, free + r.reserved, steps_left(r)
                if slots >= 1 and need <= free:
                    break
        unread = head.prompt_len + sum(r.prompt_len - r.num_computed for r in sched.running)
        return steps * (step_s or 0.0) + (unread / self.prefill_tps if self.prefill_tps else 0.0)


class Controller:
    """Holds the policy and level; ``update`` moves the level, ``plan`` picks a new sequence's layers."""

    def __init__(self, num_layers: int, config: ControllerConfig | None = None, prefill_chunk: int = 512):
        self.n = num_layers
        self.config = config or ControllerConfig()
        c = self.config
        self.profile = c.profile
        self.prefill_chunk = prefill_chunk
        self.policy = c.policy
        self.level = {"adaptive": 0.0, "static": c.conversion, "off": 0.0}[c.policy]
        self.last_change = -float("inf")
        self.calm_since: float | None = None
        self.decisions: deque[Decision] = deque(maxlen=c.history)
        self.last_signals = Signals()
        self.running: list[SeqLoad] = []
        self.speed = 1.0  # measured / profiled decode step: how much slower than its profile the machine runs now
        self.quality_level = self._quality_level()
        self.last_plan: tuple[float, str] | None = None  # the latest admission choice and why

    # ---- levels
    def layers_at(self, fraction: float) -> int:
        return round(fraction * self.n)

    def cap(self, prompt_tokens: int) -> float:
        caps = self.config.active_caps
        return caps[bisect.bisect_right([b for b, _ in caps], prompt_tokens)][1] if caps else 1.0

    def _quality_level(self) -> float:
        """The highest level (on the step grid) whose perplexity ratio is within the quality budget."""
        c, p = self.config, self.profile
        if c.quality_budget is not None and (p is None or not p.quality):
            log.warning("quality budget %g ignored: no perplexity by level (profile --quality)", c.quality_budget)
        if c.quality_budget is None or p is None or not p.quality:
            return 1.0
        ok = [lv for lv in self.grid(1.0) if p.ppl_ratio(lv) <= c.quality_budget + 1e-9]
        return max(ok) if ok else 0.0

    @property
    def top(self) -> float:
        """The most conversion the adaptive policy may reach."""
        return min(self.config.max_conversion, self.quality_level)

    def grid(self, hi: float) -> list[float]:
        """Levels 0, step, 2 step, ... up to hi."""
        return [k * self.config.step for k in range(int(hi / self.config.step + 1e-9) + 1)]

    def seq_ceiling(self, prompt_tokens: int, request_max: float = 1.0, level: float | None = None) -> float:
        """The most conversion a sequence may get at this level (default: the current one)."""
        level = self.level if level is None else level
        if self.policy == "off":
            return 0.0
        if self.policy == "static":
            return min(level, request_max)
        return min(level, self.top, self.cap(prompt_tokens), request_max)

    def admission_ceiling(self) -> float:
        """The most conversion a new sequence is planned under: the top for the adaptive policy with a
        profile (module NOTE), else the level."""
        return self.top if self.policy == "adaptive" and self.profile is not None else self.level

    def max_level_for(self, prompt_tokens: int, request_max: float = 1.0) -> float:
        """The most conversion this request could ever get (the admission check sizes its cache by it)."""
        return self.seq_ceiling(
            prompt_tokens, request_max, self.config.max_conversion if self.policy == "adaptive" else None
        )

    # ---- a new sequence's plan, at admission
    def plan_request(self, req, behind: int = 0) -> int:
        """DSLA layers for an engine ``Request`` being admitted now; ``behind``: requests queued after it."""
        waited = time.monotonic() - req.arrival
        return self.plan(req.prompt_len, req.params.max_tokens, req.params.dsla_max_level, waited, behind)

    def plan(self, prompt_tokens: int, max_tokens: int, request_max: float = 1.0, waited_s: float = 0.0,
             behind: int = 0) -> int:  # fmt: skip
        """How many layers (a prefix of the order) a new sequence runs as DSLA."""
        hi = self.seq_ceiling(prompt_tokens, request_max, self.admission_ceiling())
        if self.policy != "adaptive" or self.profile is None or hi <= 0:
            return self.layers_at(hi)
        c, levels = self.config, self.grid(hi)
        preds = {lv: self.predict(lv, prompt_tokens, max_tokens, waited_s) for lv in levels}

        def meets(lv: float) -> bool:
            ttft, tpot, _ = preds[lv]
            return (c.ttft_target_s is None or ttft <= c.ttft_target_s) and (
                c.tpot_target_s is None or tpot <= c.tpot_target_s
            )

        feasible = [lv for lv in levels if meets(lv)]
        if behind > 0 and self.level > 0:
            level = min(levels, key=lambda lv: (preds[lv][2], lv))
            why = f"under load, {behind} queued behind it: the fastest service under {hi:g}"
        elif feasible:
            level, why = feasible[0], "the lowest level predicted to meet the SLOs"
        else:
            level = min(levels, key=lambda lv: (self._violation(preds[lv]), lv))
            why = f"no level under {hi:g} is predicted to meet the SLOs: the nearest"
        ttft, tpot, service = preds[level]
        self.last_plan = (level, f"{why} (TTFT {ttft:.2f} s, per token {1000 * tpot:.0f} ms, service {service:.2f} s)")
        log.debug("prompt %d tokens -> level %g: %s", prompt_tokens, level, self.last_plan[1])
        return self.layers_at(level)

    def predict(self, level: float, prompt_tokens: int, max_tokens: int, waited_s: float = 0.0):
        """(TTFT, time per token, service seconds) of a new sequence at this level, from the profile
        scaled by the measured speed: it waits for the prompts not yet read ahead of it and its own,
        read in chunks between decode steps; then each step decodes the whole batch, it included."""
        p, k = self.profile, self.speed
        batch = [(r.dsla_count / self.n, r.context) for r in self.running if r.prefill_left == 0]
        ahead = sum(p.prefill_s(r.dsla_count / self.n, r.prefill_left, r.prompt_tokens - r.prefill_left)
                    for r in self.running if r.prefill_left > 0)  # fmt: skip
        unread = prompt_tokens + sum(r.prefill_left for r in self.running)
        chunks = math.ceil(unread / self.prefill_chunk) if batch else 0  # alone, a prompt is read in one go
        own_prefill = p.prefill_s(level, prompt_tokens)
        ttft = waited_s + k * (ahead + own_prefill + chunks * p.step_s(batch))
        mid = prompt_tokens + max_tokens // 2  # its mean context while decoding
        s = self.last_signals
        interference = max(s.step_s - s.decode_s, 0.0) if s.step_s is not None and s.decode_s is not None else 0.0
        tpot = k * p.step_s([*batch, (level, mid)]) + interference
        service = own_prefill + max_tokens * p.decode_own_s(level, mid)
        return ttft, tpot, service

    def _violation(self, pred: tuple[float, float, float]) -> float:
        c = self.config
        ttft, tpot, _ = pred
        return max(
            ttft / c.ttft_target_s if c.ttft_target_s else 0.0, tpot / c.tpot_target_s if c.tpot_target_s else 0.0
        )

    # ---- the level, at every step boundary
    def update(self, s: Signals, now: float | None = None, running: list[SeqLoad] | None = None) -> Decision | None:
        """Called by the engine at every step boundary; returns a decision when the level moves or
        running sequences should be converted."""
        now = time.monotonic() if now is None else now
        self.last_signals = s
        if running is not None:
            self.running = list(running)
        self._calibrate(s)
        if self.policy != "adaptive":
            return None
        c = self.config
        high = self._high(s)
        calm = (
            s.memory_pressure < c.memory_low
            and s.queue_depth <= c.queue_low
            and s.waiting_tokens < c.waiting_tokens_low
            and self._below(s.decode_s, c.tpot_target_s)
            and self._below(s.step_s, c.tpot_target_s)
            and self._below(s.ttft_s, c.ttft_target_s)
            and self._below(s.head_ttft_s, c.ttft_target_s)
        )
        self.calm_since = (self.calm_since if self.calm_since is not None else now) if calm else None
        if now - self.last_change < c.cooldown_s:
            return None
        if high:
            trigger, reason = high[0][0], "; ".join(r for _, r in high)
            to = self.top if self.profile is not None else min(self.level + c.step, self.top)
            to = max(to, self.level)
            running = any(t in ("memory", "latency") for t, _ in high)
            targets = self._running_targets(to, "memory" in [t for t, _ in high]) if running else {}
            if to > self.level or targets:
                return self._decide(now, to, trigger, reason, running, targets)
        if self.level > 0 and self.calm_since is not None and now - self.calm_since >= c.cooldown_s:
            reason = (
                f"load fell for {now - self.calm_since:.0f} s: queue {s.queue_depth}, waiting tokens "
                f"{s.waiting_tokens}, memory {s.memory_pressure:.2f}"
                + (f", decode {1000 * s.decode_s:.0f} ms per token" if s.decode_s is not None else ", no recent decode")
            )
            return self._decide(now, max(self.level - c.step, 0.0), "load_fell", reason, False)
        return None

    def _below(self, value: float | None, target: float | None) -> bool:
        return target is None or value is None or value < self.config.low_ratio * target

    def _high(self, s: Signals) -> list[tuple[str, str]]:
        """(trigger, reason) for each signal above its high threshold."""
        c, high = self.config, []
        if s.memory_pressure >= c.memory_high:
            high.append(("memory", f"memory pressure {s.memory_pressure:.2f} >= {c.memory_high}"))
        if c.tpot_target_s is not None and s.decode_s is not None:
            ms, target = 1000 * s.decode_s, 1000 * c.tpot_target_s
            if s.decode_s >= c.tpot_target_s:
                high.append(("latency", f"decode {ms:.0f} ms per token >= {target:.0f} ms"))
            elif s.step_s is not None and s.step_s >= c.tpot_target_s:
                high.append(("interference", f"steps with prefill {1000 * s.step_s:.0f} ms >= {target:.0f} ms "
                                             f"(decode alone {ms:.0f} ms)"))  # fmt: skip
        if c.ttft_target_s is not None:
            for name, v in (("measured", s.ttft_s), ("queue head's predicted", s.head_ttft_s)):
                if v is not None and v >= c.ttft_target_s:
                    high.append(("wait", f"{name} time to first token {v:.1f} s >= {c.ttft_target_s:g} s"))
        if s.queue_depth >= c.queue_high:
            high.append(("queue", f"queue depth {s.queue_depth} >= {c.queue_high}"))
        if s.waiting_tokens >= c.waiting_tokens_high:
            high.append(("waiting_tokens", f"waiting prompt tokens {s.waiting_tokens} >= {c.waiting_tokens_high}"))
        return high

    def _calibrate(self, s: Signals) -> None:
        """Measured decode step over the profile's prediction for the batch that ran it."""
        if self.profile is None or s.decode_s is None:
            return
        batch = [(r.dsla_count / self.n, r.context) for r in self.running if r.prefill_left == 0]
        predicted = self.profile.step_s(batch)
        if predicted > 0:
            self.speed = min(max(s.decode_s / predicted, 0.2), 5.0)

    def _running_targets(self, level: float, for_memory: bool) -> dict[str, int]:
        """Layers to fold each running sequence up to. For memory: its ceiling (every KV byte folded
        is freed). For decode time: with a profile, the level with the cheapest decode at its
        context, where that beats its own by 3 % (at short contexts DSLA can decode slower)."""
        targets = {}
        for r in self.running:
            hi = self.seq_ceiling(r.prompt_tokens, r.max_level, level)
            best = hi
            if not for_memory and self.profile is not None:
                own = self.profile.decode_own_s
                best = min(self.grid(hi), key=lambda lv: (own(lv, r.context), lv))
                if own(best, r.context) > 0.97 * own(r.dsla_count / self.n, r.context):
                    continue
            if self.layers_at(best) > r.dsla_count:
                targets[r.id] = self.layers_at(best)
        return targets

    def set(self, policy: str | None = None, level: float | None = None, convert_running: bool = False,
            running: list[SeqLoad] | None = None) -> Decision:  # fmt: skip
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
        if running is not None:
            self.running = list(running)
        target = self.level if level is None else level
        targets = {}
        if convert_running:
            for r in self.running:
                count = self.layers_at(self.seq_ceiling(r.prompt_tokens, r.max_level, target))
                if count > r.dsla_count:
                    targets[r.id] = count
        what = f"policy {policy}" + (f", level {level}" if level is not None else "")
        return self._decide(time.monotonic(), target, "manual", f"manual: {what}", convert_running, targets)

    def _decide(self, now: float, to: float, trigger: str, reason: str, convert_running: bool,
                targets: dict[str, int] | None = None) -> Decision:  # fmt: skip
        d = Decision(time.time(), self.policy, self.level, to, trigger, reason, convert_running, targets or {},
                     asdict(self.last_signals))  # fmt: skip
        self.level, self.last_change, self.calm_since = to, now, None
        self.decisions.append(d)
        log.info("conversion level %.3f -> %.3f (%s)%s", d.from_level, to, reason,
                 f"; folding {len(d.targets)} running sequences" if d.targets else "")  # fmt: skip
        return d

    def snapshot(self) -> dict:
        c = self.config
        caps = c.active_caps
        return {
            "policy": self.policy,
            "level": self.level,
            "layers_for_new_sequences": self.layers_at(self.admission_ceiling()),  # at most, with a profile
            "max_conversion": c.max_conversion,
            "quality_budget": c.quality_budget,
            "quality_level": self.quality_level,
            "slo": {"ttft_s": c.ttft_target_s, "tpot_s": c.tpot_target_s},
            "step": c.step,
            "caps": [{"prompt_tokens_below": None if b == float("inf") else int(b), "max_level": f} for b, f in caps],
            "caps_apply": self.policy == "adaptive" and bool(caps),
            "profile": self.profile.summary() if self.profile is not None else None,
            "speed_vs_profile": self.speed if self.profile is not None else None,
            "last_plan": {"level": self.last_plan[0], "reason": self.last_plan[1]} if self.last_plan else None,
            "cooldown_s": c.cooldown_s,
            "window_s": c.window_s,
            "signals": asdict(self.last_signals),
            "decisions": [d.to_dict() for d in reversed(self.decisions)],
        }
