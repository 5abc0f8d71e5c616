"""DSLAAttention: a drop-in replacement for a Llama-family ``self_attn`` module.

It reuses the replaced attention's q/k/v/o projections (the very same ``nn.Linear`` objects, so a
converted layer costs no extra weights) and adds:

- two gate projections (far = history, close = recency) producing per-channel log-decays
  ``g = max(logsigmoid(W [k; v] + b) / 16, GATE_MIN)`` for every KV head;
- mixing logits ``alpha`` (one (far, close) pair per query head), w = softmax(alpha);
- a per-channel output gain, because each state's read-out is RMS-normalised;
- optionally (``window = W > 0``) an exact softmax window over the last W tokens, with RoPE as the
  replaced attention applies it, and a per-head logit ``beta`` mixing its read-out with the states'.
  Tokens enter the states only when they leave the window, so a sequence shorter than W gets the
  replaced attention's output exactly, and a converted layer caches W keys/values + two states.

NOTE(decisions):
- Gates read the layer's own keys (before RoPE) and values rather than the hidden state. Those are
  exactly what an attention layer's KV cache holds, so a running sequence's KV cache can be folded
  into the DSLA state pair exactly (``fold_kv_cache``): the in-flight conversion the server needs.
- Grouped-query attention: states live per KV head (3 for SmolLM2-135M); each query head reads its
  group's state, as it reads its group's keys in attention. The state is G times smaller than with
  per-query-head states and folds from the KV cache one to one.
- Unnormalised read-outs (the authors' code) explode when q/k/v are reused from softmax attention;
  RMS normalisation with a learned gain fixes it. RoPE inside DSLA and the normalisation form were
  chosen by measurement (README, "Design decisions").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsla_serve.config import DSLAConfig
from dsla_serve.ops import GATE_MIN, StatePair, step_dsla
from dsla_serve.ops.chunk import compute_dtype
from dsla_serve.ops.naive import GateLogits, log_decays, mixing_weights, rotate
from dsla_serve.ops.native import StepParams, prefill_dsla

# NOTE(decisions): above this many rows (prefill) the o adapter is merged into o_proj's weight: one GEMM
# instead of o_proj plus two rank-r products and an add (at 2048 tokens 0.48 vs 1.15 ms a layer). Decode
# keeps them apart: there o_proj runs on its int4 codes, which a merged weight would not have.
MERGED_O_MIN_ROWS = 16


def stamp(t: Tensor) -> tuple:
    """What identifies a tensor's current values for a cache key: identity, storage, dtype and version
    (inference tensors have no version counter; they cannot be changed in place outside inference mode)."""
    return id(t), t.data_ptr(), t.dtype, -1 if t.is_inference() else t._version


class LowRank(nn.Module):
    """x -> B·A·x with B zero-initialised, so an adapter starts as a no-op."""

    def __init__(self, n_in: int, n_out: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, n_in, dtype=dtype) * n_in**-0.5)
        self.B = nn.Parameter(torch.zeros(n_out, rank, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B)


def gate_bias(half_life: tuple[float, float], n: int, normalizer: float) -> Tensor:
    """Biases whose gates decay with half-lives spread log-uniformly over ``half_life`` across n channels."""
    lives = torch.logspace(math.log10(half_life[0]), math.log10(half_life[1]), n, dtype=torch.float64)
    g = -math.log(2.0) / lives  # per-token log-decay
    return torch.logit(torch.exp(normalizer * g)).float()  # sigmoid(b) ** (1 / normalizer) == exp(g)


class DSLAAttention(nn.Module):
    """Dual-state linear attention over the q/k/v/o weights of ``attention`` (a Llama-style self_attn)."""

    def __init__(self, attention: nn.Module, model_config, layer_idx: int, config: DSLAConfig | None = None):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attention, name, None), nn.Linear):
                raise TypeError(f"layer {layer_idx}: {type(attention).__name__} has no nn.Linear {name}")
        self.config = config or DSLAConfig()
        self.layer_idx = layer_idx
        self.num_heads = model_config.num_attention_heads
        self.num_kv_heads = model_config.num_key_value_heads
        self.head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // self.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
        )
        kv_dim = self.num_kv_heads * self.head_dim
        dtype = attention.q_proj.weight.dtype
        self.gate_far = nn.Linear(2 * kv_dim, kv_dim, bias=True, dtype=dtype)
        self.gain = nn.Parameter(torch.ones(self.num_heads, self.head_dim, dtype=dtype))
        c = self.config
        if c.output_gate:  # zero-initialised: 2·sigmoid(0) = 1, so the gate starts as the identity
            self.out_gate = nn.Linear(self.head_dim, self.head_dim, bias=False, dtype=dtype)
            self.out_gate_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim, dtype=dtype))
            nn.init.zeros_(self.out_gate.weight)
        if c.variant == "dsla":
            self.gate_close = nn.Linear(2 * kv_dim, kv_dim, bias=True, dtype=dtype)
            self.alpha = nn.Parameter(torch.zeros(self.num_heads, 2))
        else:  # single state: far gate only, all weight on it
            self.gate_close = None
            self.register_buffer("alpha", torch.tensor([0.0, -math.inf]), persistent=False)
        if c.window:  # logit of the exact window's read-out beside the states' (far, close)
            self.beta = nn.Parameter(torch.full((self.num_heads,), c.window_logit))
        # Low-rank adapters of the state path. q and o read the layer's input and output (q is never
        # cached); k and v act on k and v themselves, so an adapted layer still folds a KV cache exactly.
        # The window keeps the replaced attention's own q/k/v.
        hidden, q_dim, r = model_config.hidden_size, self.num_heads * self.head_dim, c.adapter_rank
        shapes = {"q": (hidden, q_dim), "k": (kv_dim, kv_dim), "v": (kv_dim, kv_dim), "o": (q_dim, hidden)}
        self.adapters = nn.ModuleDict({a: LowRank(*shapes[a], r, dtype) for a in c.adapters if r})
        self.reset_gates()

    @torch.no_grad()
    def reset_gates(self) -> None:
        """Start data-independent: one slow state, one fast state (GLA: one state spanning both ranges)."""
        c, _n = self.config, self.num_kv_heads * self.head_dim
        far_range = c.far_half_life if c.variant == "dsla" else (c.close_half_life[0], c.far_half_life[1])
        for gate, life in ((self.gate_far, far_range), (self.gate_close, c.close_half_life)):
            if gate is not None:
                gate.weight.zero_()
                per_head = gate_bias(life, self.head_dim, c.gate_normalizer)
                gate.bias.copy_(per_head.repeat(self.num_kv_heads))

    def dsla_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters DSLA adds (q/k/v/o belong to the base model)."""
        return {n: p for n, p in self.named_parameters() if not n.split(".")[0].endswith("_proj")}

    def project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, hidden) -> q (B, Hq, T, D), k (B, Hkv, T, D) before RoPE, v (B, Hkv, T, D)."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    def adapt(self, name: str, x: Tensor) -> Tensor:
        """x + adapter(x) over the flattened heads of x (B, H, T, D); x itself without that adapter."""
        if name not in self.adapters:
            return x
        B, H, T, D = x.shape
        flat = x.transpose(1, 2).reshape(B, T, H * D)
        return x + self.adapters[name](flat).view(B, T, H, D).transpose(1, 2)

    def state_query(self, q: Tensor, hidden: Tensor | None) -> Tensor:
        """The query the states read: q (B, Hq, T, D) plus the q adapter of the layer input hidden (B, T, hidden)."""
        if "q" not in self.adapters:
            return q
        if hidden is None:
            raise ValueError("this layer has a q adapter: pass the layer input (hidden)")
        B, Hq, T, D = q.shape
        ada = self.adapters["q"]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, hidden, ada.A, ada.B)):
            return q + ada(hidden).view(B, T, -1, D).transpose(1, 2)
        # inference: the adapter's output added by its own matmul (profile of a 1024-token prefill: the q
        # adapter's ops 9.5 -> 7.3 ms over 30 layers)
        flat = q.transpose(1, 2).reshape(B * T, Hq * D)
        return torch.addmm(flat, hidden.reshape(B * T, -1) @ ada.A.t(), ada.B.t()).view(B, T, Hq, D).transpose(1, 2)

    def output(self, o: Tensor) -> Tensor:
        """o_proj of the mixed read-out (B, T, Hq*D), plus the o adapter."""
        if "o" not in self.adapters:
            return self.o_proj(o)
        ada = self.adapters["o"]
        trained = (o, ada.A, ada.B, *self.o_proj.parameters())
        if o.shape[-2] > MERGED_O_MIN_ROWS and not (torch.is_grad_enabled() and any(t.requires_grad for t in trained)):
            merged = self.merged_output_weight()
            return F.linear(o.to(merged.dtype), merged, getattr(self.o_proj, "bias", None)).to(o.dtype)
        return self.o_proj(o) + ada(o)

    def merged_output_weight(self) -> Tensor:
        """o_proj's weight (as it computes: dequantised for a quantised o_proj) plus the o adapter's B·A,
        one matrix; cached while neither changes."""
        ada = self.adapters["o"]
        # keyed on what the modules store (a quantised o_proj's .weight is a fresh de-quantised tensor)
        stored = (*self.o_proj.parameters(), *self.o_proj.buffers(), ada.A, ada.B)
        key = (id(self.o_proj), *(stamp(t) for t in stored))
        if getattr(self, "_merged_o", (None,))[0] != key:
            w = self.o_proj.weight
            f = compute_dtype(w.dtype)
            with torch.no_grad():
                self._merged_o = (key, (w.to(f) + ada.B.to(f) @ ada.A.to(f)).to(w.dtype))
        return self._merged_o[1]

    def gate_logits(self, k: Tensor, v: Tensor) -> GateLogits:
        """The gates' pre-activations (B, T, 1 | 2, Hkv, D) from un-rotated keys and values (B, Hkv, T, D),
        with the normaliser and floor that make them log-decays (``ops.naive.log_decays``)."""
        B, H, T, D = k.shape
        x = torch.cat((k, v), dim=-1).transpose(1, 2).reshape(B, T, 2 * H * D)
        weight, bias = self.gate_weights()
        pre = F.linear(x, weight, bias).view(B, T, len(weight) // (H * D), H, D)
        return pre, self.config.gate_normalizer, GATE_MIN

    def state_inputs(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, GateLogits]:
        """The states' keys and values (B, Hkv, L, D), adapted, and their gates' pre-activations, from
        un-rotated k and v (B, Hkv, L, D).

        NOTE(decisions): in inference both adapters and both gates run on one (B·L, 2·Hkv·D) matrix of rows
        [k of every head | v of every head]: a matmul for both adapters' codes, one addmm for their outputs
        and one gate projection with its columns in that order, instead of ~12 smaller ops and a cat per
        layer: a 100 % DSLA prefill of 1024 tokens took 296 / 296 / 299 ms against 307 / 310 / 302 before (3
        alternating runs; ~2 % at 2048 tokens). The modules' path stays for training."""
        modules = [self.adapters[n] for n in "kv" if n in self.adapters] + [self.gate_far, self.gate_close]
        weights = [p for m in modules if m is not None for p in m.parameters()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, *weights)):
            k_s, v_s = self.adapt("k", k), self.adapt("v", v)
            return k_s, v_s, self.gate_logits(k_s, v_s)
        B, H, L, D = k.shape
        kv = torch.cat((k, v), 1).transpose(1, 2).reshape(B * L, 2 * H * D)
        codes, outputs, weight, bias = self.kv_weights()
        if codes is not None:
            kv = torch.addmm(kv, kv @ codes, outputs)
        pre = F.linear(kv, weight, bias).view(B, L, len(weight) // (H * D), H, D)
        kv = kv.view(B, L, 2, H, D)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), (pre, self.config.gate_normalizer, GATE_MIN)

    def kv_weights(self) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        """For ``state_inputs``: the k and v adapters as one block-diagonal pair, A transposed (2·Hkv·D, 2r)
        and B transposed (2r, 2·Hkv·D) (None without either adapter), and the gates' weight with its
        columns as [k of every head | v of every head], and bias; cached while none of them changes."""
        parts = [self.adapters[n] for n in "kv" if n in self.adapters]
        key = tuple(stamp(p) for m in (*parts, *self.gate_modules()) for p in m.parameters())
        if getattr(self, "_kv_cache", (None,))[0] != key:
            with torch.no_grad():
                weight, bias = self.gate_weights()
                H, D = self.num_kv_heads, self.head_dim
                weight = weight.view(len(weight), H, 2, D).transpose(1, 2).reshape(len(weight), 2 * H * D)
                codes = outputs = None
                if parts:
                    r, n = parts[0].A.shape[0], H * D
                    codes = weight.new_zeros(2 * n, 2 * r)
                    outputs = weight.new_zeros(2 * r, 2 * n)
                    for j, name in enumerate("kv"):
                        if name in self.adapters:
                            codes[j * n : (j + 1) * n, j * r : (j + 1) * r] = self.adapters[name].A.t()
                            outputs[j * r : (j + 1) * r, j * n : (j + 1) * n] = self.adapters[name].B.t()
            self._kv_cache = (key, codes, outputs, weight.contiguous(), bias)
        return self._kv_cache[1:]

    def gates(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Log-decays (B, Hkv, T, D) of both states from un-rotated keys and values (B, Hkv, T, D)."""
        return log_decays(*self.gate_logits(k, v))

    def gate_modules(self) -> tuple[nn.Linear, ...]:
        """The gate projections: far and close, or far alone (single-state variant)."""
        return (self.gate_far,) if self.gate_close is None else (self.gate_far, self.gate_close)

    def gate_weights(self) -> tuple[Tensor, Tensor]:
        """Both gates' weights stacked, so one matmul makes both; cached while the weights do not change."""
        parts = self.gate_modules()
        if torch.is_grad_enabled() and any(p.requires_grad for m in parts for p in m.parameters()):
            return torch.cat([m.weight for m in parts]), torch.cat([m.bias for m in parts])
        key = tuple(stamp(p) for m in parts for p in m.parameters())
        if getattr(self, "_gate_cache", (None,))[0] != key:
            self._gate_cache = (key, torch.cat([m.weight for m in parts]), torch.cat([m.bias for m in parts]))
        return self._gate_cache[1], self._gate_cache[2]

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, state: StatePair | None = None,
        prefix: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, hidden: Tensor | None = None,
    ) -> tuple[Tensor, StatePair, tuple[Tensor, Tensor]]:  # fmt: skip
        """Projected, un-rotated q/k/v (B, H, T, D) -> output before o_proj (B, T, Hq*D), the new state
        pair and the new window (rotated keys, values), each (B, Hkv, min(W, P + T), D).

        ``prefix``: the window a cached sequence holds, (rotated keys, values, cos, sin) of its last
        P = min(W, length) tokens in position order; ``state`` covers every older token.
        ``hidden``: the layer input (B, T, hidden), needed by a q adapter.
        """
        B, _, T, _ = q.shape
        W = self.config.window
        tail = min(W, T)  # the new tokens that stay in the window: their rotated keys are cached
        k_rot = rotate(k[:, :, T - tail :], cos[:, T - tail :], sin[:, T - tail :])
        v_win = v
        if prefix is not None and prefix[0].shape[2]:
            pk_rot, pv, pcos, psin = prefix
            pk = rotate(pk_rot, pcos, -psin)  # the states and gates read un-rotated keys
            k, v_win, k_rot = torch.cat((pk, k), 2), torch.cat((pv, v), 2), torch.cat((pk_rot, k_rot), 2)
            cos, sin = torch.cat((pcos, cos), 1), torch.cat((psin, sin), 1)
        k_s, v_s, gate_logits = self.state_inputs(k, v_win)  # the states' keys and values
        # the output gate's pre-activation (B, Hq, T, D), from the un-rotated query of each token
        gate = (self.out_gate(q), self.out_gate_bias) if self.config.output_gate else None
        o, state = prefill_dsla(  # RoPE, gate activations and output gate applied inside (or around) the scan
            self.state_query(q, hidden), k_s, v_s, None, None, self.alpha, normalize=self.config.normalize,
            eps=self.config.eps, initial_state=state, gain=self.gain, window=W, rotary=(q, k, cos, sin),
            beta=self.window_logit(), window_values=v_win, out_gate=gate, chunk_size=self.config.chunk_size,
            gate_logits=gate_logits, rope_states=self.config.rope,
        )  # fmt: skip
        n = min(W, k_rot.shape[2])  # the window now: the last n tokens
        return (
            o.transpose(1, 2).reshape(B, T, -1),
            state,
            (k_rot[:, :, k_rot.shape[2] - n :], v_win[:, :, v_win.shape[2] - n :]),
        )

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, state: Tensor,
        window: tuple[Tensor, Tensor, Tensor] | None = None,
        leaving: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None, hidden: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """One decode token for a batch; returns the output before o_proj (B, 1, Hq*D).

        ``state`` (B, 2, Hkv, K, V) float32 is updated in place.

        q (B, Hq, 1, D), k/v (B, Hkv, 1, D) un-rotated. With a window: ``window`` = (rotated keys, values,
        valid) as ring buffers (B, Hkv, W, D), (B, Hkv, W, D), (B, W) holding the new token already, and
        ``leaving`` = (rotated key, value, cos, sin, present) of the token leaving the window, (B, Hkv, 1, D)
        twice, (B, 1, D) twice and (B,) bool: it enters the states now.
        """
        B = q.shape[0]
        q_rot = rotate(q, cos, sin)
        if window is None:
            k_in, v_in, enters = self.adapt("k", k), self.adapt("v", v), None
            kcos, ksin = cos, sin
        else:
            lk_rot, lv, kcos, ksin, enters = leaving
            k_in, v_in = self.adapt("k", rotate(lk_rot, kcos, -ksin)), self.adapt("v", lv)
        g_far, g_close = self.gates(k_in, v_in)
        q_state = self.state_query(q, hidden)
        if self.config.rope:
            q_state, k_in = rotate(q_state, cos, sin), rotate(k_in, kcos, ksin)
        o, _ = step_dsla(
            q_state, k_in, v_in, g_far, g_close, self.alpha, normalize=self.config.normalize, eps=self.config.eps,
            state_buffer=state, gain=self.gain, enters=enters, q_rot=q_rot, beta=self.window_logit(),
            window_keys=None if window is None else window[0], window_values=None if window is None else window[1],
            window_valid=None if window is None else window[2], weights=self.mix_weights(),
        )  # fmt: skip
        if self.config.output_gate:
            o = o * (2 * torch.sigmoid(self.out_gate(q) + self.out_gate_bias[:, None, :]))
        return o.transpose(1, 2).reshape(B, 1, -1)

    def step_inputs(self, refresh: bool = False) -> list[nn.Parameter]:
        """The parameters the fused decode step reads (collected once: walking the module tree costs 16 µs;
        ``refresh`` after parameters were replaced)."""
        if refresh or not hasattr(self, "_step_inputs"):
            self._step_inputs = list(self.dsla_parameters().values())
        return self._step_inputs

    def step_params(self, dtype: torch.dtype, generation: int | None = None) -> StepParams:
        """The parameters as the fused decode step reads them (``dsla_serve.ops.native``), in the states'
        dtype; cached while no parameter changes: keyed on their ``stamp``s, or on ``generation``, a count
        the caller moves when any of them changes (``HybridModel`` watches every layer's at once)."""
        key = (dtype, list(map(stamp, self.step_inputs())) if generation is None else generation)
        if getattr(self, "_step_cache", (None,))[0] != key:
            with torch.no_grad():
                none = torch.empty(0, dtype=dtype, device=self.gain.device)
                cast = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731

                def keep(t: Tensor) -> Tensor:  # bfloat16 adapters stay so: half the bytes, widened exactly
                    return t.detach().contiguous() if (t.dtype, dtype) == (torch.bfloat16, torch.float32) else cast(t)

                ada = {n: (keep(self.adapters[n].A), keep(self.adapters[n].B.t())) for n in self.adapters}
                (ak, bk), (av, bv), (aq, bq), (ao, bo) = (ada.get(n, (none, none)) for n in "kvqo")
                weight, bias = self.gate_weights()  # columns per KV head [k_h | v_h] -> [k | v] as the step reads
                weight = weight.view(len(weight), self.num_kv_heads, 2, self.head_dim).transpose(1, 2).flatten(1)
                c = self.config
                p = StepParams(
                    weight.detach().contiguous(), bias.detach().contiguous(), ak, bk, av, bv, aq, bq, ao, bo,
                    cast(self.mix_weights()), cast(self.gain), cast(self.out_gate.weight.t()) if c.output_gate else none,
                    cast(self.out_gate_bias) if c.output_gate else none, (self.num_heads, self.num_kv_heads, self.head_dim),
                    c.gate_normalizer, GATE_MIN, c.eps, c.normalize, c.rope,
                    not isinstance(self.k_proj, nn.Linear),  # quantised projections (int4/int8): int8 gates too
                )  # fmt: skip
            self._step_cache = (key, p)
        return self._step_cache[1]

    def window_logit(self) -> Tensor | None:
        return self.beta if self.config.window else None

    def mix_weights(self) -> Tensor:
        """softmax over (far, close[, window]) per query head, (Hq, 2|3), cached while alpha/beta do not change."""
        params = [self.alpha] + ([self.beta] if self.config.window else [])
        key = tuple(stamp(p) for p in params)
        if getattr(self, "_mix_cache", (None,))[0] != key or torch.is_grad_enabled():
            self._mix_cache = (key, mixing_weights(self.alpha, self.num_heads, self.window_logit()))
        return self._mix_cache[1]

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        """Hugging Face ``self_attn`` signature, full-sequence only (no padding, no HF cache).

        Cached generation runs through ``dsla_serve.model.HybridModel``, whose cache holds the states.
        """
        if past_key_values is not None:
            raise ValueError(
                "DSLA layers do not use a Hugging Face cache: call the model with use_cache=False, "
                "or generate with dsla_serve.model.HybridModel"
            )
        if position_embeddings is None:
            raise ValueError("DSLAAttention needs position_embeddings (cos, sin) like LlamaAttention")
        q, k, v = self.project(hidden_states)
        o = self.attend(q, k, v, *position_embeddings, hidden=hidden_states)[0]
        return self.output(o), None

    @torch.no_grad()
    def fold_kv_cache(
        self, keys: Tensor, values: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[StatePair, tuple[Tensor, Tensor]]:
        """The state pair and window a DSLA prefill of the cached tokens would have built, from their KV cache.

        keys: (B, Hkv, L, D) as cached by attention (after RoPE); values: (B, Hkv, L, D);
        cos/sin: (B, L, D) for positions 0..L-1. The last W tokens stay exact as the window; older
        ones fold into the states.
        """
        B, H, L, D = keys.shape
        n = max(L - self.config.window, 0)
        window = (keys[:, :, n:].clone(), values[:, :, n:].clone())
        if n == 0:  # every cached token is still in the window: empty states
            zeros = keys.new_zeros(B, H, D, D, dtype=torch.float64 if keys.dtype == torch.float64 else torch.float32)
            return (zeros, zeros.clone()), window
        k = rotate(keys[:, :, :n], cos[:, :n], -sin[:, :n])  # undo RoPE: the gates read un-rotated keys
        k, v, gate_logits = self.state_inputs(k, values[:, :, :n])
        no_queries = keys.new_zeros(B, 0, n, D)
        _, state = prefill_dsla(  # no query heads: the final states alone, made as a prefill makes them
            no_queries, k, v, None, None, keys.new_zeros(2), normalize=self.config.normalize,
            chunk_size=self.config.chunk_size, gate_logits=gate_logits, rope_states=self.config.rope,
            rotary=(no_queries, k, cos[:, :n], sin[:, :n]),
        )  # fmt: skip
        return state, window
