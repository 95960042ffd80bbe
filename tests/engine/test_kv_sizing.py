"""The KV cache's size on a GPU (LLMEngine._num_kv_blocks): the memory budget less what the CUDA
graphs' pool and the adapter slots will take (both made after the cache), run on the CPU with the
GPU's free memory given."""

from __future__ import annotations

import pytest
import torch

from sloth_serve.config import Config
from sloth_serve.engine.graph_memory import graph_pool_bytes
from sloth_serve.engine.llm_engine import LLMEngine
from sloth_serve.engine.lora_manager import LoRAManager
from sloth_serve.engine.model_runner import ModelRunner
from sloth_serve.engine.vision_inputs import ENCODER_CACHE_BYTES
from sloth_serve.loader import DEMO_ADAPTER, DEMO_MODEL
from sloth_serve.loader.peft import load_lora

GiB = 2**30


def test_kv_blocks_leave_room_for_the_graph_pool_and_the_adapter_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=16,
                              gpu_memory_utilization=0.5, max_num_seqs=8))
    engine.config = Config(model=str(DEMO_MODEL), gpu_memory_utilization=0.5, max_num_seqs=8, max_lora_rank=16)
    engine.device = torch.device("cuda")  # sized as on a GPU with 3 GiB of its 4 free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GiB, 4 * GiB))
    model = engine.loaded.model
    per_block = ModelRunner.kv_bytes_per_block(model, engine.config.block_size, engine.dtype)
    slots = LoRAManager.slot_bytes(model.lora_layers().values(), 4, 16, 4)  # --max-loras 4, rank 16, float32
    eager = engine._num_kv_blocks(model, 0)
    assert eager == (GiB - slots) // per_block  # 3 GiB free, 2 GiB kept free
    decode, prefill = [1, 2, 4, 8], [16, 32, 64]
    pool = graph_pool_bytes(model.config, 4, decode, prefill, 8, lora=True)
    assert pool > 0
    sized = engine._num_kv_blocks(model, 0, decode, prefill)
    assert sized == (GiB - slots - pool) // per_block < eager


def test_slot_bytes_are_what_the_first_adapter_allocates() -> None:
    """The estimate set aside equals the slots' tensors once made, fused projections (q|k|v,
    gate|up: one A per slice) included."""
    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=16, max_loras=3,
                              max_lora_rank=8))
    layers = engine.lora_manager.layers.values()
    expected = LoRAManager.slot_bytes(layers, 3, 8, 4)
    engine.add_lora(1, load_lora("upper", DEMO_ADAPTER, 8))
    made = sum(layer.lora_a_stacked.nbytes + layer.lora_b_stacked.nbytes for layer in layers)
    assert made == expected > 0
    assert any(len(layer.out_slices) > 1 for layer in layers)


def test_kv_blocks_leave_room_for_the_encoder_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image-text model's encoder cache (image embeddings kept for reuse) fills the same GPU after
    the KV cache is allocated, so it comes off the budget; a text model keeps the whole budget."""
    engine = LLMEngine(Config(model=str(DEMO_MODEL), load_format="safetensors", num_kv_blocks=16))
    engine.config = Config(model=str(DEMO_MODEL), gpu_memory_utilization=0.5, max_lora_rank=16)
    engine.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GiB, 4 * GiB))
    model = engine.loaded.model
    per_block = ModelRunner.kv_bytes_per_block(model, engine.config.block_size, engine.dtype)
    text = GiB - LoRAManager.slot_bytes(model.lora_layers().values(), 4, 16, 4)  # less the adapter slots
    assert engine._num_kv_blocks(model, 0) == text // per_block
    monkeypatch.setattr(model, "is_vision", True, raising=False)
    assert engine._num_kv_blocks(model, 0) == (text - ENCODER_CACHE_BYTES) // per_block
    # With a cross-attention K/V budget too, both come off.
    assert engine._num_kv_blocks(model, 0, cross_kv_bytes=100 * 2**20) == (text - ENCODER_CACHE_BYTES
                                                                             - 100 * 2**20) // per_block
