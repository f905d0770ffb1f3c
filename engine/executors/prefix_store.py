"""The reference executor's prefix KV store: pristine caches of policy prefixes, reused by copy.

An entry is the transformers cache left after prefilling a prefix alone, keyed by `classification.render.prefix_key`
(the model fingerprint and the prefix ids: the key the front end routes by).
The store never hands out or keeps a caller's object: `put` keeps its own compacted copy and `get` returns a fresh
deep copy, because decoding grows a cache in place and reusing one object for a second request silently corrupts
its results (research/feasibility.md §3).

Budget and eviction:
- The budget is bytes of K/V tensors. Copies are compacted on the way in: a sliding-window layer's tensors are
  views into the whole prefill, and a plain deep copy would keep the whole storage alive while counting the window.
- Victims are taken lowest priority first, then least recently used.
- A new entry may only evict entries of lower or equal priority, and it is not stored when those cannot make room.
  This keeps a policy prefix warmed at high priority alive through any flood of lower-priority prefixes; prefixes of
  equal priority behave as a plain LRU among themselves.
- An entry larger than the whole budget is not stored.
- A prefix keeps the highest priority any request gave it (storing it, or hitting it), so ordinary requests at the
  default priority never demote a prefix that was pinned when its policy was activated, and warming a prefix that
  ordinary traffic cached first pins it.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import Cache


def kv_tensors(cache: Cache) -> Iterator[torch.Tensor]:
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                yield tensor


def kv_nbytes(cache: Cache) -> int:
    """Bytes of the K/V tensors as seen (window only for sliding layers): what a compacted copy holds."""
    return sum(t.nbytes for t in kv_tensors(cache))


def pristine_copy(cache: Cache) -> Cache:
    """A deep copy whose K/V tensors own exactly their visible elements."""
    made = copy.deepcopy(cache)
    for layer in made.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                setattr(layer, name, tensor.clone(memory_format=torch.contiguous_format))
    return made


@dataclass
class _Entry:
    cache: Cache
    nbytes: int
    priority: int
    last_use: int


class PrefixStore:
    """Pristine prefix caches bounded by K/V bytes; thread-safe."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._clock = itertools.count()
        self._resident = 0
        self._counts = dict.fromkeys(("hits", "misses", "insertions", "evictions", "rejections"), 0)

    def get(self, key: str, priority: int | None = None) -> Cache | None:
        """A private copy of the prefix cache for `key`, or None; counts a hit or a miss. A hit raises the entry's
        priority to `priority` if that is higher."""
        with self._lock:
            entry = self._entries.get(key)
            self._counts["hits" if entry else "misses"] += 1
            if entry is None:
                return None
            self._touch(key, entry.priority if priority is None else priority)
        # Outside the lock: a stored cache is never mutated, so copying it needs no exclusion.
        return copy.deepcopy(entry.cache)

    def put(self, key: str, cache: Cache, priority: int) -> bool:
        """Keep a pristine copy of `cache` (the caller keeps its own object). True when `key` is resident after."""
        nbytes = kv_nbytes(cache)
        with self._lock:
            if self._touch(key, priority):
                return True
            if nbytes > self.budget_bytes:
                self._counts["rejections"] += 1
                return False
        made = pristine_copy(cache)  # the slow part, outside the lock
        with self._lock:
            if self._touch(key, priority):  # another request stored it meanwhile
                return True
            victims = self._victims(nbytes, priority)
            if victims is None:
                self._counts["rejections"] += 1
                return False
            for victim in victims:
                self._resident -= self._entries.pop(victim).nbytes
            self._counts["evictions"] += len(victims)
            self._counts["insertions"] += 1
            self._entries[key] = _Entry(made, nbytes, priority, next(self._clock))
            self._resident += nbytes
            return True

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "resident_bytes": self._resident, "entries": len(self._entries),
                    "budget_bytes": self.budget_bytes}

    def _touch(self, key: str, priority: int) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.priority = max(entry.priority, priority)
        entry.last_use = next(self._clock)
        return True

    def _victims(self, nbytes: int, priority: int) -> list[str] | None:
        """Keys to evict, in order, so that `nbytes` more fit; None when entries it may evict cannot make room."""
        need = self._resident + nbytes - self.budget_bytes
        victims: list[str] = []
        order = sorted((e.priority, e.last_use, k) for k, e in self._entries.items() if e.priority <= priority)
        for _, _, key in order:
            if need <= 0:
                break
            victims.append(key)
            need -= self._entries[key].nbytes
        return victims if need <= 0 else None
