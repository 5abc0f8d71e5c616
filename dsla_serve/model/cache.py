"""Per-sequence hybrid cache: a KV cache for each attention layer, a pooled state slot for each DSLA layer.

Caches are per sequence so that a batch can mix sequences of different lengths and different
layer plans (the server's continuous batching); ``HybridCache`` groups them for a batched call.

- Attention layers: KV buffers preallocated per sequence (capacity = the sequence's known maximum
  length when given, else grown by doubling), so decode appends in place.
- DSLA layers: a ``StatePool`` per layer holds every sequence's two float32 states and, with a
  window of W tokens, their rotated keys/values as ring buffers (slot = position % W), in a few
  preallocated tensors. A decode step reads and writes the batch's slots in place (a view when the
  slots are consecutive), so nothing is stacked or allocated per step, and a stored state owns
  exactly its slot. Slots return to the pool when their ``StateLayer`` is released or dropped.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
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

    def reserve(self, T: int) -> int:
        """Room for T more tokens (the buffers double when full); returns the current length."""
        need = self.length + T
        if need > self.keys.shape[1]:
            cap = max(need, 2 * self.keys.shape[1])
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], cap, old.shape[2])
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        return self.length

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k/v (Hkv, T, D); return views of all cached keys and values (Hkv, length, D)."""
        need = self.reserve(k.shape[1]) + k.shape[1]
        self.keys[:, self.length : need] = k
        self.values[:, self.length : need] = v
        self.length = need
        return self.keys[:, :need], self.values[:, :need]

    def view(self) -> tuple[Tensor, Tensor]:
        return self.keys[:, : self.length], self.values[:, : self.length]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class StatePool:
    """Slots for one DSLA layer: states (S, 2, Hkv, K, V) float32 (float64 for a float64 model), window
    keys/values (S, Hkv, W, D) in the model's dtype."""

    def __init__(self, num_kv_heads: int, head_dim: int, window: int, dtype: torch.dtype, device=None, slots: int = 4):
        self.shape = (num_kv_heads, head_dim, window)
        self.dtype, self.device = dtype, device
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.states = torch.zeros(0, 2, num_kv_heads, head_dim, head_dim, dtype=state_dtype, device=device)
        self.keys = torch.zeros(0, num_kv_heads, window, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.free: list[int] = []
        self.lock = threading.Lock()  # a slot may come back from garbage collection on another thread
        self.grow(slots)

    @property
    def window(self) -> int:
        return self.shape[2]

    @property
    def capacity(self) -> int:
        return self.states.shape[0]

    def grow(self, slots: int) -> None:
        """Add ``slots`` slots (rare: the pool doubles when full)."""
        old = self.capacity
        for name in ("states", "keys", "values"):
            t = getattr(self, name)
            setattr(self, name, torch.cat((t, t.new_zeros(slots, *t.shape[1:]))))
        self.free += range(old + slots - 1, old - 1, -1)

    def acquire(self) -> int:
        with self.lock:
            if not self.free:
                self.grow(max(self.capacity, 1))
            slot = self.free.pop()
        # zero the whole slot: unwritten window slots get weight 0, and 0 · NaN left by a failed request is NaN
        for t in (self.states, self.keys, self.values):
            t[slot].zero_()
        return slot

    def release(self, slot: int) -> None:
        with self.lock:
            self.free.append(slot)

    def slot_bytes(self) -> int:
        return (self.states[0].nbytes + self.keys[0].nbytes + self.values[0].nbytes) if self.capacity else 0

    def nbytes(self) -> int:
        """Bytes the pool holds, free slots included."""
        return self.states.nbytes + self.keys.nbytes + self.values.nbytes

    def trim(self) -> None:
        """Give back the memory of free slots at the end (the engine calls it when idle)."""
        with self.lock:
            free = set(self.free)
            used = [s for s in range(self.capacity) if s not in free]
            keep = max(used) + 1 if used else 0
            if keep < self.capacity:
                for name in ("states", "keys", "values"):
                    setattr(self, name, getattr(self, name)[:keep].clone())
                self.free = [s for s in self.free if s < keep]

    def batch(self, slots: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """States, window keys and values of ``slots``: views when the slots are consecutive (written in
        place), else gathered copies plus the index to scatter them back with ``write_back``."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            n = len(slots)
            return self.states[first : first + n], self.keys[first : first + n], self.values[first : first + n], None
        idx = torch.tensor(slots, device=self.states.device)
        return self.states[idx], self.keys[idx], self.values[idx], idx

    def write_back(self, idx: Tensor | None, states: Tensor, keys: Tensor, values: Tensor) -> None:
        if idx is not None:
            self.states.index_copy_(0, idx, states)
            self.keys.index_copy_(0, idx, keys)
            self.values.index_copy_(0, idx, values)


class StateLayer:
    """One sequence's slot in a DSLA layer's ``StatePool``: constant size whatever the length."""

    def __init__(self, pool: StatePool):
        self.pool = pool
        self._slot: int | None = pool.acquire()
        self._index = torch.tensor([self._slot])  # (1,) int64, as the decode kernel takes slots
        self._finalizer = weakref.finalize(self, pool.release, self._slot)

    @property
    def slot(self) -> int:
        if self._slot is None:
            raise RuntimeError("this DSLA state was released: its slot may belong to another sequence now")
        return self._slot

    @property
    def index(self) -> Tensor:
        """The slot as a (1,) int64 tensor (made once: a batch-1 decode step passes it to every layer)."""
        self.slot  # noqa: B018  (raises once released)
        return self._index

    def release(self) -> None:
        self._finalizer()  # runs once: explicit release or garbage collection, whichever comes first
        self._slot = None

    def __deepcopy__(self, memo) -> StateLayer:
        """A copy in a new slot of the same pool (the pool itself is shared, never copied)."""
        new = StateLayer(self.pool)
        for t in (self.pool.states, self.pool.keys, self.pool.values):
            t[new.slot] = t[self.slot]
        return new

    @property
    def state(self) -> StatePair:
        s = self.pool.states[self.slot]
        return s[0], s[1]

    @state.setter
    def state(self, value: StatePair) -> None:
        self.pool.states[self.slot, 0].copy_(value[0])
        self.pool.states[self.slot, 1].copy_(value[1])

    @property
    def keys(self) -> Tensor:
        return self.pool.keys[self.slot]

    @property
    def values(self) -> Tensor:
        return self.pool.values[self.slot]

    @property
    def window(self) -> int:
        return self.pool.window

    def window_view(self, length: int) -> tuple[Tensor, Tensor]:
        """The window's keys and values in position order, (Hkv, min(W, length), D), for a sequence of ``length``."""
        n = min(self.window, length)
        slots = torch.arange(length - n, length, device=self.keys.device) % max(self.window, 1)
        return self.keys[:, slots], self.values[:, slots]

    def write_window(self, keys: Tensor, values: Tensor, length: int) -> None:
        """Store the last tokens (Hkv, n, D) of a sequence now ``length`` long into their ring slots."""
        n = keys.shape[1]
        if n:
            slots = torch.arange(length - n, length, device=self.keys.device) % self.window
            self.keys[:, slots] = keys.to(self.keys.dtype)
            self.values[:, slots] = values.to(self.values.dtype)

    def nbytes(self) -> int:
        return self.pool.slot_bytes()


@dataclass
class SequenceCache:
    """Everything one sequence has cached: per layer a ``KVLayer`` or a ``StateLayer``."""

    layers: list[KVLayer | StateLayer]
    length: int = 0  # tokens processed so far (= position of the next token)
    conversions: list[int] = field(default_factory=list)  # layers folded from KV to state in flight

    @classmethod
    def create(
        cls, num_layers: int, dsla_layers: Iterable[int], pools: dict[int, StatePool], num_kv_heads: int,
        head_dim: int, capacity: int, dtype: torch.dtype, device=None,
    ) -> SequenceCache:  # fmt: skip
        dsla = set(dsla_layers)
        layers: list[KVLayer | StateLayer] = [
            StateLayer(pools[i]) if i in dsla else KVLayer(num_kv_heads, head_dim, capacity, dtype, device)
            for i in range(num_layers)
        ]
        return cls(layers)

    @property
    def dsla_layers(self) -> frozenset[int]:
        return frozenset(i for i, layer in enumerate(self.layers) if isinstance(layer, StateLayer))

    def release(self) -> None:
        """Return the DSLA slots to their pools now (dropping the cache does it too, later)."""
        for layer in self.layers:
            if isinstance(layer, StateLayer):
                layer.release()

    def nbytes(self) -> int:
        """Bytes this sequence holds now (KV buffers as allocated, plus its DSLA slots)."""
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
