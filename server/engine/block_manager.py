"""Paged KV-cache bookkeeping: fixed-size blocks, a free queue, reference counts and prefix caching.

Blocks hold no data here, only ids into the model runner's cache tensors. A full block whose KV has
been computed is registered under a hash of (previous block's hash, adapter, its token ids), so a
later request with the same prefix and adapter shares it instead of recomputing. A freed block keeps
its hash and stays reusable until the free queue hands it out again (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .cross_kv import CrossKVBudget
from .sequence import Sequence
from .state_cache import StateSlots
from .state_snapshots import StateSnapshots


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)  # kept to rule out hash collisions


def block_hash(parent: int | None, adapter_id: int, token_ids: tuple[int, ...], long_prompt: bool = False,
               images: tuple[str, ...] = ()) -> int:
    """`images`: hashes of the images whose placeholder tokens the block holds (their ids alone are
    the same for every image)."""
    key = (parent, adapter_id, token_ids, long_prompt) if long_prompt else (parent, adapter_id, token_ids)
    return hash((*key, images) if images else key)


def _images_in(seq: Sequence, start: int, end: int) -> tuple[str, ...]:
    return seq.mm.salt(start, end) if seq.mm is not None else ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 long_prompt_from: int | None = None, state_slots: StateSlots | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}x{block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        # longrope: a prompt longer than this rotates its keys with other factors than a shorter
        # one (kernels/rope_scaling.rope_rows), so the two never share cached blocks.
        self.long_prompt_from = long_prompt_from
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the first is handed out next. Unhashed blocks go to the front
        # so that cached prefixes survive as long as possible.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, tokens found
        # Models with recurrent layers: a state slot goes with the blocks of every sequence that has any.
        self.state_slots = state_slots
        # ... and a prefix hit restores the state saved where a prompt's last full block ended.
        self.snapshots: StateSnapshots | None = None
        # Cross-attention images (Llama 3.2 Vision): the bytes of a sequence's image keys and values
        # go with its blocks.
        self.cross_kv: CrossKVBudget | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _is_long_prompt(self, seq: Sequence) -> bool:
        return self.long_prompt_from is not None and seq.num_prompt_tokens > self.long_prompt_from

    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Blocks already holding this sequence's leading full blocks. The last token is never
        served from cache: it must run through the model to give logits."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, seq.adapter_id, tokens, self._is_long_prompt(seq), _images_in(seq, i * bs, (i + 1) * bs))
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
            parent = h
        if self.snapshots is not None:  # a recurrent state comes back with the blocks: end at a snapshot
            num_shared = len(found)
            while found and self.blocks[found[-1]].hash not in self.snapshots.by_hash:
                found.pop()
            if len(found) < num_shared:  # snapshot where the shared blocks end, for the next prompt
                seq.shared_prefix_end = num_shared * bs
        self.num_prefix_queries += seq.num_tokens
        self.num_prefix_hits += len(found) * bs
        return found

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make the block table cover `num_new_tokens` more tokens (after any cached prefix).
        Returns False, changing nothing, when there are not enough free blocks."""
        cached_blocks = cached_blocks or []
        num_computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        num_needed = self.num_blocks_for(num_computed + num_new_tokens) - len(seq.block_table) - len(cached_blocks)
        num_cached_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_needed > self.num_free_blocks - num_cached_free:
            return False
        if self.state_slots is not None and not self.state_slots.can_allocate(seq):
            return False
        if self.cross_kv is not None:
            if not self.cross_kv.can_allocate(seq):
                return False
            self.cross_kv.allocate(seq)
        if self.state_slots is not None:
            self.state_slots.allocate(seq)
            last_hash = self.blocks[cached_blocks[-1]].hash if cached_blocks else None
            if last_hash is not None and self.snapshots is not None and seq.state_slot is not None:
                restored = self.snapshots.restore(last_hash, seq.state_slot)
                assert restored, "find_cached_blocks ends a hit at a block with a state snapshot"
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            assert block.hash is not None
            seq.block_hashes.append(block.hash)
        if cached_blocks:
            seq.num_computed_tokens = num_computed
            seq.num_cached_tokens = num_computed
        for _ in range(max(num_needed, 0)):
            seq.block_table.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Hash the sequence's blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = seq.block_hashes[i - 1] if i else None
            h = block_hash(parent, seq.adapter_id, tokens, self._is_long_prompt(seq), _images_in(seq, i * bs, (i + 1) * bs))
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached and block.hash is None:
                self.cached[h] = block.block_id
                block.hash = h
                block.token_ids = tokens
        snaps = self.snapshots
        if snaps is not None and seq.state_slot is not None and seq.block_hashes and \
                seq.num_computed_tokens == len(seq.block_hashes) * bs and seq.num_computed_tokens in snaps.points(seq):
            snaps.take(seq.block_hashes[-1], seq.state_slot)  # the state right where the block ends

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks past the first `num_tokens` tokens' (speculative decoding: blocks that
        only rejected draft tokens used). Those were never registered: nothing else holds them."""
        keep = self.num_blocks_for(num_tokens)
        self._release(seq.block_table[keep:])
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody uses become free (hashed ones stay cached).
        The tail is freed first so that it is evicted before the shared head of the prefix."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        if self.state_slots is not None:
            self.state_slots.free(seq)
        if self.cross_kv is not None:
            self.cross_kv.free(seq)

    def _release(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
