"""Per-sequence hybrid cache: a KV cache for each attention layer, a state pair for each DSLA layer.

Caches are per sequence so that a batch can mix sequences of different lengths and different
layer plans (the server's continuous batching); ``HybridCache`` groups them for a batched call.
KV buffers are preallocated (capacity = the sequence's known maximum length when given, else grown
by doubling) so decode appends in place instead of concatenating the whole cache every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsla_serve.ops import StatePair


class KVLayer:
    """Keys (after RoPE) and values of one attention layer: (Hkv, capacity, D) each."""

    def __init__(self, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device=None):
        self.keys = torch.empty(num_kv_heads, max(capacity, 1), head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k/v (Hkv, T, D); return views of all cached keys and values (Hkv, length, D)."""
        T = k.shape[1]
        need = self.length + T
        if need > self.keys.shape[1]:
            cap = max(need, 2 * self.keys.shape[1])
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], cap, old.shape[2])
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self.keys[:, self.length : need] = k
        self.values[:, self.length : need] = v
        self.length = need
        return self.keys[:, :need], self.values[:, :need]

    def view(self) -> tuple[Tensor, Tensor]:
        return self.keys[:, : self.length], self.values[:, : self.length]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class StateLayer:
    """The (S_far, S_close) pair of one DSLA layer, each (Hkv, K, V) in float32: size independent of length."""

    def __init__(self, num_kv_heads: int, head_dim: int, device=None):
        zeros = torch.zeros(num_kv_heads, head_dim, head_dim, dtype=torch.float32, device=device)
        self.state: StatePair = (zeros, zeros.clone())

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.state)


@dataclass
class SequenceCache:
    """Everything one sequence has cached: per layer a ``KVLayer`` or a ``StateLayer``."""

    layers: list[KVLayer | StateLayer]
    length: int = 0  # tokens processed so far (= position of the next token)
    conversions: list[int] = field(default_factory=list)  # layers folded from KV to state in flight

    @classmethod
    def create(
        cls, num_layers: int, dsla_layers: Iterable[int], num_kv_heads: int, head_dim: int,
        capacity: int, dtype: torch.dtype, device=None,
    ) -> SequenceCache:  # fmt: skip
        dsla = set(dsla_layers)
        layers: list[KVLayer | StateLayer] = [
            StateLayer(num_kv_heads, head_dim, device)
            if i in dsla
            else KVLayer(num_kv_heads, head_dim, capacity, dtype, device)
            for i in range(num_layers)
        ]
        return cls(layers)

    @property
    def dsla_layers(self) -> frozenset[int]:
        return frozenset(i for i, layer in enumerate(self.layers) if isinstance(layer, StateLayer))

    def nbytes(self) -> int:
        """Bytes this sequence holds now (KV buffers as allocated, plus DSLA states)."""
        return sum(layer.nbytes() for layer in self.layers)

    def kv_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, KVLayer))

    def state_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, StateLayer))


@dataclass
class HybridCache:
    """A batch of sequence caches, in batch order."""

    sequences: list[SequenceCache]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> SequenceCache:
        return self.sequences[i]

    def bytes_per_sequence(self) -> list[int]:
        return [s.nbytes() for s in self.sequences]

    @staticmethod
    def stack_states(layers: Sequence[StateLayer]) -> StatePair:
        """(B, Hkv, K, V) pair from per-sequence states."""
        return (torch.stack([layer.state[0] for layer in layers]), torch.stack([layer.state[1] for layer in layers]))
