"""The prefix KV store on its own: copies, byte accounting, eviction order and priority rules, thread safety.

Caches here are real transformers caches filled with `update()` (no model needed); the executor tests check the
store's effect on real model outputs."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, GptOssConfig

from classification.render import prefix_key
from engine.executors.prefix_store import PrefixStore, kv_nbytes

HEAD_DIM = 8
BYTES_PER_TOKEN = 2 * HEAD_DIM * 4  # K and V, one head, float32


def cache_of(tokens: int, fill: float = 1.0) -> DynamicCache:
    """A one-layer cache holding `tokens` positions: BYTES_PER_TOKEN * tokens bytes of K/V."""
    cache = DynamicCache()
    kv = torch.full((1, 1, tokens, HEAD_DIM), fill)
    cache.update(kv, kv.clone(), 0)
    return cache


def sliding_cache(tokens: int, window: int) -> DynamicCache:
    """A gpt-oss style cache: a sliding-window layer (keeps window-1 positions) and a full-attention layer."""
    config = GptOssConfig(num_hidden_layers=2, sliding_window=window, num_key_value_heads=1, head_dim=HEAD_DIM,
                          layer_types=["sliding_attention", "full_attention"])
    cache = DynamicCache(config=config)
    for layer in range(2):
        kv = torch.randn(1, 1, tokens, HEAD_DIM)
        cache.update(kv, kv.clone(), layer)
    return cache


def test_key_is_sha256_of_the_model_and_ids_and_depends_on_every_id():
    key = prefix_key("model", [200006, 17360, 200008])
    assert len(key) == 64 and key == prefix_key("model", (200006, 17360, 200008))
    assert key != prefix_key("model", [200006, 17360, 200009])
    assert key != prefix_key("model", [200006, 17360])
    assert key != prefix_key("other-model", [200006, 17360, 200008])


def test_get_and_put_never_share_objects_with_callers():
    store = PrefixStore(1 << 20)
    original = cache_of(4)
    assert store.put("k", original, priority=35)
    original.layers[0].keys.fill_(9.0)  # the caller's object changes after it was stored
    first = store.get("k")
    assert first is not None and torch.all(first.layers[0].keys == 1.0)
    first.update(torch.zeros(1, 1, 3, HEAD_DIM), torch.zeros(1, 1, 3, HEAD_DIM), 0)  # decoding grows a copy
    second = store.get("k")
    assert second.get_seq_length() == 4 and torch.all(second.layers[0].keys == 1.0)


def test_stored_copies_are_compacted_to_the_sliding_window():
    cache = sliding_cache(tokens=600, window=128)
    window_view = cache.layers[0].keys
    assert window_view.shape[-2] == 127 and window_view.untyped_storage().nbytes() > window_view.nbytes
    store = PrefixStore(1 << 20)
    store.put("k", cache, priority=35)
    expected = (127 + 600) * BYTES_PER_TOKEN
    assert kv_nbytes(cache) == expected == store.stats()["resident_bytes"]
    copy = store.get("k")
    held = sum(t.untyped_storage().nbytes() for layer in copy.layers for t in (layer.keys, layer.values))
    assert held == expected, "a copy must not drag the whole prefill's storage along"
    assert copy.get_seq_length() == 600


def test_equal_priorities_evict_least_recently_used():
    store = PrefixStore(3 * 10 * BYTES_PER_TOKEN)
    for key in "abc":
        assert store.put(key, cache_of(10), priority=35)
    store.get("a")  # "b" is now the least recently used
    assert store.put("d", cache_of(10), priority=35)
    assert [k in store for k in "abcd"] == [True, False, True, True]
    assert store.stats()["evictions"] == 1


def test_lowest_priority_goes_first_then_lru():
    store = PrefixStore(3 * 10 * BYTES_PER_TOKEN)
    store.put("high", cache_of(10), priority=90)
    store.put("low-old", cache_of(10), priority=10)
    store.put("low-new", cache_of(10), priority=10)
    store.get("high")
    store.get("low-old")
    assert store.put("mid", cache_of(10), priority=50)
    assert [k in store for k in ("high", "low-old", "low-new", "mid")] == [True, True, False, True]


def test_a_pinned_prefix_survives_a_flood_of_lower_priority_prefixes():
    budget = 4 * 10 * BYTES_PER_TOKEN
    store = PrefixStore(budget)
    assert store.put("policy", cache_of(10), priority=90)
    for i in range(50):
        store.put(f"flood-{i}", cache_of(10 + i % 7), priority=35)
        assert store.stats()["resident_bytes"] <= budget
    assert "policy" in store
    assert store.get("policy") is not None


def test_a_new_entry_is_refused_when_only_higher_priorities_could_make_room():
    store = PrefixStore(2 * 10 * BYTES_PER_TOKEN)
    store.put("a", cache_of(10), priority=80)
    store.put("b", cache_of(10), priority=80)
    assert not store.put("c", cache_of(10), priority=79)
    stats = store.stats()
    assert "a" in store and "b" in store and "c" not in store
    assert (stats["rejections"], stats["evictions"], stats["entries"]) == (1, 0, 2)
    assert store.put("c", cache_of(10), priority=80), "an equal priority may evict (LRU among equals)"
    assert "a" not in store


def test_an_entry_larger_than_the_budget_is_not_stored_and_evicts_nothing():
    store = PrefixStore(10 * BYTES_PER_TOKEN)
    store.put("small", cache_of(5), priority=0)
    assert not store.put("huge", cache_of(11), priority=100)
    assert "small" in store and "huge" not in store
    assert PrefixStore(0).put("any", cache_of(1), priority=100) is False


def test_storing_again_keeps_the_highest_priority_and_counts_no_insertion():
    store = PrefixStore(2 * 10 * BYTES_PER_TOKEN)
    store.put("policy", cache_of(10), priority=90)
    assert store.put("policy", cache_of(10), priority=35)  # an ordinary request must not demote the pinned prefix
    store.put("other", cache_of(10), priority=80)
    assert not store.put("third", cache_of(10), priority=60)  # had "policy" dropped to 35, it would be evicted
    assert "policy" in store and store.stats()["insertions"] == 2


def test_a_hit_at_higher_priority_pins_a_prefix_cached_by_ordinary_traffic():
    store = PrefixStore(2 * 10 * BYTES_PER_TOKEN)
    store.put("policy", cache_of(10), priority=35)
    assert store.get("policy", priority=90) is not None  # the policy is activated after traffic cached it
    store.get("policy", priority=10)  # a lower priority never demotes
    store.put("other", cache_of(10), priority=80)
    assert not store.put("third", cache_of(10), priority=60)
    assert "policy" in store


def test_stats_count_hits_misses_insertions():
    store = PrefixStore(1 << 20)
    assert store.get("nope") is None
    store.put("k", cache_of(3), priority=35)
    store.get("k")
    store.get("k")
    assert store.stats() == {"hits": 2, "misses": 1, "insertions": 1, "evictions": 0, "rejections": 0,
                             "resident_bytes": 3 * BYTES_PER_TOKEN, "entries": 1, "budget_bytes": 1 << 20}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 100)), min_size=1, max_size=40),
       st.integers(20, 120))
def test_budget_and_priority_rules_hold_for_any_sequence(puts, budget_tokens):
    budget = budget_tokens * BYTES_PER_TOKEN
    store = PrefixStore(budget)
    priorities: dict[str, int] = {}

    def size(key: str) -> int:
        return puts[int(key[1:])][0] * BYTES_PER_TOKEN
    for i, (tokens, priority) in enumerate(puts):
        key = f"k{i}"
        before = {k for k in priorities if k in store}
        stored = store.put(key, cache_of(tokens), priority)
        stats = store.stats()
        assert stats["resident_bytes"] <= budget
        assert stored == (key in store)
        untouchable = sum(size(k) for k in before if priorities[k] > priority)
        assert stored == (untouchable + tokens * BYTES_PER_TOKEN <= budget), "stored exactly when room can be made"
        evicted = {k for k in before if k not in store}
        assert all(priorities[k] <= priority for k in evicted), "only lower-or-equal priorities may be evicted"
        if stored:
            priorities[key] = priority
        assert stats["resident_bytes"] == sum(size(k) for k in priorities if k in store)


def test_concurrent_use_keeps_the_books_straight():
    budget = 50 * 10 * BYTES_PER_TOKEN
    store = PrefixStore(budget)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(200):
                key = f"k{(worker * 7 + i) % 80}"
                got = store.get(key)
                if got is None:
                    store.put(key, cache_of(10, fill=float(i)), priority=i % 3 * 40)
                else:
                    assert got.get_seq_length() == 10
                assert store.stats()["resident_bytes"] <= budget
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = store.stats()
    assert stats["resident_bytes"] == stats["entries"] * 10 * BYTES_PER_TOKEN <= budget
    assert stats["insertions"] - stats["evictions"] == stats["entries"]
    assert stats["hits"] + stats["misses"] == 800


@pytest.mark.parametrize("priority", [0, 100])
def test_priorities_at_the_ends_of_the_scale_are_stored(priority):
    store = PrefixStore(1 << 20)
    assert store.put("k", cache_of(2), priority)
