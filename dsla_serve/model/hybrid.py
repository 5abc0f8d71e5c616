"""HybridModel: the engine's forward over a Llama-family model whose layers run attention or DSLA.

The layer plan (which layers run DSLA) is per sequence and lives in its cache: a layer with a
``StateLayer`` runs DSLA, one with a ``KVLayer`` runs attention. So one batched call can mix
sequences with different plans; at each layer the batch splits into an attention group and a DSLA
group that share the q/k/v/o projections. Without a cache, one plan applies to the whole batch
(training, perplexity).

The forward reuses the base model's modules (embedding, norms, MLPs, rotary embedding, lm_head)
and owns only the per-layer token mixing, so its logits equal the Hugging Face forward's (tested).

Hot path (decode): q/k/v come from one fused projection per layer; the plan groups of a step are
computed once for all layers; on the CPU each layer is one C++ call per group: a DSLA layer steps the
group's pooled states in place, an attention layer rotates, appends to every sequence's KV cache and
attends for the whole group (``native.attention_decode``); the norms and the MLP's silu(gate)·up are
one C++ pass each, and with int4 weights (the default) a layer's norms, linears and residual adds are
three C++ calls around its token mixing (``decode_layer``). Per-layer Python is kept small: at batch 1
a layer's decode is ~0.25 ms, of which each avoidable lookup or tiny tensor op costs 2-10 µs. Without
the C++ kernels attention decode views each KV group's G query heads as G query rows (one SDPA per
sequence without the grouped-query expansion, measured 7x faster at 8192 cached keys than ``enable_gqa``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from dsla_serve.layers import DSLAAttention, rotate
from dsla_serve.model import quant
from dsla_serve.model.cache import HybridCache, KVLayer, SequenceCache, StateLayer, StatePool
from dsla_serve.model.convert import check_layers, converted_layers, decoder_layers, unconverted
from dsla_serve.model.quant import QUANTIZERS, Int4Linear
from dsla_serve.ops import native
from dsla_serve.ops.recurrent import as_dtype


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One module computing the concatenated outputs of ``linears`` (same input, same kind).

    Quantised linears are re-quantised from their dequantised weights: per-output-channel (int8) and
    per-group (int4) codes of a concatenation are the parts' own codes, so the result computes the same.
    """
    if len({type(m) for m in linears}) > 1:
        return None  # mixed kinds (a shape one kernel cannot pack): the projections stay separate
    weight = torch.cat([m.weight for m in linears])
    biases = [getattr(m, "bias", None) for m in linears]
    bias = (
        torch.cat(
            [b if b is not None else weight.new_zeros(m.weight.shape[0]) for b, m in zip(biases, linears, strict=True)]
        )
        if any(b is not None for b in biases)
        else None
    )
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    fused.requires_grad_(False)
    for cls, _ in QUANTIZERS.values():
        if isinstance(linears[0], cls):
            return cls(fused)
    return fused


GENERATIONS = itertools.count()  # of DSLA parameters, for every HybridModel (``params_generation``)
# Moves whenever any module anywhere registers a submodule, parameter or buffer (a layer converted, a
# projection replaced or quantised): memos of what a decode step reads are stale then (``int4_layer``,
# ``params_generation``). NOTE(decisions): checking the identity of the ~11 modules a layer reads cost ~4 µs
# a layer per step; this is one comparison. Any module built anywhere moves it, so the first decode steps
# after a load rebuild the memos once more.
STRUCTURE: list[int] = [0]


def _structure_changed(*_args: object) -> None:
    STRUCTURE[0] += 1


for _register in (
    nn.modules.module.register_module_module_registration_hook,
    nn.modules.module.register_module_parameter_registration_hook,
    nn.modules.module.register_module_buffer_registration_hook,
):
    _register(_structure_changed)
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)  # the C++ kernels' dtypes (no float16)
STATIC_ROPE = ("default", "linear", "llama3")  # rotary types whose tables do not change with the length
ROTARY_TABLE_MAX = 32768  # positions in ``HybridModel.rotary``'s tables (cos and sin: 8 MiB in bfloat16, D = 64)


