"""Batched mode's block manager: which KV blocks each sequence holds, with reference counts and prefix caching.

Bookkeeping only, no tensors: the blocks' storage is `engine.kv_cache.PagedKVCache`.
"""

from __future__ import annotations

from collections import OrderedDict


def block_key(parent_hash: int | None, tokens: list[int]) -> tuple:
    """Prefix-cache key of a full block: the hash of the chain before it plus its own tokens, so two blocks
    share a key only when every token up to their end is equal (the tokens are compared exactly)."""
    return (parent_hash, tuple(tokens))


class BlockManager:
    """Which KV blocks each sequence holds: a free list, reference counts and a prefix cache (no tensors).

    A sequence's block table lists its blocks in order; token i lives in block table[i // block_size].
    When a full block has been computed its key is registered, and a later sequence whose tokens start the
    same way shares it (reference count + 1) instead of computing it again. Freed blocks keep their key in
    least-recently-freed order and are evicted only when a fresh block is needed, so a finished
    conversation turn or a preempted sequence coming back finds its k/v still there.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_count = [0] * num_blocks
        self.key_of: list[tuple | None] = [None] * num_blocks
        self.cached: dict[tuple, int] = {}  # key -> block holding those tokens' k/v
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evicted from the front

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def share_prefix(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """Take a reference on the cached blocks holding the longest full-block prefix of `ids` (always
        leaving at least one token to compute, whose logits the next step needs). Returns (blocks, hashes)."""
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.prefix_caching:
            return blocks, hashes
        bs = self.block_size
        for i in range((len(ids) - 1) // bs):
            key = block_key(hashes[-1] if hashes else None, ids[i * bs:(i + 1) * bs])
            block = self.cached.get(key)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            blocks.append(block)
            hashes.append(hash(key))
        return blocks, hashes

    def grow(self, table: list[int], n_tokens: int) -> bool:
        """Append fresh blocks to `table` until it covers `n_tokens`; False, with nothing changed, if too few are free."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > len(self.free):
            return False
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            if (key := self.key_of[block]) is not None:  # its cached k/v is about to be overwritten
                del self.cached[key]
                self.key_of[block] = None
            self.ref_count[block] = 1
            table.append(block)
        return True

    def release(self, table: list[int]) -> None:
        """Drop one reference on every block of `table` and empty it."""
        for block in reversed(table):  # the tail is freed first, so it is evicted before the shared prefix
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        table.clear()

    def cache_full_blocks(self, table: list[int], hashes: list[int], ids: list[int], n_computed: int) -> None:
        """Register the blocks of `table` that became full and computed (the first n_computed tokens of
        `ids`); `hashes` holds the chain hashes of the ones registered before and is extended."""
        bs = self.block_size
        while (len(hashes) + 1) * bs <= n_computed:
            i = len(hashes)
            key = block_key(hashes[-1] if hashes else None, ids[i * bs:(i + 1) * bs])
            hashes.append(hash(key))
            if self.prefix_caching and key not in self.cached:  # first writer wins; an equal twin stays private
                self.cached[key] = table[i]
                self.key_of[table[i]] = key

    def clear_prefix_cache(self) -> None:
        """Forget the k/v of blocks nobody holds, so the next request prefills from scratch."""
        for block in self.free:
            if (key := self.key_of[block]) is not None:
                del self.cached[key]
                self.key_of[block] = None
