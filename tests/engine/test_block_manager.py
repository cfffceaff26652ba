"""The block manager: block accounting and the prefix cache."""

from engine.block_manager import BlockManager


def test_grow_and_release_account_for_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = [], []
    assert bm.grow(a, 9)  # 3 blocks
    assert bm.grow(a, 12) and len(a) == 3  # still fits
    assert bm.grow(b, 17)  # 5 blocks
    assert bm.num_free == 0 and sorted(a + b) == list(range(8))
    assert not bm.grow(a, 13) and len(a) == 3  # nothing free: refused, table unchanged
    bm.release(b)
    assert b == [] and bm.num_free == 5
    assert bm.grow(a, 13) and len(a) == 4
    bm.release(a)
    assert bm.num_free == 8 and bm.ref_count == [0] * 8


def test_prefix_cache_shares_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    a, hashes = [], []
    assert bm.grow(a, len(ids))
    bm.cache_full_blocks(a, hashes, ids, n_computed=len(ids))
    assert len(hashes) == 2

    blocks, hashes_b = bm.share_prefix(ids + [7, 8])
    assert blocks == a[:2] and hashes_b == hashes
    assert [bm.ref_count[x] for x in a] == [2, 2, 1]
    # exactly two full blocks: only the first is shared, so one token is left whose logits are needed
    assert bm.share_prefix(ids[:8])[0] == a[:1]
    # the chain matters: same second block after a different first block is a miss
    assert bm.share_prefix([0] + ids[1:])[0] == []
    assert bm.share_prefix(ids[:4] + [0] + ids[5:])[0] == a[:1]


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    ids = [1, 2, 3, 4, 5]
    a, hashes = [], []
    bm.grow(a, 5)
    bm.cache_full_blocks(a, hashes, ids, 5)
    first_two = a[:2]
    bm.release(a)
    assert bm.num_free == 4
    hit, _ = bm.share_prefix(ids)
    assert hit == first_two  # a finished sequence's k/v is found again
    bm.release(hit)
    b = []
    assert bm.grow(b, 8)  # needs every block: the cached ones are evicted and reused
    assert bm.share_prefix(ids)[0] == []
    bm.release(b)
    bm.clear_prefix_cache()
    assert bm.cached == {} and bm.num_free == 4


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=4, block_size=2, prefix_caching=False)
    a, hashes = [], []
    bm.grow(a, 4)
    bm.cache_full_blocks(a, hashes, [1, 2, 3, 4], 4)
    assert bm.share_prefix([1, 2, 3, 4, 5]) == ([], [])
