"""DSLAAttention: a drop-in replacement for a Llama-family ``self_attn`` module.

It reuses the replaced attention's q/k/v/o projections (the very same ``nn.Linear`` objects, so a
converted layer costs no extra weights) and adds:

- two gate projections (far = history, close = recency) producing per-channel log-decays
  ``g = max(logsigmoid(W [k; v] + b) / 16, GATE_MIN)`` for every KV head;
- mixing logits ``alpha`` (one (far, close) pair per query head), w = softmax(alpha);
- a per-channel output gain, because each state's read-out is RMS-normalised.

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
from dsla_serve.ops import GATE_MIN, StatePair, chunk_dsla, step_dsla


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding as Llama applies it: x (B, H, T, D), cos/sin (B, T, D). Use -sin to undo it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


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

    def gates(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Log-decays (B, Hkv, T, D) of both states from un-rotated keys and values (B, Hkv, T, D)."""
        B, H, T, D = k.shape
        x = torch.cat((k, v), dim=-1).transpose(1, 2).reshape(B, T, 2 * H * D)
        out = []
        for gate in (self.gate_far, self.gate_close) if self.gate_close is not None else (self.gate_far,):
            g = F.logsigmoid(gate(x).float()) / self.config.gate_normalizer
            out.append(g.clamp(min=GATE_MIN).view(B, T, H, D).transpose(1, 2))
        return out[0], out[-1]

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, state: StatePair | None = None
    ) -> tuple[Tensor, StatePair]:
        """Projected, un-rotated q/k/v -> output before o_proj (B, T, Hq*D) and the new state pair."""
        B, _, T, _ = q.shape
        g_far, g_close = self.gates(k, v)
        scale = self.gain[:, None, :]  # (Hq, 1, D)
        if self.config.output_gate:  # (B, Hq, T, D), from the un-rotated query of each token
            scale = scale * 2 * torch.sigmoid(self.out_gate(q) + self.out_gate_bias[:, None, :])
        if self.config.rope:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        kernel = step_dsla if T == 1 else chunk_dsla
        extra = {} if T == 1 else {"chunk_size": self.config.chunk_size}
        o, state = kernel(
            q, k, v, g_far, g_close, self.alpha,
            normalize=self.config.normalize, eps=self.config.eps, initial_state=state, **extra,
        )  # fmt: skip
        o = o * scale
        return o.transpose(1, 2).reshape(B, T, -1), state

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
        o, _ = self.attend(q, k, v, *position_embeddings)
        return self.o_proj(o), None

    @torch.no_grad()
    def fold_kv_cache(self, keys: Tensor, values: Tensor, cos: Tensor, sin: Tensor) -> StatePair:
        """The state pair a DSLA prefill of the cached tokens would have built, from their KV cache.

        keys: (B, Hkv, L, D) as cached by attention (after RoPE); values: (B, Hkv, L, D);
        cos/sin: (B, L, D) for positions 0..L-1.
        """
        k = rotate(keys, cos, -sin)  # undo RoPE: the gates read un-rotated keys
        g_far, g_close = self.gates(k, values)
        k_state = keys if self.config.rope else k
        B, H, L, D = keys.shape  # the read-out is discarded: a zero query, any mixing
        _, state = chunk_dsla(
            keys.new_zeros(B, H, L, D), k_state, values, g_far, g_close, keys.new_zeros(2),
            normalize=self.config.normalize, chunk_size=self.config.chunk_size,
        )  # fmt: skip
        return state
