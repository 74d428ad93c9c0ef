"""A cache of model states after shared prompt prefixes (LRU, bounded in bytes).

Griffin's state after a prefix is all the model needs to continue, and it is the
same fixed size whatever the prefix length. When many requests share a prefix
(a system prompt, a few-shot header), the state after it is kept and later
requests start from it instead of re-running the prefix.

Keys are token-id prefixes (a 128-bit BLAKE2b digest of the ids and the length),
taken only at *boundaries*: multiples of `block_size` tokens, and "hints" given
with the request (the end of a chat's system prompt). The scheduler always splits
prefill chunks at the same boundaries whether or not the cache is used, so a
state taken from the cache is bit for bit the state the prompt would have
reached by itself: outputs are identical with and without the cache.

What is stored (so that unique prompts do not flush useful entries):
- the state at a hint boundary, the first time it is seen;
- the state at the deepest block boundary whose prefix was already seen in an
  earlier prompt (a prefix shared by two requests is cached on the second one
  and served from the cache from the third one on).

The "seen" record holds digests only (a bounded LRU of keys, no states).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from ..state import GriffinState

__all__ = ["PrefixCache", "PrefixKey"]

PrefixKey = tuple[int, bytes]  # (prefix length in tokens, digest of the ids)


class PrefixCache:
    """States after token-id prefixes, least recently used evicted first.

    Args:
        max_bytes: byte budget for the cached states (their `nbytes()`); a state
            larger than the budget is not stored. 0 disables storing.
        block_size: boundaries every `block_size` tokens (>= 1).
        min_tokens: ignore boundaries shorter than this (not worth a state).
        max_seen: how many block-boundary digests to remember for "seen before"
            (about 200 bytes each).

    Not thread-safe: the scheduler thread is its only user (the metrics read
    `nbytes`, `len` and `evictions`, plain ints).
    """

    def __init__(
        self, max_bytes: int, block_size: int = 256, min_tokens: int = 16, max_seen: int = 8192
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.max_bytes, self.block_size = int(max_bytes), int(block_size)
        self.min_tokens, self.max_seen = int(min_tokens), int(max_seen)
        self._entries: OrderedDict[PrefixKey, GriffinState] = OrderedDict()
        self._sizes: dict[PrefixKey, int] = {}
        self._seen: OrderedDict[PrefixKey, None] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- keys ----------------------------------------------------------------------
    def boundaries(self, length: int, hints: Iterable[int] = ()) -> list[int]:
        """Boundary positions p of a prompt of `length` tokens, min_tokens <= p < length
        (at least one token is always left to prefill, for the next-token logits)."""
        out = set(range(self.block_size, length, self.block_size))
        out.update(h for h in hints if 0 < h < length)
        return sorted(p for p in out if p >= self.min_tokens)

    @staticmethod
    def keys(ids: Sequence[int], positions: Sequence[int]) -> dict[int, PrefixKey]:
        """The key of `ids[:p]` for each p in `positions` (sorted), hashed in one pass."""
        data = array("q", ids).tobytes()  # 8 bytes per id
        h = hashlib.blake2b(digest_size=16)
        out, prev = {}, 0
        for p in positions:
            h.update(data[prev * 8 : p * 8])
            prev = p
            out[p] = (p, h.copy().digest())
        return out

    # -- lookup and store ------------------------------------------------------------
    def lookup(self, keys: dict[int, PrefixKey]) -> tuple[int, GriffinState] | None:
        """The longest cached prefix among `keys`: (its length, its state), or None."""
        for p in sorted(keys, reverse=True):
            state = self._entries.get(keys[p])
            if state is not None:
                self._entries.move_to_end(keys[p])
                return p, state
        return None

    def plan(self, keys: dict[int, PrefixKey], hints: Iterable[int], start: int) -> set[int]:
        """Which boundaries after `start` to store while prefilling; records the block
        boundaries' keys as seen. See the module docstring for the policy."""
        if self.max_bytes <= 0:
            return set()
        hints = set(hints)
        store = {p for p in keys if p > start and p in hints and keys[p] not in self._entries}
        blocks = [p for p in keys if p not in hints]  # hints are stored on first sight
        seen = [p for p in blocks if p > start and keys[p] in self._seen]
        if seen and keys[max(seen)] not in self._entries:
            store.add(max(seen))
        for p in blocks:
            self._seen[keys[p]] = None
            self._seen.move_to_end(keys[p])
        while len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        return store

    def store(self, key: PrefixKey, state: GriffinState) -> bool:
        """Keep a copy of `state` (batch size 1) under `key`; evict least recently used
        entries to fit. Returns whether it was stored."""
        size = state.nbytes()
        if size > self.max_bytes or key in self._entries:
            return False
        while self._entries and self.nbytes + size > self.max_bytes:
            old, _ = self._entries.popitem(last=False)
            self.nbytes -= self._sizes.pop(old)
            self.evictions += 1
        self._entries[key] = state.select([0])  # a compact copy, no view of a bigger tensor
        self._sizes[key] = size
        self.nbytes += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._sizes.clear()
        self._seen.clear()
        self.nbytes = 0
