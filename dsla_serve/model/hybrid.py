"""HybridModel: the engine's forward over a Llama-family model whose layers run attention or DSLA.

The layer plan (which layers run DSLA) is per sequence and lives in its cache: a layer with a
``StateLayer`` runs DSLA, one with a ``KVLayer`` runs attention. So one batched call can mix
sequences with different plans; at each layer the batch splits into an attention group and a DSLA
group that share the q/k/v/o projections. Without a cache, one plan applies to the whole batch
(training, perplexity).

The forward reuses the base model's modules (embedding, norms, MLPs, rotary embedding, lm_head)
and owns only the per-layer token mixing, so its logits equal the Hugging Face forward's (tested).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsla_serve.layers import DSLAAttention, rotate
from dsla_serve.model.cache import HybridCache, KVLayer, SequenceCache, StateLayer
from dsla_serve.model.convert import check_layers, converted_layers, decoder_layers, original_attention


class HybridModel(nn.Module):
    """Wraps a *ForCausalLM whose converted layers (``convert``) are available as DSLA."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.config = base.config
        inner = base.model
        self.embed_tokens, self.norm, self.rotary_emb = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.lm_head = base.lm_head
        self.num_layers = len(decoder_layers(base))
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads

    @property
    def dsla_layers(self) -> list[int]:
        """Layers that have DSLA weights loaded (any subset of them may run as DSLA)."""
        return converted_layers(self.base)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def dsla(self, i: int) -> DSLAAttention:
        m = decoder_layers(self.base)[i].self_attn
        if not isinstance(m, DSLAAttention):
            raise ValueError(f"layer {i} has no DSLA weights (available: {self.dsla_layers})")
        return m

    def new_cache(self, dsla_layers: Iterable[int] = (), capacity: int = 256) -> SequenceCache:
        """An empty cache for one sequence running DSLA at ``dsla_layers`` (each must be available)."""
        plan = check_layers(self.base, dsla_layers)
        for i in plan:
            self.dsla(i)
        return SequenceCache.create(
            self.num_layers, plan, self.num_kv_heads, self.head_dim, capacity, self.dtype, self.device
        )

    def cache_bytes_per_token(self, dsla_layers: Iterable[int] = ()) -> int:
        """KV bytes one more token costs a sequence with this plan (DSLA layers cost none)."""
        n_attn = self.num_layers - len(set(dsla_layers))
        return 2 * n_attn * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def state_bytes(self, dsla_layers: Iterable[int] = ()) -> int:
        return 2 * len(set(dsla_layers)) * self.num_kv_heads * self.head_dim**2 * 4

    def forward(
        self,
        input_ids: Tensor | None,
        dsla_layers: Iterable[int] | None = None,
        cache: HybridCache | None = None,
        logits_for: str = "all",
        hidden_states_at: Iterable[int] = (),
        stop_at: int | None = None,
        start_at: int = 0,
        start_hidden: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Logits for input_ids (B, T) and the outputs of the layers in ``hidden_states_at``.

        Without ``cache`` every sequence runs DSLA at ``dsla_layers`` (default: all available) and
        autograd works. With ``cache`` each sequence follows its own cache's plan, continues from its
        cached length, and the cache is updated in place. ``logits_for``: "all", "last" or "none".
        ``stop_at=i`` returns instead the residual stream entering layer i (B, T, hidden) and no logits;
        ``start_at=i`` with ``start_hidden`` (that stream) runs layers i.. only (cache-free forwards).
        """
        B, T = input_ids.shape if start_hidden is None else start_hidden.shape[:2]
        device = self.device
        if cache is not None and (stop_at is not None or start_hidden is not None):
            raise ValueError("stop_at/start_at are for cache-free forwards (a cached forward runs every layer)")
        if cache is not None:
            if len(cache) != B:
                raise ValueError(f"cache holds {len(cache)} sequences for a batch of {B}")
            starts = torch.tensor([s.length for s in cache.sequences], device=device)
            plans = [s.dsla_layers for s in cache.sequences]
        else:
            plan = frozenset(self.dsla_layers if dsla_layers is None else check_layers(self.base, dsla_layers))
            starts, plans = torch.zeros(B, dtype=torch.long, device=device), [plan] * B
        positions = starts[:, None] + torch.arange(T, device=device)  # (B, T)
        x = self.embed_tokens(input_ids) if start_hidden is None else start_hidden
        cos, sin = self.rotary_emb(x, positions)  # (B, T, D) each
        keep = set(hidden_states_at)
        hidden: dict[int, Tensor] = {}
        for i, layer in enumerate(decoder_layers(self.base)):
            if i < start_at:
                continue
            if i == stop_at:
                return x, hidden
            h = layer.input_layernorm(x)
            x = x + self.mix(i, h, cos, sin, [i in p for p in plans], cache)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if i in keep:
                hidden[i] = x
        if cache is not None:
            for s in cache.sequences:
                s.length += T
        if logits_for == "none":
            return x.new_empty(0), hidden
        if logits_for == "last":
            x = x[:, -1:]
        return self.lm_head(self.norm(x)), hidden

    def mix(
        self, i: int, h: Tensor, cos: Tensor, sin: Tensor, use_dsla: list[bool], cache: HybridCache | None
    ) -> Tensor:
        """Token mixing of layer i for the batch h (B, T, hidden): attention or DSLA per sequence."""
        attn = original_attention(self.base, i)
        B, T, _ = h.shape
        q = attn.q_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = attn.k_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = attn.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
        groups = {flag: [b for b in range(B) if use_dsla[b] == flag] for flag in (False, True)}
        if not groups[True]:
            out = self.attend(i, q, k, v, cos, sin, cache, range(B))
        elif not groups[False]:
            out = self.attend_dsla(i, q, k, v, cos, sin, cache, range(B))
        else:
            out = h.new_empty(B, T, self.num_heads * self.head_dim)
            for flag, rows in groups.items():
                if rows:
                    idx = torch.tensor(rows, device=h.device)
                    parts = (t.index_select(0, idx) for t in (q, k, v, cos, sin))
                    run = self.attend_dsla if flag else self.attend
                    out[idx] = run(i, *parts, cache, rows)
        return attn.o_proj(out)

    def attend(self, i, q, k, v, cos, sin, cache: HybridCache | None, rows) -> Tensor:
        """Softmax attention with RoPE; appends to each sequence's KV cache. Returns (B, T, Hq*D)."""
        B, _, T, _ = q.shape
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            outs = []
            for b, row in enumerate(rows):
                layer = cache[row].layers[i]
                assert isinstance(layer, KVLayer)
                past = layer.length
                keys, values = layer.append(k[b], v[b])
                if past == 0 or T == 1:
                    mask, causal = None, T > 1
                else:  # chunked prefill: query t sees keys up to past + t
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)
                    causal = False
                outs.append(
                    F.scaled_dot_product_attention(
                        q[b : b + 1], keys[None], values[None], attn_mask=mask, is_causal=causal, enable_gqa=True
                    )
                )
            o = torch.cat(outs)
        return o.transpose(1, 2).reshape(B, T, -1)

    def attend_dsla(self, i, q, k, v, cos, sin, cache: HybridCache | None, rows) -> Tensor:
        dsla = self.dsla(i)
        if cache is None:
            return dsla.attend(q, k, v, cos, sin)[0]
        layers = [cache[row].layers[i] for row in rows]
        assert all(isinstance(layer, StateLayer) for layer in layers)
        o, (s_far, s_close) = dsla.attend(q, k, v, cos, sin, HybridCache.stack_states(layers))
        for b, layer in enumerate(layers):
            layer.state = (s_far[b], s_close[b])
        return o

    @torch.no_grad()
    def fold_to_dsla(self, seq: SequenceCache, layers: Iterable[int]) -> None:
        """In-flight conversion: turn the KV caches of ``layers`` into exact DSLA states, freeing the KV."""
        for i in check_layers(self.base, layers):
            layer = seq.layers[i]
            if isinstance(layer, StateLayer):
                continue
            dsla = self.dsla(i)
            keys, values = layer.view()
            positions = torch.arange(layer.length, device=keys.device)[None]
            cos, sin = self.rotary_emb(keys, positions)
            s_far, s_close = dsla.fold_kv_cache(keys[None], values[None], cos, sin)
            new = StateLayer(self.num_kv_heads, self.head_dim, keys.device)
            new.state = (s_far[0], s_close[0])
            seq.layers[i] = new
            seq.conversions.append(i)
