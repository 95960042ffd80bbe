"""Paged KV bookkeeping: allocation, prefix sharing by hash, reference counts, eviction."""

from __future__ import annotations

import sys

from factories import create_seq

from sloth_serve.engine.block_manager import BlockManager


def test_engine_bookkeeping_does_not_import_torch() -> None:
    import subprocess

    code = "import sloth_serve.engine.scheduler, sys; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_allocate_covers_tokens_and_free_returns_blocks() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = create_seq(num_prompt_tokens=9)
    assert bm.allocate_slots(seq, 9)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 7
    bm.free(seq)
    assert bm.num_free_blocks == 10
    assert seq.block_table == []


def test_allocate_fails_without_side_effects_when_full() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = create_seq(num_prompt_tokens=12)
    assert not bm.allocate_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_identical_prefix_shares_blocks_and_reference_counts_free_them() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = create_seq(num_prompt_tokens=10)
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    bm.register_computed_blocks(a)
    assert len(a.block_hashes) == 2  # two full blocks; the third holds 2 tokens
    b = create_seq(num_prompt_tokens=10)
    cached = bm.find_cached_blocks(b)
    assert cached == a.block_table[:2]
    assert bm.allocate_slots(b, 2, cached)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    bm.free(b)
    assert bm.num_free_blocks == 16
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_freed_prefix_stays_cached_until_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = create_seq(num_prompt_tokens=9)
    bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.register_computed_blocks(a)
    head = a.block_table[:2]
    bm.free(a)
    b = create_seq(num_prompt_tokens=9)
    assert bm.find_cached_blocks(b) == head  # still cached after free
    filler = create_seq(num_prompt_tokens=16, first_token=5000)
    assert bm.allocate_slots(filler, 16)  # takes every block: the cached ones are evicted
    assert bm.find_cached_blocks(b) == []


def test_last_prompt_token_is_never_served_from_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = create_seq(num_prompt_tokens=8)
    bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.register_computed_blocks(a)
    b = create_seq(num_prompt_tokens=8)
    assert len(bm.find_cached_blocks(b)) == 1  # the block holding the last token must be recomputed


def test_different_adapters_do_not_share_prefix_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = create_seq(num_prompt_tokens=9, adapter_id=1)
    bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.register_computed_blocks(a)
    assert bm.find_cached_blocks(create_seq(num_prompt_tokens=9, adapter_id=2)) == []
    assert len(bm.find_cached_blocks(create_seq(num_prompt_tokens=9, adapter_id=1))) == 2


def test_prefix_caching_can_be_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = create_seq(num_prompt_tokens=9)
    bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.register_computed_blocks(a)
    assert bm.find_cached_blocks(create_seq(num_prompt_tokens=9)) == []