def native_ok(x: Tensor) -> bool:
    """Whether the C++ kernels can compute on x: on the CPU, in their dtypes, with autograd off (they
    have no backward)."""
    return x.device.type == "cpu" and x.dtype in NATIVE_DTYPES and not torch.is_grad_enabled() and native.available()


def rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A Llama-style RMSNorm (float32 statistics, weight applied in the input's dtype): one C++ pass
    where ``native_ok`` and the weight has x's dtype (not for float64, the tests' reference dtype),
    else four ops instead of eight; any other norm module as it is."""
    eps, weight = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, Tensor):
        return norm(x)
    if weight.dtype == x.dtype and x.dtype != torch.float64 and native_ok(x):  # float64 keeps the ATen ops,
        return native.rms_norm(x, weight, eps)  # whose float32 summation order the kernel does not repeat
    return weight * as_dtype(F.rms_norm(as_dtype(x, torch.float32), x.shape[-1:], eps=eps), x.dtype)


@dataclass(frozen=True)
class Int4Layer:
    """A decoder layer's weights as the fused int4 decode calls read them (``HybridModel.decode_layer``)."""

    norm1: Tensor
    eps1: float
    qkv: native.Int4Args
    o_attn: native.Int4Args
    o_dsla: native.Int4Args | None  # None while the layer has no DSLA weights
    norm2: Tensor
    eps2: float
    gate_up: native.Int4Args
    down: native.Int4Args


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
        self.pools: dict[int, StatePool] = {}
        self._fused: dict[tuple[int, int], tuple[tuple, nn.Module]] = {}  # (layer, first part) -> fused
        self._groups: dict[tuple, list[tuple[list[int], list[int]]]] = {}
        self._ring: dict[tuple, tuple] = {}  # per decode step: rows' positions, rotary, ring slots, params generation
        self._watch: tuple[int, object | None] = (-1, None)  # (STRUCTURE when made, native.watch of DSLA inputs)
        self._generation = -1
        self._blocks = list(decoder_layers(base))  # convert swaps their self_attn, never the layers
        self._int4: dict[int, tuple[int, Int4Layer | None]] = {}  # layer -> (STRUCTURE when made, weights)
        self._rotary: tuple[tuple, tuple[Tensor, Tensor] | None] = ((), None)  # (key, (n, D) cos/sin tables)

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
        m = self._blocks[i].self_attn
        if not isinstance(m, DSLAAttention):
            raise ValueError(f"layer {i} has no DSLA weights (available: {self.dsla_layers})")
        return m

    def pool(self, i: int) -> StatePool:
        """Layer i's state pool (made on first use; rebuilt if the layer's window changed)."""
        W = self.dsla(i).config.window
        if i not in self.pools or self.pools[i].window != W or self.pools[i].dtype != self.dtype:
            self.pools[i] = StatePool(self.num_kv_heads, self.head_dim, W, self.dtype, self.device)
        return self.pools[i]

    def new_cache(self, dsla_layers: Iterable[int] = (), capacity: int = 256) -> SequenceCache:
        """An empty cache for one sequence running DSLA at ``dsla_layers`` (each must be available)."""
        plan = check_layers(self.base, dsla_layers)
        pools = {i: self.pool(i) for i in plan}
        return SequenceCache.create(
            self.num_layers, plan, pools, self.num_kv_heads, self.head_dim, capacity, self.dtype, self.device
        )

    @property
    def window(self) -> int:
        """The DSLA layers' exact window (0 without DSLA weights)."""
        layers = self.dsla_layers
        return self.dsla(layers[0]).config.window if layers else 0

    def cache_bytes_per_token(self, dsla_layers: Iterable[int] = ()) -> int:
        """KV bytes one more token costs a sequence with this plan (DSLA layers cost none)."""
        n_attn = self.num_layers - len(set(dsla_layers))
        return 2 * n_attn * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def state_bytes(self, dsla_layers: Iterable[int] = ()) -> int:
        """Bytes of a DSLA layer's slot (two float32 states + the window's keys/values), times the layers."""
        per_layer = 2 * self.num_kv_heads * self.head_dim**2 * 4
        per_layer += 2 * self.window * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return len(set(dsla_layers)) * per_layer

    def pool_bytes(self) -> int:
        """Bytes every state pool holds, free slots included: what DSLA caches really occupy."""
        return sum(p.nbytes() for p in self.pools.values())

    def trim_pools(self) -> None:
        for p in self.pools.values():
            p.trim()

    def attention(self, i: int) -> nn.Module:
        """Layer i's attention module, whether or not the layer is converted now."""
        return unconverted(self._blocks[i].self_attn)  # a plain list: ModuleList indexing costs µs per layer

    def qkv(self, i: int, attn: nn.Module | None = None) -> nn.Module | None:
        """Layer i's q, k and v projections fused into one (rebuilt when the projections change); None
        where they cannot be fused."""
        attn = attn if attn is not None else self.attention(i)
        return self.fused(i, [attn.q_proj, attn.k_proj, attn.v_proj])

    def fused(self, i: int, parts: list[nn.Module]) -> nn.Module | None:
        """``parts`` (same input) fused into one frozen module, memoised; None while any part trains."""
        if torch.is_grad_enabled() and any(p.requires_grad for m in parts for p in m.parameters()):
            return None
        key = tuple(
            (id(m), m.weight.data_ptr(), m.weight._version) if isinstance(m, nn.Linear) else (id(m),) for m in parts
        )
        slot = (i, id(parts[0]))
        if slot not in self._fused or self._fused[slot][0] != key:
            self._fused[slot] = (key, fuse_linears(parts))
        return self._fused[slot][1]

    def mlp(self, i: int, mlp: nn.Module, x: Tensor) -> Tensor:
        """A Llama-style gated MLP with its gate and up projections fused into one matmul (and, for silu,
        the activation times up one C++ pass); any other MLP as it is."""
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        fused = self.fused(i, parts[:2]) if all(parts) and hasattr(mlp, "act_fn") else None
        if fused is None:
            return mlp(x)
        gate_up = fused(x)
        if getattr(self.config, "hidden_act", None) == "silu" and native_ok(gate_up):
            return parts[2](native.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, -1)
        return parts[2](mlp.act_fn(gate) * up)

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
        cached length, and the cache is updated in place. ``logits_for``: "all", "last", "none" or "hidden".
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
            lengths = [s.length for s in cache.sequences]
            starts = torch.tensor(lengths, device=device)
            groups = self.groups([s.dsla_layers for s in cache.sequences])
            self._ring.clear()
        else:
            plan = frozenset(self.dsla_layers if dsla_layers is None else check_layers(self.base, dsla_layers))
            starts, lengths = torch.zeros(B, dtype=torch.long, device=device), [0] * B
            groups = [([], list(range(B))) if i in plan else (list(range(B)), []) for i in range(self.num_layers)]
        positions = starts[:, None] + torch.arange(T, device=device)  # (B, T)
        x = self.embed_tokens(input_ids) if start_hidden is None else start_hidden
        decode = cache is not None and T == 1 and native_ok(x)
        if decode:
            self._ring["pos", tuple(lengths)] = (starts,)
        cos, sin = self.rotary(x, positions, max(lengths)) if decode else self.rotary_emb(x, positions)  # (B, T, D)
        keep = set(hidden_states_at)
        hidden: dict[int, Tensor] = {}
        int4_step = decode and B <= quant.INT4_MAX_ROWS and x.dtype == torch.bfloat16
        for i, layer in enumerate(decoder_layers(self.base)):
            if i < start_at:
                continue
            if i == stop_at:
                return x, hidden
            w = self.int4_layer(i, layer) if int4_step else None
            if w is not None:
                x = self.decode_layer(i, x, w, cos, sin, groups[i], cache, lengths)
            else:
                h = rms_norm(layer.input_layernorm, x)
                x = x + self.mix(i, h, cos, sin, groups[i], cache, lengths)
                x = x + self.mlp(i, layer.mlp, rms_norm(layer.post_attention_layernorm, x))
            if i in keep:
                hidden[i] = x
        if cache is not None:
            for s in cache.sequences:
                s.length += T
        if logits_for == "none":
            return x.new_empty(0), hidden
        if logits_for == "hidden":  # the normalised final states (B, T, hidden): the caller applies lm_head
            return rms_norm(self.norm, x), hidden
        if logits_for == "last":
            x = x[:, -1:]
        return self.lm_head(rms_norm(self.norm, x)), hidden

    def int4_layer(self, i: int, block: nn.Module) -> Int4Layer | None:
        """Decoder layer i's (``block``) weights for ``decode_layer``, or None where its calls do not apply
        (not every linear int4 on the VNNI GEMV, a bias, a norm or MLP of another kind); memoised until
        ``STRUCTURE`` moves. The int4 buffers are frozen, so holding them cannot go stale but by
        replacement. Like the other C++ decode kernels, these calls do not run the modules' forward hooks."""
        made, w = self._int4.get(i, (-1, None))
        now = STRUCTURE[0]
        if made == now:
            return w
        attn, mlp = unconverted(block.self_attn), block.mlp
        norms = (block.input_layernorm, block.post_attention_layernorm)
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        w = None
        if (
            getattr(self.config, "hidden_act", None) == "silu"
            and all(isinstance(getattr(n, "variance_epsilon", None), float) for n in norms)
            and all(getattr(n, "weight", None) is not None and n.weight.dtype == torch.bfloat16 for n in norms)
            and all(isinstance(p, Int4Linear) for p in parts)
            and hasattr(mlp, "act_fn")
        ):
            linears = [self.qkv(i, attn), attn.o_proj, self.fused(i, parts[:2]), parts[2]]
            if isinstance(block.self_attn, DSLAAttention):
                linears.append(self.dsla(i).o_proj)
            args = [m.gemv_args() if isinstance(m, Int4Linear) else None for m in linears]
            if all(a is not None for a in args):
                qkv, o_attn, gate_up, down, *o_dsla = args
                eps1, eps2 = (n.variance_epsilon for n in norms)
                w = Int4Layer(norms[0].weight, eps1, qkv, o_attn, o_dsla[0] if o_dsla else None, norms[1].weight,
                              eps2, gate_up, down)  # fmt: skip
        self._int4[i] = (now, w)
        return w

    def decode_layer(
        self, i: int, x: Tensor, w: Int4Layer, cos: Tensor, sin: Tensor, group: tuple[list[int], list[int]],
        cache: HybridCache, lengths: list[int],
    ) -> Tensor:  # fmt: skip
        """Layer i's decode step for x (B, 1, hidden) with int4 weights: the norms, linears and residual adds
        in three C++ calls around the token mixing, computing what the general path computes.
        NOTE(decisions): as module calls, reshapes and adds they were ~10 Python-level calls of 3-10 us a
        layer, ~1/3 of a batch-1 decode step at 512 tokens (~3.5 of 11.8 ms)."""
        attn_rows, dsla_rows = group
        residual = quant.INT4_RESIDUAL  # as Int4Linear reads it
        h, qkv = native.norm_int4(x, w.norm1, w.eps1, w.qkv, residual)
        if attn_rows and dsla_rows:  # a batch split between plans: each group as the general path does it
            x = x + self.mix(i, h, cos, sin, group, cache, lengths, qkv)
        elif dsla_rows:
            o, extra = self.fused_step(i, qkv, h, cos, sin, cache, dsla_rows, lengths)
            x = native.int4_residual(x, o, w.o_dsla, extra, residual)
        else:
            o = self.fused_attention(i, qkv, cos, sin, cache, attn_rows)
            x = native.int4_residual(x, o, w.o_attn, None, residual)
        return native.int4_mlp(x, w.norm2, w.eps2, w.gate_up, w.down, residual)

    def groups(self, plans: list[frozenset[int]]) -> list[tuple[list[int], list[int]]]:
        """Per layer, the batch rows running attention and those running DSLA (memoised per step's plans)."""
        key = tuple(plans)
        if key not in self._groups:
            if len(self._groups) > 256:
                self._groups.clear()
            self._groups[key] = [
                ([b for b, p in enumerate(plans) if i not in p], [b for b, p in enumerate(plans) if i in p])
                for i in range(self.num_layers)
            ]
        return self._groups[key]

    def mix(
        self, i: int, h: Tensor, cos: Tensor, sin: Tensor, group: tuple[list[int], list[int]],
        cache: HybridCache | None, lengths: list[int], qkv: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Token mixing of layer i for the batch h (B, T, hidden): attention or DSLA per sequence (``qkv``:
        the fused q/k/v projection of h where the caller has it)."""
        attn = self.attention(i)
        B, T, _ = h.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if qkv is None:
            fused = self.qkv(i, attn)
            qkv = fused(h) if fused is not None else torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], -1)
        attn_rows, dsla_rows = group
        native_step = cache is not None and T == 1 and native_ok(qkv)  # the C++ decode kernels
        if native_step and not attn_rows:
            return self.dsla_output(i, *self.fused_step(i, qkv, h, cos, sin, cache, dsla_rows, lengths))
        if native_step and not dsla_rows:
            return attn.o_proj(self.fused_attention(i, qkv, cos, sin, cache, attn_rows))
        q = qkv[..., : Hq * D].view(B, T, Hq, D).transpose(1, 2)  # (B, Hq, T, D)
        k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[..., (Hq + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)
        if not dsla_rows:
            return attn.o_proj(self.attend(i, q, k, v, cos, sin, cache, attn_rows))
        if not attn_rows:
            return self.dsla(i).output(self.attend_dsla(i, q, k, v, cos, sin, cache, dsla_rows, lengths, h))
        out = h.new_empty(B, T, h.shape[-1])
        for rows, is_dsla in ((attn_rows, False), (dsla_rows, True)):
            idx = torch.tensor(rows, device=h.device)
            if is_dsla and native_step:
                sub = [t.index_select(0, idx) for t in (qkv, h, cos, sin)]
                out[idx] = self.dsla_output(i, *self.fused_step(i, *sub, cache, rows, lengths))
                continue
            if not is_dsla and native_step:
                sub = [t.index_select(0, idx) for t in (qkv, cos, sin)]
                out[idx] = attn.o_proj(self.fused_attention(i, *sub, cache, rows))
                continue
            parts = [t.index_select(0, idx) for t in (q, k, v, cos, sin)]
            if is_dsla:
                o = self.attend_dsla(i, *parts, cache, rows, lengths, h.index_select(0, idx))
                out[idx] = self.dsla(i).output(o)
            else:
                out[idx] = attn.o_proj(self.attend(i, *parts, cache, rows))
        return out

    def attend(self, i, q, k, v, cos, sin, cache: HybridCache | None, rows) -> Tensor:
        """Softmax attention with RoPE; appends to each sequence's KV cache. Returns (B, T, Hq*D)."""
        B, Hq, T, D = q.shape
        Hkv = self.num_kv_heads
        if T > 1 and native_ok(q):  # prefill: one C++ pass each (contiguous, as SDPA reads them best)
            q, k = native.rope(q, cos, sin), native.rope(k, cos, sin)
        else:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
            return o.transpose(1, 2).reshape(B, T, -1)
        outs = []
        for b, row in enumerate(rows):
            layer = cache[row].layers[i]
            assert isinstance(layer, KVLayer)
            past = layer.length
            keys, values = layer.append(k[b], v[b])
            if T == 1:  # the group's query heads as rows: (1, Hkv, G, D) against (1, Hkv, L, D)
                o = F.scaled_dot_product_attention(q[b].view(1, Hkv, Hq // Hkv, D), keys[None], values[None])
                outs.append(o.reshape(1, Hq, 1, D))
            else:  # prefill: causal, aligned to the last key when continuing a cached prefix
                mask = causal_lower_right(T, past + T) if past else None
                o = F.scaled_dot_product_attention(
                    q[b : b + 1], keys[None], values[None], attn_mask=mask, is_causal=not past, enable_gqa=True
                )
                outs.append(o)
        o = torch.cat(outs) if len(outs) > 1 else outs[0]
        return o.transpose(1, 2).reshape(B, T, -1)

    def fused_attention(self, i: int, qkv: Tensor, cos: Tensor, sin: Tensor, cache: HybridCache, rows) -> Tensor:
        """Attention decode of the rows (B, 1, Hq·D) from their fused q/k/v (B, 1, (Hq + 2·Hkv)·D): one
        C++ call rotates, appends to every row's KV cache in place and attends."""
        layers = [cache[row].layers[i] for row in rows]
        assert all(isinstance(layer, KVLayer) for layer in layers)
        lengths = [layer.reserve(1) for layer in layers]
        o = native.attention_decode(
            qkv, cos, sin, [layer.keys for layer in layers], [layer.values for layer in layers],
            lengths, (self.num_heads, self.num_kv_heads, self.head_dim),
        )  # fmt: skip
        for layer in layers:
            layer.length += 1
        return o[:, None]

    def attend_dsla(self, i, q, k, v, cos, sin, cache: HybridCache | None, rows, lengths, h: Tensor) -> Tensor:
        dsla = self.dsla(i)
        if cache is None:
            return dsla.attend(q, k, v, cos, sin, hidden=h)[0]
        layers = [cache[row].layers[i] for row in rows]
        assert all(isinstance(layer, StateLayer) for layer in layers)
        if q.shape[2] == 1:
            return self.step_dsla(i, dsla, q, k, v, cos, sin, layers, [lengths[r] for r in rows], h)
        outs = []
        for b, row in enumerate(rows):  # prefill: one sequence at a time
            layer, length = layers[b], lengths[row]
            prefix = None
            if dsla.config.window and length:
                pk, pv = layer.window_view(length)
                positions = torch.arange(length - pk.shape[1], length, device=q.device)[None]
                pcos, psin = self.rotary_emb(pv, positions)
                prefix = (pk[None], pv[None], pcos, psin)
            state = tuple(s[None] for s in layer.state)
            o, new_state, (wk, wv) = dsla.attend(
                *(t[b : b + 1] for t in (q, k, v, cos, sin)), state, prefix, hidden=h[b : b + 1]
            )
            layer.state = (new_state[0][0], new_state[1][0])
            layer.write_window(wk[0], wv[0], length + q.shape[2])
            outs.append(o)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def step_dsla(
        self, i: int, dsla: DSLAAttention, q, k, v, cos, sin, layers: list[StateLayer], lengths: list[int], h: Tensor
    ) -> Tensor:
        """One decode token for a batch of DSLA sequences: their pooled states and windows updated in place."""
        pool = self.layers_pool(i, layers)
        states, ring_k, ring_v, idx = pool.batch([layer.slot for layer in layers])  # states (B, 2, Hkv, K, V)
        W = pool.window
        if not W:
            o = dsla.step(q, k, v, cos, sin, states, hidden=h)
        else:
            rows, slot, valid, lcos, lsin, enters = self.ring_positions(W, lengths, v)
            leaving = (ring_k[rows, :, slot].unsqueeze(2), ring_v[rows, :, slot].unsqueeze(2))  # copies
            ring_k[rows, :, slot] = rotate(k, cos, sin)[:, :, 0].to(ring_k.dtype)
            ring_v[rows, :, slot] = v[:, :, 0].to(ring_v.dtype)
            o = dsla.step(q, k, v, cos, sin, states, (ring_k, ring_v, valid), (*leaving, lcos, lsin, enters), h)
        pool.write_back(idx, states, ring_k, ring_v)
        return o

    def fused_step(
        self, i: int, qkv: Tensor, h: Tensor, cos: Tensor, sin: Tensor, cache: HybridCache, rows: list[int],
        lengths: list[int],
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """The DSLA rows' mixed read-out before o_proj (B, Hq·D) and their o adapter's output (B, hidden)
        or None, from their fused q/k/v (B, 1, (Hq + 2·Hkv)·D); one fused call updates their pooled
        states and windows in place."""
        layers = [cache[r].layers[i] for r in rows]
        pool = self.layers_pool(i, layers)
        slots = layers[0].index if len(layers) == 1 else self.slot_index([layer.slot for layer in layers])
        pos, cos, sin, lcos, lsin = self.step_rows(pool.window, rows, lengths, cos, sin)
        p = self.dsla(i).step_params(pool.states.dtype, self.params_generation())
        return native.decode_step(qkv, h, cos, sin, lcos, lsin, pos, slots, pool.states, pool.keys,
                                  pool.values, p)  # fmt: skip

    def slot_index(self, slots: list[int]) -> Tensor:
        """``slots`` as an int64 tensor, memoised per step (layers' pools mostly number a batch's slots alike).
        NOTE(decisions): made per layer they cost ~0.3 ms of a ~15 ms batch-8 step (one instrumented run)."""
        key = ("slots", tuple(slots))
        if key not in self._ring:
            self._ring[key] = (torch.tensor(slots),)
        return self._ring[key][0]

    def dsla_output(self, i: int, o: Tensor, extra: Tensor | None) -> Tensor:
        """``fused_step``'s read-out o (B, Hq·D) through o_proj, plus the o adapter's output: (B, 1, hidden)."""
        out = self.dsla(i).o_proj(o[:, None])
        return out if extra is None else out.add_(extra[:, None])

    def params_generation(self) -> int:
        """A number that changes whenever a DSLA layer's step inputs change (written in place, moved or
        replaced, or the set of layers), checked once per decode step; drawn from one count for every model,
        so two models over the same layers never share one. NOTE(decisions): checking each layer's ~17
        parameters in Python cost ~16 µs of a ~200 µs layer step (0.5 ms of 13 at 512 tokens); the C++
        watch, ~1 µs a step; listing the DSLA layers again only when ``STRUCTURE`` moved saves ~20 µs a step."""
        if ("generation",) not in self._ring:
            made, watch = self._watch
            now = STRUCTURE[0]
            if made != now:  # layers converted or restored, parameters replaced: watch them anew
                layers = tuple(m for m in (b.self_attn for b in self._blocks) if isinstance(m, DSLAAttention))
                self._watch = (now, native.watch([p for m in layers for p in m.step_inputs(refresh=True)]))
                self._generation = next(GENERATIONS)  # numbered across models: they may share DSLA layers
            elif watch.changed():
                self._generation = next(GENERATIONS)
            self._ring["generation",] = (self._generation,)
        return self._ring["generation",][0]

    @staticmethod
    def layers_pool(i: int, layers: list[StateLayer]) -> StatePool:
        """The pool the batch's states at layer i live in (their own: a pool rebuilt since keeps no slot of theirs)."""
        pool = layers[0].pool
        if any(layer.pool is not pool for layer in layers):
            raise RuntimeError(f"layer {i}: the batch's DSLA states live in different pools")
        return pool

    def step_rows(self, W: int, rows: list[int], lengths: list[int], cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        """A decode step's per-row inputs of the DSLA kernel for the batch ``rows`` (of a batch at
        ``lengths``; cos/sin those rows'): positions (B,), the new token's cos/sin (B, D) and the leaving
        one's (B, D); memoised per step (every DSLA layer of the step reads them: building them per
        layer cost ~10 µs of the ~0.2 ms a layer takes)."""
        key = ("rows", W) if len(rows) == len(lengths) else ("rows", W, tuple(rows))  # rows: sorted, distinct
        if key not in self._ring:
            pos = self.positions([lengths[r] for r in rows], cos.device)
            lcos, lsin = (cos, sin) if not W else self.rotary(cos, (pos - W).clamp(min=0)[:, None], max(lengths))
            self._ring[key] = (pos, cos[:, 0], sin[:, 0], lcos[:, 0], lsin[:, 0])
        return self._ring[key]

    def rotary(self, x: Tensor, positions: Tensor, top: int) -> tuple[Tensor, Tensor]:
        """``rotary_emb(x, positions)`` (B, T, D) each, for a decode step (``top`` ≥ every position): rows
        of a table of every position the model takes (built by the module itself, so the same values) where
        its rotary embedding is static, else the module. NOTE(decisions): the module's call cost ~21 µs a
        step, the table's rows ~7."""
        emb = self.rotary_emb
        inv_freq = getattr(emb, "inv_freq", None)
        n = min(getattr(self.config, "max_position_embeddings", None) or 0, ROTARY_TABLE_MAX)
        if top >= n or getattr(emb, "rope_type", None) not in STATIC_ROPE or not isinstance(inv_freq, Tensor):
            return emb(x, positions)
        key = (x.dtype, x.device, inv_freq.data_ptr(), inv_freq._version, getattr(emb, "attention_scaling", 1.0), n)
        if self._rotary[0] != key:
            cos, sin = emb(x, torch.arange(n, device=x.device)[None])
            self._rotary = (key, (cos[0], sin[0]))
        cos, sin = self._rotary[1]
        return cos[positions], sin[positions]

    def positions(self, lengths: list[int], device) -> Tensor:
        """The new tokens' positions (B,) int64, memoised per step."""
        key = ("pos", tuple(lengths))
        if key not in self._ring:
            self._ring[key] = (torch.tensor(lengths, device=device),)
        return self._ring[key][0]

    def ring_positions(self, W: int, lengths: list[int], ref: Tensor) -> tuple[Tensor, ...]:
        """Where a decode step reads and writes the window ring buffers of sequences at ``lengths``: batch
        rows, slots, slots written so far (B, W), the leaving token's rotary cos/sin (B, 1, D) and whether
        one leaves. A function of the lengths alone, so computed once per step for every DSLA layer."""
        key = (W, tuple(lengths))
        if key not in self._ring:
            pos = self.positions(lengths, ref.device)
            lcos, lsin = self.rotary_emb(ref, (pos - W).clamp(min=0)[:, None])
            valid = torch.arange(W, device=ref.device)[None] <= pos[:, None]
            self._ring[key] = (torch.arange(len(lengths), device=ref.device), pos % W, valid, lcos, lsin, pos >= W)
        return self._ring[key]

    @torch.no_grad()
    def fold_to_dsla(self, seq: SequenceCache, layers: Iterable[int]) -> None:
        """In-flight conversion: turn the KV caches of ``layers`` into exact DSLA states (and, with a
        window, keep the last W keys/values exact), freeing the KV."""
        for i in check_layers(self.base, layers):
            layer = seq.layers[i]
            if isinstance(layer, StateLayer):
                continue
            dsla = self.dsla(i)
            keys, values = layer.view()
            positions = torch.arange(layer.length, device=keys.device)[None]
            cos, sin = self.rotary_emb(keys, positions)
            (s_far, s_close), (wk, wv) = dsla.fold_kv_cache(keys[None], values[None], cos, sin)
            new = StateLayer(self.pool(i))
            new.state = (s_far[0], s_close[0])
            if dsla.config.window:
                new.write_window(wk[0], wv[0], layer.length)
            seq.layers[i] = new
            seq.conversions.append(i)
