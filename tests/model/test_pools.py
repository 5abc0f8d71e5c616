"""State pools: allocation, growth, release and reuse with no leak; batched decode over scattered slots."""

from __future__ import annotations

import gc

import torch

from dsla_serve.config import DSLAConfig
from dsla_serve.model import HybridCache, HybridModel, convert
from dsla_serve.ops import chunk_dsla
from tests.conftest import randomize_gates, tiny_llama


def windowed(window: int = 8) -> HybridModel:
    model = tiny_llama()
    randomize_gates(convert(model, range(4), config=DSLAConfig(window=window)).values())
    return HybridModel(model)


def test_pool_grows_releases_and_reuses_without_leak():
    hybrid = windowed()
    ids = torch.randint(0, 99, (1, 20))
    hybrid(ids, cache=HybridCache([hybrid.new_cache([0, 2])]))  # pools made, first slots used and dropped
    gc.collect()
    baseline = hybrid.pool_bytes()
    held = []
    for n in range(100):
        cache = hybrid.new_cache([0, 2] if n % 2 else [2])
        hybrid(ids[:, : 5 + n % 15], cache=HybridCache([cache]))
        if n % 10 == 0:
            held.append(cache)  # some stay alive: the pool must grow past its first slots
        elif n % 3 == 0:
            cache.release()  # explicit release; the others are dropped
    pool = hybrid.pools[2]
    assert pool.capacity >= len(held) and pool.capacity - len(pool.free) == len(held)
    assert {layer.slot for c in held for layer in [c.layers[2]]} == set(range(pool.capacity)) - set(pool.free)
    held.clear()
    gc.collect()
    assert all(p.capacity == len(p.free) for p in hybrid.pools.values())  # every slot back
    hybrid.trim_pools()
    assert hybrid.pool_bytes() <= baseline


def test_released_slot_starts_from_zero_state():
    hybrid = windowed()
    first = hybrid.new_cache([1])
    hybrid(torch.randint(0, 99, (1, 30)), cache=HybridCache([first]))
    slot = first.layers[1].slot
    assert first.layers[1].state[0].abs().max() > 0
    first.release()
    second = hybrid.new_cache([1])
    assert second.layers[1].slot == slot and second.layers[1].state[0].abs().max() == 0


def test_decode_over_scattered_slots_matches_each_sequence_alone():
    """Slots that are not consecutive are gathered and written back: same result as running alone."""
    hybrid = windowed()
    caches = [hybrid.new_cache([0, 1, 2, 3]) for _ in range(5)]
    for c in caches[1::2]:
        c.release()
    live = caches[0::2]  # slots 0, 2, 4 of every pool
    ids = torch.randint(0, 99, (3, 16))
    lengths = [3, 12, 7]
    for c, row, n in zip(live, ids, lengths, strict=True):
        hybrid(row[None, :n], cache=HybridCache([c]))
    for step in range(3):
        nxt = torch.stack([ids[b, n + step] for b, n in enumerate(lengths)])[:, None]
        batched, _ = hybrid(nxt, cache=HybridCache(live))
    for b, n in enumerate(lengths):
        alone, _ = hybrid(ids[b : b + 1, : n + 3], dsla_layers=[0, 1, 2, 3])
        torch.testing.assert_close(batched[b, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_chunk_state_owns_only_its_bytes():
    """The final state of a long prefill must not keep the per-chunk carry buffer alive."""
    B, Hq, Hkv, T, K = 1, 4, 2, 640, 16
    q, k, v = torch.randn(B, Hq, T, K), torch.randn(B, Hkv, T, K), torch.randn(B, Hkv, T, K)
    g = -0.1 * torch.rand(B, Hkv, T, K)
    _, (s_far, s_close) = chunk_dsla(q, k, v, g, g, torch.zeros(2), chunk_size=16)
    pair_bytes = 2 * B * Hkv * K * K * 4
    assert s_far.untyped_storage().nbytes() == pair_bytes
    assert s_close.untyped_storage().nbytes() == pair_bytes


def test_sequence_bytes_count_its_slots():
    hybrid = windowed(window=8)
    cache = hybrid.new_cache([0, 1], capacity=50)
    assert cache.state_bytes() == hybrid.state_bytes([0, 1])
    assert cache.kv_bytes() == 50 * hybrid.cache_bytes_per_token([0, 1])


def test_deepcopy_takes_a_new_slot_of_the_same_pool():
    import copy

    hybrid = windowed()
    cache = hybrid.new_cache([1, 3])
    with torch.no_grad():
        hybrid(torch.randint(0, 99, (1, 20)), cache=HybridCache([cache]))
    twin = copy.deepcopy(cache)
    a, b = cache.layers[1], twin.layers[1]
    assert a.pool is b.pool and a.slot != b.slot
    torch.testing.assert_close(a.state[0], b.state[0])
    torch.testing.assert_close(a.keys, b.keys)
