"""The prefix cache: model state after a prompt's first ``k`` blocks, kept for the next prompt that starts
with the same tokens.

Lightning layers carry a fixed-size recurrent state rather than per-token keys, so a cached prefix cannot
be cut anywhere: it is kept at block boundaries. After the prefill reaches token ``k * block`` the engine
stores, under a hash of tokens ``0 .. k * block``, the lightning states at that point, the softmax layers'
keys and values of block ``k`` alone, and the logits at its last token. A prompt that starts with ``j``
cached blocks restores the state of block ``j``, the keys and values of blocks ``1 .. j``, and prefills the
rest, chunk by chunk from the same boundaries as a prompt that missed: the computation is the same, so
the result does not depend on whether the cache hit. A shared prefix that ends mid-block is restored up
to its last full block.

Entries are evicted least recently used first under a byte budget. A hit or a store touches the deepest
block first and the first block last, so a prefix's earlier blocks are always more recent than its later
ones, and a store never evicts the parents of the block it stores: eviction does not strand a block
behind a missing parent.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from typing import Sequence

import jax
import numpy as np


@dataclasses.dataclass
class Entry:
    lightning: jax.Array  # states after the block [periods, lightning layers, 1, heads, d, d]
    keys: jax.Array       # the block's keys [periods, softmax layers, 1, block, kv_heads, d]
    values: jax.Array
    logits: jax.Array     # float32 [vocab] at the block's last token

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in (self.lightning, self.keys, self.values, self.logits))


def block_hashes(tokens: Sequence[int], block: int) -> list[bytes]:
    """Chained digests of the full blocks of ``tokens``: entry ``j`` names tokens ``0 .. (j + 1) * block``."""
    out, h = [], b""
    arr = np.asarray(tokens, np.int64)
    for j in range(len(arr) // block):
        h = hashlib.blake2b(h + arr[j * block:(j + 1) * block].tobytes(), digest_size=16).digest()
        out.append(h)
    return out


class PrefixCache:
    """Block snapshots keyed by prefix digest, least recently used evicted first above ``budget_bytes``."""

    def __init__(self, block: int, budget_bytes: int):
        if block < 1:
            raise ValueError(f"prefix cache block must be positive, got {block}")
        self.block, self.budget = int(block), int(budget_bytes)
        self._entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, hashes: Sequence[bytes]) -> list[Entry]:
        """The entries of the longest cached run of leading blocks (touched: most recent first)."""
        with self._lock:
            found = []
            for h in hashes:
                e = self._entries.get(h)
                if e is None:
                    break
                found.append((h, e))
            for h, _ in reversed(found):
                self._entries.move_to_end(h)
            return [e for _, e in found]

    def __contains__(self, h: bytes) -> bool:
        with self._lock:
            return h in self._entries

    def put(self, chain: Sequence[bytes], entry: Entry) -> None:
        """Stores ``entry``, the snapshot of block ``chain[-1]`` (``chain``: the digests of its prefix's
        blocks, first to last), evicting least recently used entries other than its own parents to fit;
        not stored when only those would make room. Its parents are touched after it, the first one last."""
        size = entry.nbytes
        if not self.enabled or size > self.budget:
            return
        with self._lock:
            h, parents = chain[-1], set(chain)
            if h not in self._entries:
                while self.bytes + size > self.budget:
                    victim = next((k for k in self._entries if k not in parents), None)
                    if victim is None:
                        return
                    self.bytes -= self._entries.pop(victim).nbytes
                    self.evictions += 1
                self._entries[h] = entry
                self.bytes += size
            for p in reversed(chain):
                if p in self._entries:
                    self._entries.move_to_end(p)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
